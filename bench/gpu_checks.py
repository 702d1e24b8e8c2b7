"""GPU checks (``python -m bench.gpu_checks``, run by bench/gpu.sh on a CUDA machine):

1. pinned registration: time to create an arena and page-lock it with ``cudaHostRegister``;
2. device-to-host bandwidth, pinned and pageable;
3. overlap with compute: how long the host is blocked by ``snapshot()`` of GPU tensors, and how
   much later a matmul loop queued right after it finishes than the same loop alone (ckptd's
   copies run on a side stream and the current stream waits for them, so the loop is delayed by
   about the copy time; the host should not be).
Prints one line per figure and writes ``OUT/gpu_checks.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import limits
from bench.daemon import Daemon

log = logging.getLogger(__name__)
GiB = 2**30


def registration(nbytes: int) -> dict[str, float]:
    from client.arena import Arena

    t0 = time.perf_counter()
    arena = Arena(nbytes)
    t1 = time.perf_counter()
    arena.pin_for_cuda()
    t2 = time.perf_counter()
    arena.close()
    t3 = time.perf_counter()
    return {"arena_bytes": nbytes, "arena_create_s": t1 - t0, "host_register_s": t2 - t1, "close_s": t3 - t2}


def _matmuls(a: torch.Tensor, iters: int) -> float:
    """Seconds from now until ``iters`` matmuls queued now have finished."""
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ a
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def overlap(socket_path: Path, nbytes: int, reps: int = 5) -> dict[str, Any]:
    from client import Client

    n_tensors = 64
    per = nbytes // n_tensors // 2
    state = {f"w.{i:03d}": torch.randn(per, device="cuda", dtype=torch.bfloat16) for i in range(n_tensors)}
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    _matmuls(a, 20)
    iters = 50
    alone = statistics.median(_matmuls(a, iters) for _ in range(reps))
    client = Client.connect(socket_path, autostart=False, run="gpu-overlap")
    try:
        client.snapshot(state, step=0).wait()  # warm-up: arena, registration, first file
        stalls, staged, after = [], [], []
        for step in range(1, reps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            handle = client.snapshot(state, step=step)
            stalls.append(time.perf_counter() - t0)
            after.append(_matmuls(a, iters) + stalls[-1])
            while not handle.staged:
                time.sleep(0.0002)
            staged.append(time.perf_counter() - t0)
            handle.wait()
    finally:
        client.close()
    snap_bytes = sum(t.numel() * t.element_size() for t in state.values())
    d2h = limits.d2h_bandwidth(snap_bytes, reps=3)["d2h_pinned_gbps"]
    return {
        "snapshot_bytes": snap_bytes,
        "matmuls_alone_s": alone,
        "matmuls_after_snapshot_s": statistics.median(after),
        "compute_delay_s": statistics.median(after) - alone,
        "d2h_floor_s": snap_bytes / d2h / 1e9,
        "host_stall_s": statistics.median(stalls),
        "staged_s": statistics.median(staged),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="ckptd GPU checks")
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu"))
    p.add_argument("--gib", type=float, default=1.0, help="bytes moved per check, in GiB")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (install a CUDA torch: make setup TORCH=torch)")
        return 2
    nbytes = int(args.gib * GiB)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name()}
    results["registration"] = registration(nbytes)
    results["d2h"] = limits.d2h_bandwidth(nbytes)
    with tempfile.TemporaryDirectory(prefix="ckg-", dir="/tmp") as tmp:
        daemon = Daemon(Path(tmp) / "d.sock", Path(tmp) / "root", Path(tmp) / "daemon.log")
        try:
            results["overlap"] = overlap(daemon.socket_path, nbytes)
        finally:
            results["daemon"] = daemon.stop()
    (args.out / "gpu_checks.json").write_text(json.dumps(results, indent=1))
    print(f"device: {results['device']}")
    for section in ("registration", "d2h", "overlap"):
        for key, value in results[section].items():
            print(
                f"{section:>12} {key:<28} {value:.4f}"
                if isinstance(value, float)
                else f"{section:>12} {key:<28} {value}"
            )
    ov = results["overlap"]
    print(
        f"\nhost stall {ov['host_stall_s'] * 1e3:.2f} ms, staged after {ov['staged_s'] * 1e3:.1f} ms, "
        f"compute delayed {ov['compute_delay_s'] * 1e3:.1f} ms vs D2H floor {ov['d2h_floor_s'] * 1e3:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
