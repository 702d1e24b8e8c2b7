"""The benchmark harness end to end, once, with ``--quick`` (tiny workloads): it exits 0 and
writes a results.json with every system and workload and a PNG chart; the side benchmarks
(write path, hand-off) run once each at small sizes. No timing assertions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.names import SYSTEMS, TRAIN_SYSTEMS, WORKLOADS

REPO = Path(__file__).resolve().parent.parent
FIGURES = ("stall_s", "durable_s", "durable_nofsync_s", "throughput_gbps", "first_stall_s", "rss_overhead")


def numeric(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.startswith("$ "), "the command line is printed first"
    data = json.loads((out / "results.json").read_text())
    assert data["errors"] == []
    for wl in WORKLOADS:
        limits = data["limits"][wl]
        assert numeric(limits["memcpy_s"]) and numeric(limits["disk_gbps"])
        for system in SYSTEMS:
            r = data["results"][wl][system]
            if r.get("applicable", True) is False:
                assert (system, wl) == ("save_pretrained", "small") and r["reason"]
                continue
            assert "error" not in r, r
            for figure in FIGURES:
                assert numeric(r[figure]), (system, wl, figure, r.get(figure))
            assert r["payload_bytes"] > 0 and r["bytes_on_disk"] > 0
        assert numeric(data["results"][wl]["ckptd"]["daemon"]["peak_rss"])
    training = data["training"]
    assert numeric(training["baseline_steps_per_s"])
    for system in TRAIN_SYSTEMS:
        assert numeric(training["systems"][system]["interference_pct"])
    assert "targets" in data
    png = (out / "chart.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert not (out / "scratch").exists(), "measurement outputs are deleted"


@pytest.mark.parametrize(
    ("module", "size", "modes"),
    [
        ("bench.write_path", ["--gib", "0.01"], ("write-behind", "buffered+fsync", "direct")),
        ("bench.handoff", ["--gb", "0.15"], ("streamed", "whole")),  # 0.15 GB: more than one batch
    ],
)
def test_side_benchmarks_run_every_mode(
    module: str, size: list[str], modes: tuple[str, ...], tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, *size, "--rounds", "1", "--dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = done.stdout.split("median (range)")[1]
    for mode in modes:
        assert f"{mode} " in summary, done.stdout
    assert list(tmp_path.iterdir()) == [], "the benchmark removes what it wrote"
