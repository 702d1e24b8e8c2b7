"""The hardware limits every system is compared with, measured in the same run on the same bytes.

- memcpy floor: per-tensor ``copy_`` of the workload's unique tensors into preallocated buffers
  that were already touched (no page faults), median of ``reps``. No checkpointer that copies
  the state can stall for less.
- disk limit: the same byte count written with large ``os.write`` calls from one preallocated
  buffer, then ``fsync``; GB/s: what buffered writes reach. Also, for information, the same bytes
  written with ``O_DIRECT`` (``disk_direct_gbps``): what the device reaches without the page cache.
- with CUDA: pinned device-to-host bandwidth (``copy_(non_blocking=True)`` into page-locked host
  memory, then a synchronize).
"""

from __future__ import annotations

import logging
import mmap
import os
import statistics
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_WRITE_CHUNK = 64 * 2**20


def memcpy_floor(tensors: list[torch.Tensor], reps: int = 5) -> dict[str, float]:
    """Seconds to copy ``tensors`` into touched host buffers, per-tensor ``copy_`` (median)."""
    pinned = torch.cuda.is_available() and any(t.is_cuda for t in tensors)
    dst = [torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pinned) for t in tensors]
    times = []
    with torch.no_grad():
        for i in range(reps + 1):  # the first pass touches the pages and is not counted
            started = time.perf_counter()
            for d, s in zip(dst, tensors, strict=True):
                d.copy_(s, non_blocking=pinned)
            if pinned:
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - started)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    median = statistics.median(times)
    return {"memcpy_s": median, "memcpy_gbps": nbytes / median / 1e9, "memcpy_runs": len(times)}


def disk_limit(nbytes: int, directory: Path, reps: int = 3) -> dict[str, float]:
    """Sequential write + fsync of ``nbytes`` into ``directory`` (GB/s, median of ``reps``)."""
    directory.mkdir(parents=True, exist_ok=True)
    view = memoryview(bytearray(os.urandom(min(max(nbytes, 1), _WRITE_CHUNK))))  # touched once
    write_s, total_s = [], []
    for i in range(reps):
        path = directory / f"disk-limit-{os.getpid()}-{i}.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            started = time.perf_counter()
            left = nbytes
            while left > 0:
                left -= os.write(fd, view[: min(left, len(view))])
            written = time.perf_counter()
            os.fsync(fd)
            synced = time.perf_counter()
        finally:
            os.close(fd)
            path.unlink()
        write_s.append(written - started)
        total_s.append(synced - started)
        log.info(
            "disk limit run %d: %.3f GB in %.2fs (write %.2fs)", i, nbytes / 1e9, total_s[-1], write_s[-1]
        )
    median = statistics.median(total_s)
    return {
        "disk_s": median,
        "disk_gbps": nbytes / median / 1e9,
        "disk_write_only_gbps": nbytes / statistics.median(write_s) / 1e9,
        "disk_runs": reps,
    }


def disk_direct_limit(nbytes: int, directory: Path) -> dict[str, float]:
    """The device's own write rate: ``O_DIRECT`` writes of 64 MiB from an aligned buffer (no page
    cache, so no kernel copy), then ``fsync``. Informational: it shows what a checkpointer that
    bypasses the page cache could reach. Empty if the filesystem refuses ``O_DIRECT``."""
    directory.mkdir(parents=True, exist_ok=True)
    chunk = _WRITE_CHUNK
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT requires
    buf.write(os.urandom(chunk))
    view = memoryview(buf)
    total = max(chunk, nbytes // chunk * chunk)
    path = directory / f"disk-direct-{os.getpid()}.bin"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_DIRECT, 0o644)
    except OSError as e:
        log.info("O_DIRECT refused here (%s)", e)
        return {}
    try:
        started = time.perf_counter()
        for offset in range(0, total, chunk):
            os.pwrite(fd, view, offset)
        os.fsync(fd)
        elapsed = time.perf_counter() - started
    except OSError as e:
        log.info("O_DIRECT write failed (%s)", e)
        return {}
    finally:
        os.close(fd)
        path.unlink()
        view.release()
        buf.close()
    return {"disk_direct_gbps": total / elapsed / 1e9}


def d2h_bandwidth(nbytes: int, reps: int = 5) -> dict[str, float]:
    """Pinned and pageable device-to-host bandwidth in GB/s (empty dict without CUDA)."""
    if not torch.cuda.is_available():
        return {}
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(1)
    out: dict[str, float] = {}
    for label, pin in (("pinned", True), ("pageable", False)):
        dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        dst.fill_(0)
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            started = time.perf_counter()
            dst.copy_(src, non_blocking=pin)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        out[f"d2h_{label}_gbps"] = nbytes / statistics.median(times) / 1e9
    return out


def measure(tensors: list[torch.Tensor], scratch: Path, *, reps: int, disk_reps: int) -> dict[str, float]:
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    out: dict[str, float] = {"bytes": nbytes, "tensors": len(tensors)}
    out |= memcpy_floor(tensors, reps)
    out |= disk_limit(nbytes, scratch, disk_reps)
    out |= disk_direct_limit(nbytes, scratch)
    out |= d2h_bandwidth(nbytes, reps) if any(t.is_cuda for t in tensors) else {}
    log.info(
        "limits: memcpy %.4fs (%.2f GB/s), disk write+fsync %.3f GB/s, O_DIRECT %s GB/s",
        out["memcpy_s"],
        out["memcpy_gbps"],
        out["disk_gbps"],
        out.get("disk_direct_gbps"),
    )
    return out
