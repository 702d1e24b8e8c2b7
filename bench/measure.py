"""One measurement, run in a fresh child process (``python -m bench.run --one ...``): a system's
checkpoints of a workload, or the limits of a workload; the figures go back as JSON.

Peak RSS: after the workload is built the kernel's high-water mark is reset (``clear_refs`` 5),
so the peak is what the checkpoints themselves added (VmHWM includes shared-memory pages, i.e.
ckptd's arenas and DCP's shared-memory staging buffers).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import resource
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import limits, systems
from bench.workloads import Workload

log = logging.getLogger(__name__)


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False if not permitted."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def remove(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def settle(path: Path | None, seconds: float) -> None:
    """Delete a measurement's output and let the filesystem settle (journal, discards) so the
    next measurement does not pay for this one."""
    remove(path)
    os.sync()
    time.sleep(seconds)


def run_system(
    name: str, wl: Workload, scratch: Path, *, reps: int, socket_path: Path | None, settle_s: float
) -> dict[str, Any]:
    """``reps`` checkpoints after one warm-up, each waited for until durable, then deleted.

    The memcpy floor is measured here too, just before, so that each system's stall can be
    compared with a floor taken under the same machine load."""
    local_floor = limits.memcpy_floor(wl.unique_tensors(), reps=3)["memcpy_s"]
    peak_reset = reset_peak_rss()
    rss_base = status_kb("VmRSS")
    system = systems.make(name, wl, scratch / name, socket_path=socket_path)
    samples = []
    try:
        for step in range(reps + 1):
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            pending = system.start(step)
            stall_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            sample = system.finish(pending)
            sample.extra["stall_minor_faults"] = float(stall_faults)
            settle(sample.path, settle_s)
            samples.append(sample)
            log.info(
                "%s/%s #%d: stall %.4fs, durable %.3fs (no fsync %.3fs), %d bytes",
                name,
                wl.name,
                step,
                sample.stall_s,
                sample.durable_s,
                sample.durable_nofsync_s,
                sample.bytes_on_disk,
            )
    finally:
        system.close()
        remove(scratch / name)
    rss_peak = status_kb("VmHWM")
    first, runs = samples[0], samples[1:]
    payload = system.payload_bytes
    durable = _median([s.durable_s for s in runs])
    extras = sorted({k for s in runs for k in s.extra})
    return {
        "system": name,
        "workload": wl.name,
        "applicable": True,
        "native_fsync": system.native_fsync,
        "payload_bytes": payload,
        "bytes_on_disk": runs[-1].bytes_on_disk,
        "runs": len(runs),
        "stall_s": _median([s.stall_s for s in runs]),
        "staged_s": _median([s.staged_s for s in runs]),
        "durable_s": durable,
        "durable_nofsync_s": _median([s.durable_nofsync_s for s in runs]),
        "fsync_s": _median([s.fsync_s for s in runs]),
        "throughput_gbps": payload / durable / 1e9,
        "first_stall_s": first.stall_s,
        "first_durable_s": first.durable_s,
        "stall_all_s": [s.stall_s for s in runs],
        "durable_all_s": [s.durable_s for s in runs],
        "extra": {k: _median([s.extra[k] for s in runs if k in s.extra]) for k in extras},
        "rss_base": rss_base,
        "rss_peak": rss_peak,
        "rss_overhead": rss_peak - rss_base,
        "rss_peak_reset": peak_reset,
        "memcpy_local_s": local_floor,
        "note": getattr(system, "note", ""),
    }


def run_limits(wl: Workload, scratch: Path, *, reps: int, disk_reps: int) -> dict[str, Any]:
    out = limits.measure(wl.unique_tensors(), scratch / "limits", reps=reps, disk_reps=disk_reps)
    with contextlib.suppress(OSError):
        (scratch / "limits").rmdir()
    return {"workload": wl.name, "description": wl.description, **out}


def samples_to_json(samples: list[systems.Sample]) -> list[dict[str, Any]]:
    return [{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()} for s in samples]
