"""The stall of a sharded ``snapshot()`` under real ``torchrun`` (gloo, CPU, one daemon), and the
device path of ranks' local shards.

- ``snapshot()`` runs no collective on the training thread: with every other rank SIGSTOPped,
  rank 0's ``snapshot()`` returns at once (a collective would wait for them until the group
  timeout); the step commits once they are woken and snapshot it too. At 2 and 4 ranks.
- What costs more than the copy is paid once per tree, not per snapshot: a second flatten of the
  same FSDP2 state computes no DTensor layout. The stall against a copy of the same local bytes
  is recorded at 2 and 4 ranks (thread CPU time: the machine's other load does not count); the
  only bound asserted is a generous one (5x the copy, and 50 ms).
- A DTensor on a mesh of one device (a world of one) is held whole: snapshot and restore
  bit-exact, on the CPU here and on CUDA where there is a device (``gpu``).
- On CUDA, ranks' local shards take the single process's device-to-host path: page-locked slot,
  side stream, ``snapshot()`` returning before the copy is done, in-place updates queued after it
  returns not seen by the checkpoint (``gpu``; the same worker runs on the CPU here).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProc

TESTS = Path(__file__).parent
WORKER = TESTS / "multirank_stall_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_worker(
    world: int, args: list[str], out: Path, env: dict[str, str] | None = None, timeout_s: float = 240
) -> str:
    """The worker on ``world`` ranks (0: one plain process); its log. Every process it made is gone
    after (they run in their own session, killed as a group)."""
    launcher = [sys.executable] if world == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
    ]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent), **(env or {})}
    log = out / f"{args[0]}-{world}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [*launcher, str(WORKER), *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout_s)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    text = log.read_text(errors="replace")
    assert rc == 0, f"{args[0]} on {world} ranks exited {rc}:\n{text[-4000:]}"
    return text


def results(out: Path, mode: str, world: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"{mode}-rank-{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_snapshot_runs_no_collective_and_its_stall_is_the_local_copy(
    world: int, workdir: Path, daemon: DaemonProc, record_property: Callable[[str, object], None]
) -> None:
    out = workdir / "out"
    out.mkdir()
    run_worker(world, ["stall", str(out), str(daemon.socket)], out, env={"FSDP_WORKER_HIDDEN": "256"})
    ranks = results(out, "stall", world)
    first = ranks[0]
    # Rank 0's snapshot() returned while every other rank was stopped, and they still were after.
    assert first["peers_still_stopped"] is True
    assert first["peers_stopped_s"] < 10, first  # a collective would wait 120 s (the group timeout)
    step2 = [r["step2"] for r in ranks]
    assert step2[0] is not None and step2 == [step2[0]] * world, step2  # committed, one step on all
    assert (Path(step2[0]) / "config.json").exists()  # the model, as from_pretrained reads it
    for r in ranks:
        assert r["sharded_tensors"] > 0
        assert r["layouts_computed"] == 0, r  # a second flatten: every DTensor layout cached
        ratio = r["snapshot_cpu_s"] / r["copy_cpu_s"]
        line = (
            f"{world} ranks, rank {r['rank']}: {r['local_bytes']} local bytes; snapshot() "
            f"{r['snapshot_cpu_s'] * 1e3:.1f} ms CPU ({r['snapshot_wall_s'] * 1e3:.1f} ms wall), copy "
            f"of the same tensors {r['copy_cpu_s'] * 1e3:.1f} ms CPU ({r['copy_wall_s'] * 1e3:.1f} ms "
            f"wall): {ratio:.2f}x; with the others stopped {first['peers_stopped_s'] * 1e3:.1f} ms wall"
        )
        print(line)
        record_property(f"stall_w{world}_rank{r['rank']}", line)
        assert r["snapshot_cpu_s"] < 5 * r["copy_cpu_s"] + 0.05, line


def test_dtensor_on_a_one_device_mesh_round_trips(workdir: Path, daemon: DaemonProc) -> None:
    out = workdir / "out"
    out.mkdir()
    run_worker(0, ["one", "cpu", str(out), str(daemon.socket)], out)
    assert json.loads((out / "one-rank-0.json").read_text()) == {
        "saved_same": True,
        "restored": 1,
        "restored_same": True,
        "restored_device": "cpu",
    }


def test_local_shards_round_trip_on_the_host_path(workdir: Path, daemon: DaemonProc) -> None:
    out = workdir / "out"
    out.mkdir()
    run_worker(2, ["local", "cpu", str(out), str(daemon.socket)], out)
    for r in results(out, "local", 2):
        assert r["on_device"] and r["same"] == {"w": True, "b": True}, r
        assert r["restored"] == 1 and r["restored_same"] == {"w": True, "b": True}, r


@pytest.mark.gpu
def test_cuda_dtensor_on_a_one_device_mesh_round_trips(workdir: Path, daemon: DaemonProc) -> None:
    out = workdir / "out"
    out.mkdir()
    run_worker(0, ["one", "cuda", str(out), str(daemon.socket)], out)
    assert json.loads((out / "one-rank-0.json").read_text()) == {
        "saved_same": True,
        "restored": 1,
        "restored_same": True,
        "restored_device": "cuda",
    }


@pytest.mark.gpu
def test_cuda_local_shards_take_the_device_to_host_path(workdir: Path, daemon: DaemonProc) -> None:
    """Two ranks, each holding its ``Shard(0)`` slices on the node's CUDA device: the copy is queued
    on the side stream (snapshot() may return before it is done) and the bytes saved are those of
    before the in-place update each rank queued right after snapshot() returned."""
    out = workdir / "out"
    out.mkdir()
    run_worker(2, ["local", "cuda", str(out), str(daemon.socket)], out)
    for r in results(out, "local", 2):
        assert r["on_device"] and r["same"] == {"w": True, "b": True}, r
        assert r["restored"] == 1 and r["restored_same"] == {"w": True, "b": True}, r
