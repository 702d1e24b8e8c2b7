"""Training interference: steps per second of a small CPU training loop (an MLP of about 19M
parameters with AdamW, 2 threads) that checkpoints its own state every K steps, against the same
loop without checkpoints.

One warm-up checkpoint is taken before the timed loop (first-use costs are reported elsewhere),
so the figure is the steady state. ``torch_save`` is followed by an fsync of its file (the
synchronous durable baseline); ``dcp_async`` waits for the previous save before starting the
next one, as DCP requires; ckptd uses its default ``policy="block"``.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import measure, systems
from bench.workloads import Workload

log = logging.getLogger(__name__)


class MLP(nn.Module):
    def __init__(self, d: int, ff: int, blocks: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
            for _ in range(blocks)
        )
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        out: torch.Tensor = self.out(x)
        return out


def build(quick: bool) -> tuple[Workload, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    d, ff, blocks, batch = (128, 256, 2, 16) if quick else (1024, 4096, 2, 64)
    model = MLP(d, ff, blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, d), torch.randn(batch, d)
    wl = Workload("train", f"MLP {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params + AdamW")
    wl.model, wl.optimizer = model, opt
    return wl, x, y


def train(
    system: str, *, seconds: float, every: int, quick: bool, scratch: Path, socket_path: Path | None
) -> dict[str, Any]:
    """Train for ``seconds``; checkpoint every ``every`` steps unless ``system`` is ``none``."""
    torch.set_num_threads(2)
    wl, x, y = build(quick)
    assert wl.model is not None and wl.optimizer is not None
    model, opt = wl.model, wl.optimizer

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss: torch.Tensor = nn.functional.mse_loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    for _ in range(3):
        step()
    ckpt = (
        systems.make(system, wl, scratch / f"train-{system}", socket_path=socket_path)
        if system != "none"
        else None
    )
    pending: list[systems.Pending] = []
    finished: list[systems.Sample] = []
    blocked = 0.0
    measure.reset_peak_rss()
    rss_base = measure.status_kb("VmRSS")
    try:
        if ckpt is not None:  # warm-up: arenas, staging buffers, first files
            finished.append(ckpt.finish(ckpt.start(0)))
        steps, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            step()
            steps += 1
            if ckpt is None or steps % every:
                continue
            t0 = time.perf_counter()
            if system == "dcp_async" and pending:
                finished.append(ckpt.finish(pending.pop()))
            p = ckpt.start(steps)
            if system == "torch_save":
                finished.append(ckpt.finish(p))
            else:
                pending.append(p)
            blocked += time.perf_counter() - t0
        elapsed = time.perf_counter() - started
        finished += [ckpt.finish(p) for p in pending] if ckpt is not None else []
    finally:
        for s in finished:
            measure.remove(s.path)
        if ckpt is not None:
            ckpt.close()
        measure.remove(scratch / f"train-{system}")
    rate = steps / elapsed
    checkpoints = len(finished) - 1 if ckpt is not None else 0
    log.info("train %s: %.2f steps/s over %.1fs, %d checkpoints", system, rate, elapsed, checkpoints)
    timed = finished[1:]
    return {
        "system": system,
        "model": wl.description,
        "state_bytes": wl.nbytes,
        "steps": steps,
        "seconds": elapsed,
        "steps_per_s": rate,
        "every": every,
        "checkpoints": checkpoints,
        "blocked_s": blocked,
        "stall_s": statistics.median([s.stall_s for s in timed]) if timed else 0.0,
        "durable_s": statistics.median([s.durable_s for s in timed]) if timed else 0.0,
        "rss_base": rss_base,
        "rss_overhead": measure.status_kb("VmHWM") - rss_base,
    }
