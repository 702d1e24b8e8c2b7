"""Several ranks under real ``torchrun`` (gloo, CPU), one daemon, DDP (replicated) state: a step
of the job is one checkpoint, each tensor byte written once by one rank, committed once every
rank's part is durable, without needing a live trainer; a part that fails or never arrives
makes nothing visible.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from helpers import stop_launcher
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

import ckptd
from ckptd import ranks
from ckptd.manifest import read_manifest
from ckptd.paths import read_latest
from client import Client

if TYPE_CHECKING:
    from conftest import DaemonProc

TESTS = Path(__file__).parent
WORKER = TESTS / "multirank_worker.py"
sys.path.insert(0, str(TESTS))
import multirank_worker as worker  # noqa: E402

StartDaemon = Callable[..., "DaemonProc"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def torchrun(
    world: int, mode: str, out: Path, daemon: DaemonProc, step: int, *, timeout_s: float = 120
) -> int:
    """Run the worker on ``world`` ranks; its return code. Every process it made is gone after."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(world),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(WORKER),
        mode,
        str(out),
        str(daemon.socket),
        str(step),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    with open(out / "torchrun.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout_s)
        finally:
            stop_launcher(proc)


def results(out: Path, world: int) -> list[dict[str, Any]]:
    found = [out / f"rank-{r}.json" for r in range(world)]
    missing = [p.name for p in found if not p.exists()]
    assert not missing, f"{missing} not written:\n{(out / 'torchrun.log').read_text()[-4000:]}"
    return [json.loads(p.read_text()) for p in found]


def step_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []


def shard_owners(world: int) -> dict[str, int]:
    """Which rank writes which model shard file, computed like the client does (pure)."""
    from ckptd.layout import component_files
    from ckptd.sizes import parse_size
    from client.plan import make_plan
    from client.tree import flatten

    layout = make_plan(flatten(worker.build_state()), parse_size(worker.SHARD)).layout
    sizes = [s.nbytes for c in layout.components for s in c.shards]
    owner = ranks.assign_shards(sizes, world)
    files = [
        component_files(c.name, len(c.shards)).shard(i)
        for c in layout.components
        for i in range(len(c.shards))
    ]
    return dict(zip(files, owner, strict=True))


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_step_is_one_checkpoint_written_once(
    start_daemon: StartDaemon, workdir: Path, world: int, record_property: Callable[[str, object], None]
) -> None:
    daemon = start_daemon()
    out = workdir / "out"
    rc = torchrun(world, "save", out, daemon, step=3)
    got = results(out, world)
    assert rc == 0, (out / "torchrun.log").read_text()[-4000:]
    step_dir = daemon.root / "ddp" / "step-000003"
    assert step_dirs(daemon.root / "ddp") == ["LATEST", "step-000003"]  # one step dir, no temp dir
    assert all(r["path"] == str(step_dir) for r in got), got
    assert ckptd.verify(step_dir) == []
    assert read_latest(daemon.root / "ddp") == "step-000003"

    # from_pretrained reads it bit-exact to rank 0's model (every rank holds the same one)
    want = load_file(str(out / "rank-0.safetensors"))
    for r in range(1, world):
        other = load_file(str(out / f"rank-{r}.safetensors"))
        assert all(torch.equal(other[k], v) for k, v in want.items())
    loaded = Qwen2ForCausalLM.from_pretrained(step_dir).state_dict()
    for name, t in loaded.items():
        assert torch.equal(t, want[name]), name
    state = ckptd.load(step_dir)
    assert state["step"] == 3

    # the manifest says which rank wrote which file; each shard once, by the rank assigned it
    manifest = read_manifest(step_dir)
    assert manifest.world_size == world
    assert sorted(p.rank for p in manifest.parts) == list(range(world))
    writer = {f: p.rank for p in manifest.parts for f in p.files}
    shards = [s for c in manifest.components for s in c.shards]
    assert sorted(writer) == sorted(s.file for s in shards)  # every shard, exactly once
    owners = shard_owners(world)
    assert {f: r for f, r in writer.items() if f in owners} == owners
    assert len({writer[f] for f in writer}) == world  # spread over every rank
    for p in manifest.parts:
        part = json.loads((step_dir / ranks.PARTS_DIR / p.manifest.file).read_text())
        assert part["rank"] == p.rank and [f["file"] for f in part["files"]] == p.files

    # bytes written = unique bytes: the parts add up to one copy of the checkpoint
    unique = sum(s.bytes for s in shards)
    assert sum(p.bytes for p in manifest.parts) == unique
    assert sum((step_dir / s.file).stat().st_size for s in shards) == unique
    assert all(r["bytes"] == unique for r in got)
    record_property("stall_s", max(r["stall_s"] for r in got))

    # restore under W ranks (into a model of other weights): the same step, bit-exact on every rank
    assert [r["restored"] for r in got] == [3] * world
    for r in range(world):
        restored = load_file(str(out / f"rank-{r}-restored.safetensors"))
        assert set(restored) == set(want)
        for k, v in want.items():
            assert torch.equal(restored[k], v), (r, k)


def test_every_trainer_killed_after_snapshot_returned_still_commits(
    start_daemon: StartDaemon, workdir: Path
) -> None:
    # Every write sleeps 0.3 s first: the trainers are dead long before the parts are durable.
    daemon = start_daemon("--workers", "1", faults="slow:0.3")
    out = workdir / "out"
    rc = torchrun(2, "kill", out, daemon, step=5)
    assert rc != 0  # every rank SIGKILLed itself right after all snapshot()s returned
    step_dir = daemon.root / "ddp" / "step-000005"
    assert not step_dir.exists()  # not committed yet when the last trainer died
    deadline = time.monotonic() + 30
    while read_latest(daemon.root / "ddp") != "step-000005" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert step_dir.is_dir(), daemon.log_text()[-3000:]
    assert ckptd.verify(step_dir) == []
    assert read_latest(daemon.root / "ddp") == "step-000005"
    assert sorted(p.rank for p in read_manifest(step_dir).parts) == [0, 1]
    assert daemon.proc.poll() is None


def test_rank_that_never_snapshots_makes_nothing_visible(start_daemon: StartDaemon, workdir: Path) -> None:
    daemon = start_daemon()
    with Client.connect(daemon.socket, autostart=False, run="ddp") as c:  # an earlier step, one process
        c.snapshot(worker.build_state(), step=1).wait(timeout=60)
    out = workdir / "out"
    torchrun(2, "missing", out, daemon, step=2)
    survivor = json.loads((out / "rank-0.json").read_text())
    assert survivor["code"] == "parts_missing", survivor
    assert "rank(s) [1]" in survivor["error"] and "step 2" in survivor["error"], survivor
    assert survivor["waited_s"] < worker.COMMIT_TIMEOUT_S + 5
    run_dir = daemon.root / "ddp"
    deadline = time.monotonic() + 10
    while len(step_dirs(run_dir)) > 2 and time.monotonic() < deadline:  # the temp dir goes
        time.sleep(0.1)
    assert step_dirs(run_dir) == ["LATEST", "step-000001"]
    assert read_latest(run_dir) == "step-000001"


def test_failed_part_fails_every_rank_naming_it(start_daemon: StartDaemon, workdir: Path) -> None:
    owners = shard_owners(2)
    victim = next(f for f, r in sorted(owners.items()) if r == 1)  # a file rank 1 writes
    daemon = start_daemon(faults=f"eio-at:pwrite@{victim}:1:4")
    out = workdir / "out"
    torchrun(2, "save", out, daemon, step=4)
    got = results(out, 2)
    assert [r["code"] for r in got] == ["io_error", "io_error"], got
    assert got[0]["error"] == got[1]["error"]
    assert "rank 1's part failed: [EIO]" in got[0]["error"], got[0]["error"]
    assert victim in got[0]["error"]
    run_dir = daemon.root / "ddp"
    deadline = time.monotonic() + 10
    while step_dirs(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert step_dirs(run_dir) == []  # nothing visible, no temp dir left


def test_shard_assignment_is_deterministic_balanced_and_whole() -> None:
    sizes = [4096 * (1 + (i * 7919) % 13) for i in range(40)]
    for world in (1, 2, 3, 4, 8):
        owner = ranks.assign_shards(sizes, world)
        assert owner == ranks.assign_shards(list(sizes), world)  # the same on every rank
        mine = [ranks.owned_shards(sizes, world, r) for r in range(world)]
        assert sorted(i for m in mine for i in m) == list(range(len(sizes)))  # each shard once
        loads = [sum(sizes[i] for i in m) for m in mine]
        assert max(loads) - min(loads) <= max(sizes)  # spread by bytes (greedy bound)
