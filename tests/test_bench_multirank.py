"""The multi-rank benchmark end to end, once, with ``--quick`` at 2 ranks (real torchrun, gloo on
CPU, a real ``ckptd serve``): it exits 0, reports every system for DDP and FSDP2 with finite
figures, checks the bytes written against the unique bytes, and leaves no process or scratch
behind. No timing assertions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bench.multirank import SYSTEMS, WORKLOADS

REPO = Path(__file__).resolve().parent.parent
FIGURES = ("stall_s", "stall_over_memcpy", "first_stall_s", "durable_s", "bytes_on_disk", "bytes_over_unique")


def numeric(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def workers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if "multirank_worker.py" in cmdline or ("ckptd" in cmdline and "ckmr-" in cmdline):
            found.append(p)
    return found


@pytest.mark.slow
def test_quick_multirank_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "bench.multirank", "--quick", "--worlds", "2", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.startswith("$ "), "the command line is printed first"
    data = json.loads((out / "results.json").read_text())
    assert data["errors"] == []
    for workload in WORKLOADS:
        job = data["jobs"][f"{workload}-w2"]
        assert job["world_size"] == 2 and job["workload"] == workload
        assert numeric(job["memcpy_s"]) and numeric(job["disk"]["disk_gbps"]) and numeric(job["disk_s"])
        assert len(job["memcpy_ranks_s"]) == 2
        for system in SYSTEMS:
            r = job["systems"][system]
            for figure in FIGURES:
                assert numeric(r[figure]), (workload, system, figure, r.get(figure))
            assert len(r["stall_ranks_s"]) == 2
            # no replica written twice, by any system: DDP's ranks hold the same state
            assert 1.0 <= r["bytes_over_unique"] < 1.5, (workload, system, r["bytes_over_unique"])
        bytes_check = data["targets"][f"{workload}-w2"]["bytes written = unique bytes (+ metadata)"]
        assert bytes_check["ok"], bytes_check
        assert set(data["targets"][f"{workload}-w2"]) >= {
            "stall <= 1.2 x per-rank memcpy floor",
            "durable < dcp_async's",
        }
        if workload == "fsdp":  # each rank holds half the state
            assert max(job["local_bytes"]) < 0.6 * job["unique_bytes"]
        else:
            assert job["local_bytes"] == [job["unique_bytes"]] * 2
    for line in ("== ddp-w2", "== fsdp-w2", "== ckptd against its targets", "PASS", "dcp_async"):
        assert line in done.stdout, done.stdout
    assert not (out / "scratch").exists(), "checkpoints and roots are deleted"
    assert workers() == [], "no rank or daemon left running"
