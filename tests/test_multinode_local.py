"""Two simulated nodes with node-local roots (no shared filesystem) under real ``torchrun``: two
``--nnodes 2`` launchers on this host, each with its own daemon (``--node-id n0`` / ``n1``) and
root, 2 ranks per node, DDP (gloo, CPU) on a tiny Qwen2 from a config.

Each node commits its own copy of every step, written by its own ranks; restore agrees (a
collective) on the newest step every node holds and whose every copy verifies, and each rank
loads it from its own root. Sharded state (FSDP2) is refused on node-local roots, nothing sent.

One ``save`` job (node 1's trainers SIGKILLed before their snapshot() of step 3, so only node 0
has step 3) and one ``restore`` job, run once for the module and checked several ways.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import stop_launcher
from safetensors.torch import load_file

import ckptd
from ckptd import ranks
from ckptd.manifest import read_manifest

TESTS = Path(__file__).parent
WORKER = TESTS / "multinode_local_worker.py"
NPROC = 2  # ranks per node
RUN = "ddp"


@dataclass
class Job:
    roots: tuple[Path, Path]
    out: Path
    saved: list[dict[str, Any]]  # node 0's ranks (node 1's were killed)
    restored: list[dict[str, Any]]  # every rank

    def step_dir(self, node: int, step: int) -> Path:
        return self.roots[node] / RUN / f"step-{step:06d}"

    def reference(self, rank: int, step: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.out / f"save-rank-{rank}-step-{step}.safetensors"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_nodes(mode: str, out: Path, socks: tuple[Path, Path], *, timeout_s: float = 180) -> list[int | None]:
    """The worker on 2 nodes of NPROC ranks (one launcher per node, each with its node's
    CKPTD_SOCKET) until every rank's result is written and the launchers exit (or are killed);
    their return codes (None: killed). Every process they made is gone after."""
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    want = [out / f"{mode}-rank-{r}.json" for r in range(2 * NPROC)]
    if mode == "save":
        want = want[:NPROC]  # node 1's ranks die before step 3
    try:
        for node in (0, 1):
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                str(node), "--nproc-per-node", str(NPROC), "--master-addr", "127.0.0.1",
                "--master-port", str(port), "--max-restarts", "0", str(WORKER), mode, str(out),
            ]  # fmt: skip
            env = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(TESTS.parent),
                "CKPTD_SOCKET": str(socks[node]),
            }
            logs.append(open(out / f"{mode}-node-{node}.log", "wb"))  # noqa: SIM115 - closed below
            procs.append(
                subprocess.Popen(
                    cmd, stdout=logs[-1], stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(p.exists() for p in want) or all(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
        # A launcher whose peer node failed waits in its exit barrier (save): killed soon.
        settle = time.monotonic() + (3 if mode == "save" else 30)
        while time.monotonic() < settle and any(p.poll() is None for p in procs):
            time.sleep(0.2)
        return [p.poll() for p in procs]
    finally:
        for p in procs:
            stop_launcher(p)
        for f in logs:
            f.close()


def results(out: Path, mode: str, count: int) -> list[dict[str, Any]]:
    found = [out / f"{mode}-rank-{r}.json" for r in range(count)]
    missing = [p.name for p in found if not p.exists()]
    logs = "".join((out / f"{mode}-node-{n}.log").read_text(errors="replace")[-3000:] for n in (0, 1))
    assert not missing, f"{missing} not written:\n{logs}"
    return [json.loads(p.read_text()) for p in found]


@pytest.fixture(scope="module")
def job() -> Iterator[Job]:
    """Two daemons (nodes n0 and n1, a root each); the ``save`` job, then the ``restore`` job."""
    d = Path(tempfile.mkdtemp(prefix="ckptd-"))
    roots = (d / "r0", d / "r1")
    socks = (d / "n0.sock", d / "n1.sock")
    out = d / "out"
    out.mkdir()
    daemons: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        from conftest import wait_for_socket

        for node in (0, 1):
            serve = ["--root", str(roots[node]), "--socket", str(socks[node]), "--node-id", f"n{node}"]
            logs.append(open(d / f"d{node}.log", "wb"))  # noqa: SIM115 - closed below
            daemons.append(
                subprocess.Popen(
                    [sys.executable, "-m", "ckptd", "serve", *serve],
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
            wait_for_socket(socks[node], daemons[-1])
        run_nodes("save", out, socks)
        saved = results(out, "save", NPROC)
        run_nodes("restore", out, socks)
        restored = results(out, "restore", 2 * NPROC)
        yield Job(roots, out, saved, restored)
    finally:
        for p in daemons:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for f in logs:
            f.close()
        shutil.rmtree(d, ignore_errors=True)


def steps(root: Path) -> list[str]:
    return sorted(p.name for p in (root / RUN).iterdir())


def test_each_node_root_holds_complete_pretrained_steps(job: Job) -> None:
    from transformers import Qwen2ForCausalLM

    # node 0 committed step 3 alone: node 1's trainers died before their snapshot() of it
    assert steps(job.roots[0]) == ["LATEST", "step-000001", "step-000002", "step-000003"]
    assert steps(job.roots[1]) == ["LATEST", "step-000001", "step-000002"]  # no temp dir either
    assert [r["step-3"] for r in job.saved] == [str(job.step_dir(0, 3))] * NPROC
    for node, step in [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]:
        step_dir = job.step_dir(node, step)
        assert ckptd.verify(step_dir) == [], step_dir
        want = job.reference(0, step)
        loaded = Qwen2ForCausalLM.from_pretrained(step_dir).state_dict()
        assert loaded and all(torch.equal(t, want[k]) for k, t in loaded.items()), step_dir
        assert ckptd.load(step_dir)["step"] == step
    # a new step's weights differ from the last one's (each step is its own state)
    assert not torch.equal(job.reference(0, 1)["lm_head.weight"], job.reference(0, 2)["lm_head.weight"])


def test_each_node_manifest_names_which_of_its_ranks_wrote_what(job: Job) -> None:
    jobs = set()
    for node in (0, 1):
        step_dir = job.step_dir(node, 2)
        manifest = read_manifest(step_dir)
        assert manifest.world_size == NPROC  # the node's ranks, not the job's 2 * NPROC
        assert sorted(p.rank for p in manifest.parts) == list(range(NPROC))
        writer = {f: p.rank for p in manifest.parts for f in p.files}
        shards = [s.file for c in manifest.components for s in c.shards]
        assert sorted(writer) == sorted(shards)  # every shard once, in this node's copy
        assert len(set(writer.values())) == NPROC  # spread over the node's ranks
        for p in manifest.parts:
            part = ranks.PartManifest.model_validate_json(
                (step_dir / ranks.PARTS_DIR / p.manifest.file).read_bytes()
            )
            assert part.rank == p.rank and part.world_size == NPROC
            jobs.add(part.job)
    assert len(jobs) == 2  # each node's part group is its own job


def test_restore_takes_the_newest_step_every_node_has(job: Job) -> None:
    assert [r["newest"] for r in job.restored] == [2] * (2 * NPROC), job.restored
    assert [r["node"] for r in job.restored] == [0] * NPROC + [1] * NPROC
    want = job.reference(0, 2)
    for rank in range(2 * NPROC):
        got = load_file(str(job.out / f"restore-rank-{rank}-newest.safetensors"))
        assert set(got) == set(want)
        assert all(torch.equal(got[k], v) for k, v in want.items()), rank


def test_explicit_step_a_node_lacks_fails_on_every_rank_naming_it(job: Job) -> None:
    errors = [r["explicit-3"] for r in job.restored]
    assert all(isinstance(e, dict) and e["code"] == "not_found" for e in errors), errors
    for e in errors:
        assert "step 3" in e["error"] and "node n1" in e["error"], e
        assert "node n0" not in e["error"], e  # n0 has it


def test_corrupt_copy_on_one_node_falls_back_to_an_older_common_step(job: Job) -> None:
    assert [r["fallback"] for r in job.restored] == [1] * (2 * NPROC), job.restored
    for r in job.restored:
        said = " | ".join(r["fallback-warnings"])
        assert "step 2" in said and "n1" in said and "older step" in said, r
    want = job.reference(0, 1)
    for rank in range(2 * NPROC):
        got = load_file(str(job.out / f"restore-rank-{rank}-fallback.safetensors"))
        assert all(torch.equal(got[k], v) for k, v in want.items()), rank


def test_sharded_state_on_node_local_roots_is_refused(job: Job) -> None:
    for r in job.restored:
        e = r["fsdp"]
        assert isinstance(e, dict) and e["code"] == "multi_node", r
        assert "node-local" in e["error"] and "shared root" in e["error"], e
        assert "full_state_dict" in e["error"], e
    for root in job.roots:  # nothing sent: no step 9, no temp directory on either node
        assert not [n for n in steps(root) if n.startswith("step-000009")], steps(root)


def test_part_group_is_the_node_ranks_under_a_job_of_its_own() -> None:
    from client.noderoots import part_group
    from client.ranks import Ranks
    from client.topology import Topology

    job = Ranks(rank=3, world_size=4, job="0123456789abcdef", group=None)
    part = part_group(job, Topology(daemons=2, shared_root=False, node_ranks=(2, 3), node_index=1))
    assert part is not None
    assert (part.rank, part.world_size) == (1, 2)
    assert part.job == "0123456789abcdef0001"  # hex, as the daemon's job pattern wants
    other = part_group(
        Ranks(rank=0, world_size=4, job=job.job, group=None),
        Topology(daemons=2, shared_root=False, node_ranks=(0, 1), node_index=0),
    )
    assert other is not None and other.job != part.job
    # a node of one rank sends plain single-process snapshots
    alone = Ranks(rank=2, world_size=3, job=job.job, group=None)
    assert part_group(alone, Topology(daemons=2, shared_root=False, node_ranks=(2,), node_index=1)) is None
