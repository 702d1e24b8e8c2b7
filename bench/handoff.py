"""``python -m bench.handoff [--gb 1] [--rounds 6] [--dir DIR]``: the streamed hand-off against
the whole one, on one daemon, interleaved snapshot by snapshot on the same bytes.

Streamed (``Client.connect(stream=True)``): the daemon writes the first shards while the trainer
still copies the rest. Whole (the default): the request follows the copy. Prints each mode's
stall and time to durable (median and range). Streaming takes CPU and memory bandwidth from the
copy while it runs, so it pays where the daemon has a core and bandwidth to spare; run this on
the machine that trains to choose.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.daemon import Daemon
from client import Client

TENSORS = 290  # as many as the qwen workload


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.handoff", description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="snapshot size in GB (default 1)")
    p.add_argument("--rounds", type=int, default=6, help="snapshots per mode after a warm-up (default 6)")
    p.add_argument("--dir", type=Path, default=Path("bench/results"), help="where checkpoints go")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    n = max(1, int(args.gb * 1e9 / 2 / TENSORS))
    state = {f"w{i}": torch.randn(n, generator=g).to(torch.bfloat16) for i in range(TENSORS)}
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="handoff-", dir=args.dir))
    sock = Path(tempfile.mkdtemp(prefix="ckptd-handoff-")) / "d.sock"
    daemon = Daemon(sock, work / "root", work / "daemon.log")
    clients = {
        mode: Client.connect(sock, autostart=False, run=mode, stream=mode == "streamed")
        for mode in ("streamed", "whole")
    }
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in clients}
    try:
        for step in range(args.rounds + 1):
            order = list(clients) if step % 2 else list(reversed(clients))
            for mode in order:
                os.sync()
                time.sleep(0.3)
                started = time.perf_counter()
                handle = clients[mode].snapshot(state, step=step)
                stall = time.perf_counter() - started
                handle.wait(600)
                durable = time.perf_counter() - started
                if step:  # the first snapshot per mode makes the arenas
                    results[mode].append((stall, durable))
                    print(f"step {step}  {mode:<8} stall {stall:.4f} s  durable {durable:.3f} s", flush=True)
    finally:
        for c in clients.values():
            c.close()
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sock.parent, ignore_errors=True)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"\n{nbytes / 1e9:.3f} GB in {TENSORS} tensors, {args.rounds} snapshots per mode; median (range)")
    for mode, rs in results.items():
        s, d = [x for x, _ in rs], [y for _, y in rs]
        print(
            f"{mode:<8} stall {statistics.median(s):.4f} s ({min(s):.4f}-{max(s):.4f})  "
            f"durable {statistics.median(d):.3f} s ({min(d):.3f}-{max(d):.3f})"
        )


if __name__ == "__main__":
    main()
