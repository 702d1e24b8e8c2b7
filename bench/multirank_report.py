"""The multi-rank benchmark's figures from the ranks' JSON, its targets and its table.

Per system: *stall* is each rank's median over the reps, the slowest rank's reported; */memcpy*
the largest over ranks of a rank's stall over its own memcpy floor; *durable* is, per rep, the
slowest rank's time until its checkpoint was durable (the job's checkpoint exists only then),
median over the reps; *written* the checkpoint's bytes on disk (every file, metadata included)
against the job's unique bytes (each replica once, DTensors at their global size).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

MB = 1e6
STALL_FLOOR_RATIO = 1.2  # stall <= 1.2 x the per-rank memcpy floor
FLAT_RATIO = 1.25  # stall at the largest world size <= 1.25 x the stall at the smallest
# Bytes on disk beyond the unique bytes that are metadata (headers, manifests, indexes), not a
# replica written twice: 1 % of the payload plus 256 KiB.
META_FRACTION, META_BYTES = 0.01, 256 * 1024


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _system(name: str, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    per_rank = [r["systems"][name] for r in ranks]  # [rank][rep] -> figures; rep 0 is the warm-up
    stalls = [_median([rep["stall_s"] for rep in runs[1:]]) for runs in per_rank]
    floors = [r["memcpy_s"] for r in ranks]
    reps = len(per_rank[0])
    durable = [max(runs[i]["durable_s"] for runs in per_rank) for i in range(reps)]
    written = [rep["bytes_on_disk"] for rep in per_rank[0] if "bytes_on_disk" in rep]
    unique = ranks[0]["unique_bytes"]
    extras = sorted({k for runs in per_rank for rep in runs for k in rep} - {"stall_s", "durable_s"})
    return {
        "stall_s": max(stalls),
        "stall_ranks_s": stalls,
        "stall_over_memcpy": max(s / f for s, f in zip(stalls, floors, strict=True)),
        "durable_s": _median(durable[1:]),
        "durable_all_s": durable[1:],
        "first_stall_s": max(runs[0]["stall_s"] for runs in per_rank),
        "first_durable_s": durable[0],
        "bytes_on_disk": written[-1] if written else math.nan,
        "bytes_over_unique": written[-1] / unique if written else math.nan,
        "extra": {k: _median([rep[k] for runs in per_rank for rep in runs[1:] if k in rep]) for k in extras},
    }


def summarize(
    ranks: list[dict[str, Any]], disk: dict[str, float], daemon: dict[str, float]
) -> dict[str, Any]:
    """One job (a workload at one world size) from its ranks' ``rank-<r>.json``."""
    ranks = sorted(ranks, key=lambda r: r["rank"])
    first = ranks[0]
    unique = first["unique_bytes"]
    return {
        "workload": first["workload"],
        "world_size": first["world_size"],
        "tensors": first["tensors"],
        "unique_bytes": unique,
        "local_bytes": [r["local_bytes"] for r in ranks],
        "memcpy_ranks_s": [r["memcpy_s"] for r in ranks],
        "memcpy_s": max(r["memcpy_s"] for r in ranks),
        "memcpy_all_s": [r["memcpy_all_s"] for r in ranks],
        "disk": disk,
        "disk_s": unique / 1e9 / disk["disk_gbps"],  # the unique bytes at the disk's write+fsync rate
        "daemon": daemon,
        "systems": {name: _system(name, ranks) for name in first["systems"]},
    }


def targets(jobs: dict[str, Any]) -> dict[str, Any]:
    """ckptd against its multi-rank targets; each entry: ok, value, bound."""
    out: dict[str, Any] = {}
    for name, job in jobs.items():
        ck = job.get("systems", {}).get("ckptd")
        if ck is None:
            continue
        unique = job["unique_bytes"]
        checks: dict[str, tuple[bool, float, float]] = {
            "stall <= 1.2 x per-rank memcpy floor": (
                ck["stall_over_memcpy"] <= STALL_FLOOR_RATIO,
                ck["stall_over_memcpy"],
                STALL_FLOOR_RATIO,
            ),
            "bytes written = unique bytes (+ metadata)": (
                unique <= ck["bytes_on_disk"] <= unique * (1 + META_FRACTION) + META_BYTES,
                ck["bytes_on_disk"],
                unique,
            ),
        }
        dcp = job["systems"].get("dcp_async")
        if dcp is not None:
            checks["durable < dcp_async's"] = (
                ck["durable_s"] < dcp["durable_s"],
                ck["durable_s"],
                dcp["durable_s"],
            )
        out[name] = {k: {"ok": ok, "value": v, "bound": b} for k, (ok, v, b) in checks.items()}
    by_workload: dict[str, list[dict[str, Any]]] = {}
    for job in jobs.values():
        if "ckptd" in job.get("systems", {}):
            by_workload.setdefault(job["workload"], []).append(job)
    for workload, runs in by_workload.items():
        if len(runs) < 2:
            continue
        small = min(runs, key=lambda j: j["world_size"])
        large = max(runs, key=lambda j: j["world_size"])
        ratio = large["systems"]["ckptd"]["stall_s"] / small["systems"]["ckptd"]["stall_s"]
        check = f"stall flat in world size (w{large['world_size']} / w{small['world_size']})"
        out[workload] = {check: {"ok": ratio <= FLAT_RATIO, "value": ratio, "bound": FLAT_RATIO}}
    return out


def _f(x: Any, fmt: str, width: int) -> str:
    if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x):
        return format(x, fmt).rjust(width)
    return "-".rjust(width)


HEAD = (
    f"{'system':<10} {'stall s':>8} {'/memcpy':>7} {'first s':>8} {'durable s':>9} {'/disk':>6} "
    f"{'written MB':>10} {'/unique':>7}  stall s of each rank"
)


def _job_lines(name: str, job: dict[str, Any]) -> list[str]:
    if "error" in job:
        return [f"== {name}: ERROR {job['error']}"]
    local = job["local_bytes"]
    lines = [
        f"== {name}: {job['workload']} on {job['world_size']} ranks, {max(local) / MB:.1f} MB per rank "
        f"({job['unique_bytes'] / MB:.1f} MB unique, {job['tensors']} tensors per rank); memcpy floor "
        f"{job['memcpy_s']:.4f} s (slowest rank); disk write+fsync {job['disk']['disk_gbps']:.3f} GB/s "
        f"({job['disk_s']:.3f} s for the unique bytes)",
        HEAD,
        "-" * len(HEAD),
    ]
    for system, r in job["systems"].items():
        ranks = ", ".join(f"{s:.4f}" for s in r["stall_ranks_s"])
        lines.append(
            f"{system:<10} {_f(r['stall_s'], '.4f', 8)} {_f(r['stall_over_memcpy'], '.2f', 7)} "
            f"{_f(r['first_stall_s'], '.3f', 8)} {_f(r['durable_s'], '.3f', 9)} "
            f"{_f(r['durable_s'] / job['disk_s'], '.2f', 6)} {_f(r['bytes_on_disk'] / MB, '.2f', 10)} "
            f"{_f(r['bytes_over_unique'], '.3f', 7)}  {ranks}"
        )
    return lines


def table(data: dict[str, Any]) -> str:
    lines = [""]
    for name, job in data["jobs"].items():
        lines += [*_job_lines(name, job), ""]
    lines.append(
        "stall: each rank's median over the reps after a warm-up, the slowest rank's (first s: the "
        "warm-up's); /memcpy: the largest over ranks of a rank's stall over its own memcpy floor (its "
        "local tensors copied into touched buffers, every rank at once); durable: per rep the slowest "
        "rank's time until durable (DCP: sync_files fsyncs its files; the directory fsync is added), "
        "median; /disk: over the unique bytes' write+fsync time; written: bytes on disk, /unique: over "
        "the unique bytes (each replica once)."
    )
    if data.get("targets"):
        lines += ["", "== ckptd against its targets"]
        for scope, checks in data["targets"].items():
            for check, c in checks.items():
                verdict = "PASS" if c["ok"] else "FAIL"
                lines.append(f"{verdict}  {scope:<8} {check:<46} {c['value']:.4g} vs {c['bound']:.4g}")
    return "\n".join(lines)


def finite(o: Any) -> Any:
    """The same structure with NaN and infinities as null (strict JSON)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [finite(v) for v in o]
    return o
