"""``python -m bench.write_path [--gib 1] [--rounds 3] [--dir DIR]``: the daemon's shard write
path (``ckptd.commit.write_shard``, the real code) in its three modes, interleaved, on the same
bytes: write-behind (the default: buffered chunks with writeback started at once), buffered then
one ``fsync`` (writeback never started early), and ``O_DIRECT`` (``--direct-io``). Prints GB/s
and CPU seconds per GB for each round; the directory should be on the disk checkpoints go to.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import statistics
import time
from pathlib import Path

from ckptd import commit
from ckptd.storage import Storage

_HEADER = b" " * 4096


class _NoWriteBehind(Storage):
    """Buffered writes whose writeback waits for the final fsync."""

    def start_writeback(self, fd: int, offset: int, nbytes: int) -> None:
        pass


MODES = {
    "write-behind": (Storage(), False),
    "buffered+fsync": (_NoWriteBehind(), False),
    "direct": (Storage(), True),
}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.write_path", description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=1.0, help="bytes per file, in GiB (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--dir", type=Path, default=Path("bench/results/write_path"), help="where to write")
    args = p.parse_args()
    nbytes = int(args.gib * 2**30)
    src = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    for i in range(0, nbytes, 4096):  # touch every page: the arena is resident when written
        src[i] = (i >> 12) & 0xFF
    data = memoryview(src)
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "shard.safetensors"
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode, (storage, direct) in MODES.items():
            path.unlink(missing_ok=True)
            os.sync()
            wall, cpu = time.perf_counter(), _cpu()
            commit.write_shard(storage, path, _HEADER, data, direct=direct)
            wall, cpu = time.perf_counter() - wall, _cpu() - cpu
            gbps, cpu_per_gb = nbytes / wall / 1e9, cpu / (nbytes / 1e9)
            results[mode].append((gbps, cpu_per_gb))
            print(f"round {r + 1}  {mode:<15} {gbps:6.3f} GB/s  {cpu_per_gb:5.2f} CPU-s/GB", flush=True)
    path.unlink(missing_ok=True)
    print(f"\n{args.gib:g} GiB per file, {args.rounds} rounds; median (range)")
    for mode, rs in results.items():
        g = [x for x, _ in rs]
        c = [y for _, y in rs]
        print(
            f"{mode:<15} {statistics.median(g):6.3f} GB/s ({min(g):.3f}-{max(g):.3f})  "
            f"{statistics.median(c):5.2f} CPU-s/GB ({min(c):.2f}-{max(c):.2f})"
        )


if __name__ == "__main__":
    main()
