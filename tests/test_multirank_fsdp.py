"""Sharded state (FSDP2 ``fully_shard``: ``Shard(0)`` DTensors) under real ``torchrun`` (gloo,
CPU), one daemon: each rank's daemon part writes its slices straight into the step's consolidated
files, so the step directory is a plain ``from_pretrained`` checkpoint; it restores bit-exact into
1, 2 and 4 ranks (the next steps' losses those of the uninterrupted run), and ``dcp.load`` with
torch's ``HuggingFaceStorageReader`` reads it. Uneven shards (513 and 3 rows over 2 and 4 ranks)
and a refused ``Partial`` placement are in the same job.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import stop_launcher
from safetensors.torch import load_file

import ckptd
from ckptd.daemon.sharded import tile_problem
from ckptd.manifest import read_manifest
from ckptd.paths import read_latest
from ckptd.ranks import PARTS_DIR, PartManifest, part_filename

TESTS = Path(__file__).parent
WORKER = TESTS / "multirank_fsdp_worker.py"
STEP_DIR = "fsdp/step-000001"


@dataclass
class Job:
    root: Path
    sock: Path
    out: Path
    saved: list[dict[str, Any]]

    @property
    def step_dir(self) -> Path:
        return self.root / STEP_DIR

    def full(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.out / "full.safetensors"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_worker(
    world: int, mode: str, job_out: Path, sock: Path, *, timeout_s: float = 150, worker: Path = WORKER
) -> str:
    """The worker on ``world`` ranks (0: one plain process, no torchrun); its log. Every process it
    made is gone after."""
    launcher = [sys.executable] if world == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
    ]  # fmt: skip
    cmd = [*launcher, str(worker), mode, str(job_out), str(sock)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    log = job_out / f"{mode}-{world}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout_s)
        finally:
            stop_launcher(proc)
    text = log.read_text(errors="replace")
    assert rc == 0, f"{mode} on {world} ranks exited {rc}:\n{text[-4000:]}"
    return text


def results(out: Path, mode: str, world: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"{mode}-{world}-rank-{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def job() -> Iterator[Job]:
    """One daemon, and one FSDP2 job of 2 ranks that saved step 1 (and steps 2-4, timed)."""
    d = Path(tempfile.mkdtemp(prefix="ckptd-"))
    root, sock, out = d / "root", d / "d.sock", d / "out"
    out.mkdir()
    log = open(d / "d.log", "wb")  # noqa: SIM115 - closed below, after the daemon
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ckptd", "serve", "--root", str(root), "--socket", str(sock)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        from conftest import wait_for_socket

        wait_for_socket(sock, daemon)
        run_worker(2, "save", out, sock)
        yield Job(root, sock, out, results(out, "save", 2))
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def test_fsdp_step_is_a_consolidated_pretrained_checkpoint(job: Job) -> None:
    from transformers import Qwen2ForCausalLM

    full = job.full()
    assert all(r["path"] == str(job.step_dir) for r in job.saved), job.saved
    names = sorted(p.name for p in (job.root / "fsdp").iterdir())
    # step 1, and steps 2-4 the timing snapshots took; no temp directory left
    assert names == ["LATEST", *(f"step-00000{i}" for i in range(1, 5))], names
    # from_pretrained reads the step directory as it is, bit-exact to the gathered state dict.
    model = Qwen2ForCausalLM.from_pretrained(job.step_dir)
    state = model.state_dict()
    assert state, "nothing loaded"
    for name, t in state.items():
        assert torch.equal(t, full[f"model.{name}"]), name
    # ckptd verify (whole-file checksums, taken once every part was durable) passes.
    verify = subprocess.run(
        [sys.executable, "-m", "ckptd", "verify", str(job.step_dir)],
        check=False,
        capture_output=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # ckptd.load in a plain process: whole tensors, the optimizer's too.
    loaded = ckptd.load(job.step_dir)
    assert loaded["step"] == 1
    assert torch.equal(loaded["aux"]["table"], full["aux.table"])
    opt = loaded["optimizer"]["state"]
    for key, t in full.items():
        if key.startswith("optimizer."):
            fqn, _, what = key[len("optimizer.") :].rpartition(".")
            assert torch.equal(opt[fqn][what], t), key
    # Every byte written once: the parts' ranges add up to the unique bytes of the state, and
    # each rank wrote into the model's shard files (several writers per file).
    unique = sum(t.numel() * t.element_size() for t in full.values())
    parts = [
        PartManifest.model_validate_json((job.step_dir / PARTS_DIR / part_filename(r)).read_bytes())
        for r in range(2)
    ]
    assert sum(p.bytes for p in parts) == unique == job.saved[0]["bytes"]
    manifest = read_manifest(job.step_dir)
    model_files = {s.file for c in manifest.components if c.name == "model" for s in c.shards}
    for p in parts:
        assert p.files == [] and {r.file for r in p.ranges} & model_files, p.rank
    assert [r.rank for r in manifest.parts] == [0, 1]
    for record in manifest.parts:  # which rank wrote into which file
        assert model_files <= set(record.files), record


def test_uneven_dim0_shards(job: Job) -> None:
    """513 rows over 2 ranks (257 + 256) and 3 rows (2 + 1) land whole and in order."""
    full = job.full()
    assert full["model.model.embed_tokens.weight"].shape[0] == 513
    assert full["aux.table"].shape == (3, 5)
    loaded = ckptd.load(job.step_dir)
    assert torch.equal(loaded["model"]["model.embed_tokens.weight"], full["model.model.embed_tokens.weight"])
    assert torch.equal(loaded["model"]["lm_head.weight"], full["model.lm_head.weight"])
    assert torch.equal(loaded["aux"]["table"], full["aux.table"])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_restore_at_any_world_size(job: Job, world: int) -> None:
    """Into a fresh FSDP2 model + AdamW of ``world`` ranks (1: a plain model, one process):
    bit-exact, and the next steps' losses those of the uninterrupted run."""
    run_worker(0 if world == 1 else world, "restore", job.out, job.sock)
    got = results(job.out, "restore", world)
    assert all(r["restored"] == 1 for r in got), got
    full, restored = job.full(), load_file(str(job.out / f"restored-{world}.safetensors"))
    assert sorted(restored) == sorted(full)
    for key, t in full.items():
        assert torch.equal(restored[key], t), key
    for r in got:  # the loss of the next batch and, after one more optimizer step, of the one after
        assert (r["loss1"], r["loss2"]) == (job.saved[0]["loss1"], job.saved[0]["loss2"]), r


def test_dcp_load_with_hf_storage_reader(job: Job) -> None:
    run_worker(2, "dcp", job.out, job.sock)
    full, got = job.full(), load_file(str(job.out / "dcp-2.safetensors"))
    assert got
    for key, t in got.items():
        assert torch.equal(t, full[key]), key


def test_partial_placement_is_refused(job: Job) -> None:
    """Non-contiguous placements are stored per rank (tests/test_multirank_noncontig.py); a
    ``Partial`` one (partial sums) is still refused, saying what to do."""
    for r in job.saved:
        message = r["refused"]
        assert "Partial" in message and "redistribute" in message, message


def test_per_rank_stall(job: Job, record_property: Callable[[str, object], None]) -> None:
    """Each rank's snapshot() against a copy of its local bytes and of the whole model (printed)."""
    for r in job.saved:
        t = r["timings"]
        assert t["local_bytes"] < t["full_bytes"]  # a rank copies its slices, never the model
        line = (
            f"rank {t['rank']}: snapshot() {t['snapshot_s'] * 1e3:.2f} ms (fastest of 3; flatten alone "
            f"{t['flatten_s'] * 1e3:.2f} ms) for {t['local_bytes']} bytes; "
            f"copy of its local tensors {t['local_copy_s'] * 1e3:.2f} ms; one memcpy of the full "
            f"model ({t['full_bytes']} bytes) {t['full_copy_s'] * 1e3:.2f} ms"
        )
        print(line)
        record_property(f"stall_rank{t['rank']}", line)


def test_tiling_gaps_and_overlaps_are_named() -> None:
    assert tile_problem({0: [(0, 0, 8, 0)], 1: [(0, 8, 8, 0)]}, [16]) is None
    assert "gap" in (tile_problem({0: [(0, 0, 8, 0)], 1: [(0, 9, 7, 0)]}, [16]) or "")
    assert "overlaps" in (tile_problem({0: [(0, 0, 8, 0)], 1: [(0, 4, 12, 0)]}, [16]) or "")
    assert "cover 8 of shard 0" in (tile_problem({0: [(0, 0, 8, 0)]}, [16]) or "")
    assert "cover 0 of shard 1" in (tile_problem({0: [(0, 0, 16, 0)]}, [16, 4]) or "")


def start_faulty(d: Path, fault: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    from conftest import wait_for_socket

    root, sock = d / "root", d / "d.sock"
    with open(d / "d.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(TESTS / "faulty_daemon.py"),
                fault,
                "--root",
                str(root),
                "--socket",
                str(sock),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    wait_for_socket(sock, proc)
    return proc, root, sock


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_every_trainer_killed_after_snapshot_returned_still_commits(workdir: Path) -> None:
    """Every pwrite sleeps 0.2 s: both trainers are dead long before the slices are on disk."""
    proc, root, sock = start_faulty(workdir, "slow:0.2")
    try:
        out = workdir / "out"
        out.mkdir()
        with pytest.raises(AssertionError):  # every rank SIGKILLed itself: torchrun fails
            run_worker(2, "kill", out, sock)
        step_dir = root / STEP_DIR
        deadline = time.monotonic() + 40
        while read_latest(root / "fsdp") != "step-000001" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert step_dir.is_dir(), (workdir / "d.log").read_text()[-3000:]
        assert ckptd.verify(step_dir) == []
        assert sorted(p.rank for p in read_manifest(step_dir).parts) == [0, 1]
        assert ckptd.load(step_dir)["model"]["model.embed_tokens.weight"].shape == (513, 32)
        assert proc.poll() is None
    finally:
        stop(proc)


def test_failed_slice_write_fails_every_rank(workdir: Path) -> None:
    """EIO on the first slice written into the first model file (after its header): both handles
    fail alike naming the rank, EIO and the file; nothing is visible, no temp directory left."""
    victim = "model-00001-of-00004.safetensors"
    proc, root, sock = start_faulty(workdir, f"eio-at:pwrite@{victim}:2")
    try:
        out = workdir / "out"
        out.mkdir()
        run_worker(2, "fail", out, sock)
        got = results(out, "fail", 2)
        assert [r.get("code") for r in got] == ["io_error", "io_error"], got
        assert got[0]["error"] == got[1]["error"]
        assert "s part failed: [EIO]" in got[0]["error"] and victim in got[0]["error"], got[0]["error"]
        deadline = time.monotonic() + 10
        while any((root / "fsdp").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list((root / "fsdp").iterdir()) == []
    finally:
        stop(proc)


def test_sharded_plan_of_a_rank_views_every_placement(workdir: Path) -> None:
    """A rank's plan (here rank 1 of 2) has a view for every placement (the device copy builds
    them all, then copies its own): a plain tensor another rank writes is an empty view, its
    slices are views of their local shapes in a slot of only its bytes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from client.arena import Arena
    from client.plan import make_plan, view
    from client.tree import flatten

    dist.init_process_group("gloo", init_method=f"file://{workdir / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = distribute_tensor(torch.arange(12.0).reshape(3, 4), mesh, [Shard(0)])
        state = {"m": {"w": w, "a": torch.ones(64), "b": torch.ones(32), "c": torch.ones(16)}}
        plan = make_plan(flatten(state), 1 << 20, part=(1, 2))
        assert plan.pieces is not None
        mine = {i for start, stop in plan.mine for i in range(start, stop)}
        assert 0 < len(mine) < len(plan.specs)  # its slice, and some of the plain tensors
        assert plan.layout.slot_bytes < 2 * 4096  # only its bytes, not the layout's
        arena = Arena(plan.layout.slot_bytes)
        try:
            views = [view(arena, plan, i) for i in range(len(plan.specs))]
            assert [v.numel() > 0 for v in views] == [i in mine for i in range(len(views))]
        finally:
            arena.close()
    finally:
        dist.destroy_process_group()
