"""Two nodes on one shared root, simulated on one host: two daemons (``--node-id n0``/``n1``, one
root), two ``torchrun --nnodes 2`` launchers (gloo, CPU), each node's ranks with their own
daemon (``CKPTD_SOCKET``). A step is one temp directory that both daemons write into and one
commit by rank 0's daemon; a daemon never sweeps another node's work in progress; and a trainer
or daemon killed (or stopped, or out of space) on either node never leaves anything half visible.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
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
from safetensors.torch import load_file

import ckptd
from ckptd import shared
from ckptd.manifest import read_manifest
from ckptd.paths import read_latest

TESTS = Path(__file__).parent
WORKER = TESTS / "multinode_worker.py"
FSDP_WORKER = TESTS / "multirank_fsdp_worker.py"
sys.path.insert(0, str(TESTS))
from conftest import wait_for_socket  # noqa: E402
from test_multirank import free_port, shard_owners  # noqa: E402


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    node: str
    socket: Path
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Nodes:
    """Two daemons of one shared root (each optionally with a fault), and the jobs run on them."""

    def __init__(self, base: Path) -> None:
        self.base, self.root = base, base / "root"
        self.daemons: list[Daemon] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, node: int, faults: str | None = None, *args: str) -> Daemon:
        sock = self.base / f"n{node}.sock"
        log = self.base / f"n{node}-{len(self.daemons)}.log"
        if faults is None:
            cmd = [sys.executable, "-m", "ckptd", "serve"]
        else:
            cmd = [sys.executable, str(TESTS / "faulty_daemon.py"), faults]
        cmd += ["--root", str(self.root), "--socket", str(sock), "--node-id", f"n{node}", *args]
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        d = Daemon(proc, f"n{node}", sock, log)
        self.daemons.append(d)
        try:
            wait_for_socket(sock, proc)
        except Exception:
            raise RuntimeError(f"daemon n{node} did not start:\n{d.text()}") from None
        return d

    def run(
        self,
        worker: Path,
        mode: str,
        out: Path,
        step: int | None = None,
        *,
        wait: bool = True,
        expect: tuple[int, ...] = (),
    ) -> list[subprocess.Popen[bytes]]:
        """Both nodes' launchers of one job (each rank to its node's daemon); waited for (150 s at
        most) unless ``wait`` is False."""
        out.mkdir(parents=True, exist_ok=True)
        port = str(free_port())
        procs = []
        for node in (0, 1):
            sock = self.base / f"n{node}.sock"
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
                str(worker), mode, str(out), str(sock), *([] if step is None else [str(step)]),
            ]  # fmt: skip
            env = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(TESTS.parent),
                "CKPTD_SOCKET": str(sock),
            }
            with open(out / f"node{node}.log", "wb") as f:
                procs.append(
                    subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                )
        self.procs += procs
        if wait:
            self.wait(procs, out, expect)
        return procs

    def wait(
        self,
        procs: list[subprocess.Popen[bytes]],
        out: Path,
        expect: tuple[int, ...] = (0, 1),
        timeout_s: float = 150,
    ) -> None:
        """Until both launchers exit, or the ranks of ``expect`` wrote their results (a launcher
        whose peer node failed waits minutes in torchrun's exit barrier: it is killed then)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if expect and all((out / f"rank-{r}.json").exists() for r in expect):
                time.sleep(1.0)  # let them exit on their own first
                break
            time.sleep(0.1)
        for p in procs:
            _kill_group(p)

    def close(self) -> None:
        for p in self.procs:
            _kill_group(p)
        for d in self.daemons:
            d.stop()


def _kill_group(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(10)


@pytest.fixture
def nodes() -> Iterator[Nodes]:
    base = Path(tempfile.mkdtemp(prefix="ckptd-"))
    n = Nodes(base)
    try:
        yield n
    finally:
        n.close()
        shutil.rmtree(base, ignore_errors=True)


def log_of(out: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(out.glob("node*.log")))


def result(out: Path, rank: int) -> Any:
    path = out / f"rank-{rank}.json"
    assert path.exists(), f"{path.name} not written:\n{log_of(out)}"
    return json.loads(path.read_text())


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def leftovers(run_dir: Path, step: int) -> list[str]:
    """What a failed step left: its temp directory, or data in its ``.failed`` one (only
    ``FAILED.json`` may stay there, for a while)."""
    out = []
    for p in sorted(run_dir.glob(f"step-{step:06d}.*")):
        if shared.FAILED_SUFFIX + "." in p.name:
            out += [f"{p.name}/{q.name}" for q in p.iterdir() if q.name != shared.FAILED_FILE]
        else:
            out.append(p.name)
    return out


def committed(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step-") and "." not in p.name)


def assert_nothing_visible(run_dir: Path, step: int, latest: str | None) -> None:
    assert not (run_dir / f"step-{step:06d}").exists()
    assert read_latest(run_dir) == latest
    wait_until(
        lambda: not leftovers(run_dir, step), 20, f"step {step}'s temp data to go: {leftovers(run_dir, step)}"
    )


# --- the happy path: one module-scoped job of each kind --------------------------------------------


@dataclass
class Job:
    nodes: Nodes
    ddp_out: Path
    fsdp_out: Path


@pytest.fixture(scope="module")
def job() -> Iterator[Job]:
    """Two daemons of one root; a DDP job that saved step 3 and restored it; an FSDP2 job that
    saved step 1 (and 2-4) and one that restored it."""
    base = Path(tempfile.mkdtemp(prefix="ckptd-"))
    n = Nodes(base)
    try:
        n.start(0)
        n.start(1)
        n.run(WORKER, "save", base / "ddp", 3)
        n.run(FSDP_WORKER, "save", base / "fsdp")
        n.run(FSDP_WORKER, "restore", base / "fsdp")
        yield Job(n, base / "ddp", base / "fsdp")
    finally:
        n.close()
        shutil.rmtree(base, ignore_errors=True)


def test_ddp_two_nodes_make_one_step_committed_once(
    job: Job, record_property: Callable[[str, object], None]
) -> None:
    got = [result(job.ddp_out, r) for r in (0, 1)]
    run_dir = job.nodes.root / "ddp"
    step_dir = run_dir / "step-000003"
    assert [r.get("path") for r in got] == [str(step_dir)] * 2, got
    assert sorted(p.name for p in run_dir.iterdir()) == ["LATEST", "step-000003"]  # one step dir, no temp
    assert read_latest(run_dir) == "step-000003"
    assert ckptd.verify(step_dir) == []
    n0, n1 = (d.text() for d in job.nodes.daemons[:2])
    # rank 0's daemon committed the step; node 1's learnt it from the step directory
    assert "step=3] committed" in n0 and "from 2 ranks" in n0, n0
    assert "step=3] committed by the coordinator's daemon" in n1 and "coordinator's" not in n0, n1
    assert "swept" not in n0 + n1  # neither daemon swept anything of the other's

    # the manifest says which rank (so which node) wrote what; each shard once
    manifest = read_manifest(step_dir)
    writer = {f: p.rank for p in manifest.parts for f in p.files}
    owners = shard_owners(2)
    assert {f: r for f, r in writer.items() if f in owners} == owners
    assert sorted(p.rank for p in manifest.parts) == [0, 1]
    assert {r["bytes"] for r in got} == {sum(p.bytes for p in manifest.parts)}

    from transformers import Qwen2ForCausalLM

    want = load_file(str(job.ddp_out / "rank-0.safetensors"))
    loaded = Qwen2ForCausalLM.from_pretrained(step_dir).state_dict()
    for name, t in loaded.items():
        assert torch.equal(t, want[name]), name
    assert [r["restored"] for r in got] == [3, 3]
    for r in (0, 1):
        restored = load_file(str(job.ddp_out / f"rank-{r}-restored.safetensors"))
        assert all(torch.equal(restored[k], v) for k, v in want.items()), r
    record_property("committed", 1)


def test_fsdp_two_nodes_write_one_consolidated_checkpoint(
    job: Job, record_property: Callable[[str, object], None]
) -> None:
    from transformers import Qwen2ForCausalLM

    out = job.fsdp_out
    saved = [json.loads((out / f"save-2-rank-{r}.json").read_text()) for r in (0, 1)]
    run_dir = job.nodes.root / "fsdp"
    step_dir = run_dir / "step-000001"
    assert [s["path"] for s in saved] == [str(step_dir)] * 2
    assert committed(run_dir) == ["step-000001", "step-000002", "step-000003", "step-000004"]
    assert not [p.name for p in run_dir.iterdir() if ".ckptd-tmp-" in p.name]
    assert ckptd.verify(step_dir) == []
    full = load_file(str(out / "full.safetensors"))
    loaded = Qwen2ForCausalLM.from_pretrained(step_dir).state_dict()
    for name, t in loaded.items():
        assert torch.equal(t, full[f"model.{name}"]), name
    manifest = read_manifest(step_dir)
    assert sorted(p.rank for p in manifest.parts) == [0, 1]
    assert all(p.bytes > 0 for p in manifest.parts)  # both nodes wrote into the consolidated files

    restored = load_file(str(out / "restored-2.safetensors"))  # client.restore on both nodes
    assert set(restored) == set(full)
    for k, v in full.items():
        assert torch.equal(restored[k], v), k
    again = [json.loads((out / f"restore-2-rank-{r}.json").read_text()) for r in (0, 1)]
    assert [a["loss2"] for a in again] == [s["loss2"] for s in saved]
    record_property("committed", 1)


# --- a daemon restarted on one node mid-save ----------------------------------------------------------


def test_daemon_restarted_mid_save_does_not_destroy_the_other_nodes_work(
    nodes: Nodes, record_property: Callable[[str, object], None]
) -> None:
    nodes.start(0)
    n1 = nodes.start(1, "slow:0.3", "--workers", "1")  # rank 1's writes take seconds
    out = nodes.base / "out"
    procs = nodes.run(WORKER, "restart", out, 1, wait=False)
    run_dir = nodes.root / "ddp"
    wait_until(
        lambda: (out / "snapshotted-1-2").exists() and (out / "snapshotted-0-2").exists(), 90, "step 2"
    )
    time.sleep(0.5)
    temp = next(p for p in run_dir.iterdir() if p.name.startswith("step-000002.ckptd-tmp-"))
    n1.proc.kill()  # mid-write: rank 1's part is not durable
    n1.proc.wait(10)
    assert read_latest(run_dir) == "step-000001"
    restarted = nodes.start(1)  # the same root and node id
    assert temp.is_dir(), "the restarted daemon swept the step the other node is still writing"
    assert "swept" not in restarted.text()
    (out / "go").touch()
    nodes.wait(procs, out)
    got = [result(out, r) for r in (0, 1)]
    assert [g[0].get("path") for g in got] == [str(run_dir / "step-000001")] * 2, got
    first, second = got[0][1], got[1][1]
    assert first["code"] == "parts_missing" and "rank(s) [1]" in first["error"], first
    assert "error" in second, second  # its daemon died under it
    assert [g[2].get("path") for g in got] == [str(run_dir / "step-000003")] * 2, got
    assert committed(run_dir) == ["step-000001", "step-000003"]
    assert ckptd.verify(run_dir / "step-000001") == []
    assert read_latest(run_dir) == "step-000003"
    wait_until(lambda: not leftovers(run_dir, 2), 20, "step 2's data to go")
    record_property("committed", 2)


# --- the kill matrix across the two nodes ------------------------------------------------------------


def commit_step_1(nodes: Nodes) -> None:
    """An earlier committed step of the run, from one process on node 0 (LATEST points at it)."""
    from multirank_worker import build_state

    from client import Client

    with Client.connect(nodes.daemons[0].socket, autostart=False, run="ddp", process_group=False) as c:
        c.snapshot(build_state(), step=1).wait(timeout=60)
    assert read_latest(nodes.root / "ddp") == "step-000001"


def test_every_trainer_killed_after_snapshot_returned_commits(
    nodes: Nodes, record_property: Callable[[str, object], None]
) -> None:
    for node in (0, 1):  # the trainers are dead long before the parts are durable
        nodes.start(node, "slow:0.3", "--workers", "1")
    out = nodes.base / "out"
    nodes.run(WORKER, "kill-all", out, 5)
    run_dir = nodes.root / "ddp"
    step_dir = run_dir / "step-000005"
    wait_until(lambda: read_latest(run_dir) == "step-000005", 60, "step 5 committed")
    assert ckptd.verify(step_dir) == []
    assert sorted(p.rank for p in read_manifest(step_dir).parts) == [0, 1]
    assert committed(run_dir) == ["step-000005"]
    assert all(d.proc.poll() is None for d in nodes.daemons)
    record_property("committed", 1)


def test_node1_trainer_killed_before_snapshot_returned_makes_nothing_visible(nodes: Nodes) -> None:
    from multinode_worker import COMMIT_TIMEOUT_S

    nodes.start(0)
    nodes.start(1)
    commit_step_1(nodes)
    out = nodes.base / "out"
    nodes.run(WORKER, "kill-before", out, 2, expect=(0,))
    survivor = result(out, 0)
    assert survivor["code"] == "parts_missing", survivor
    assert "rank(s) [1] did not hand over" in survivor["error"] and "step 2" in survivor["error"], survivor
    assert survivor["waited_s"] < COMMIT_TIMEOUT_S + 5, survivor
    assert_nothing_visible(nodes.root / "ddp", 2, "step-000001")


def test_node1_daemon_killed_mid_write_fails_node0_not_hangs(nodes: Nodes) -> None:
    nodes.start(0)
    n1 = nodes.start(1, "kill-at:pwrite:3:2", "--workers", "1")
    commit_step_1(nodes)
    out = nodes.base / "out"
    nodes.run(WORKER, "wait", out, 2, expect=(0, 1))
    assert n1.proc.poll() is not None and "faulty_daemon: SIGKILL" in n1.text()
    r0, r1 = result(out, 0), result(out, 1)
    assert r0["code"] == "parts_missing" and "rank(s) [1]'s daemon stopped writing" in r0["error"], r0
    assert r0["waited_s"] < 45, r0
    assert "error" in r1, r1  # its daemon died under it
    assert_nothing_visible(nodes.root / "ddp", 2, "step-000001")


def test_trainer_stopped_during_the_commit_still_commits(
    nodes: Nodes, record_property: Callable[[str, object], None]
) -> None:
    for node in (0, 1):
        nodes.start(node, "slow:0.3", "--workers", "1")
    out = nodes.base / "out"
    procs = nodes.run(WORKER, "wait", out, 2, wait=False)
    marker = out / "snapshotted-0-2"
    wait_until(marker.exists, 90, "rank 0's snapshot() to return")
    pid = int(marker.read_text())
    os.kill(pid, signal.SIGSTOP)  # the coordinator's trainer, while its daemon writes and commits
    try:
        run_dir = nodes.root / "ddp"
        wait_until(lambda: read_latest(run_dir) == "step-000002", 60, "step 2 committed")
    finally:
        os.kill(pid, signal.SIGCONT)
    nodes.wait(procs, out)
    assert [result(out, r).get("path") for r in (0, 1)] == [str(run_dir / "step-000002")] * 2
    assert ckptd.verify(run_dir / "step-000002") == []
    record_property("committed", 1)


def test_enospc_on_node1_fails_every_rank_naming_rank_1(nodes: Nodes) -> None:
    nodes.start(0)
    nodes.start(1, "enospc-write:2")
    commit_step_1(nodes)
    out = nodes.base / "out"
    nodes.run(WORKER, "wait", out, 2, expect=(0, 1))
    got = [result(out, r) for r in (0, 1)]
    assert [g.get("code") for g in got] == ["io_error", "io_error"], got
    # Rank 0 learns it from the root: FAILED.json, or with no space for it the .failed name.
    assert all("rank 1's part failed: [ENOSPC]" in g["error"] for g in got), got
    assert_nothing_visible(nodes.root / "ddp", 2, "step-000001")


def test_coordinators_trainer_killed_after_its_daemon_accepted_commits(
    nodes: Nodes, record_property: Callable[[str, object], None]
) -> None:
    nodes.start(0, "slow:0.3", "--workers", "1")  # rank 0's part is still being written when it dies
    nodes.start(1)
    out = nodes.base / "out"
    nodes.run(WORKER, "kill-rank0", out, 2, expect=(1,))
    run_dir = nodes.root / "ddp"
    assert result(out, 1).get("path") == str(run_dir / "step-000002"), result(out, 1)
    wait_until(lambda: read_latest(run_dir) == "step-000002", 30, "LATEST")
    assert ckptd.verify(run_dir / "step-000002") == []
    assert sorted(p.rank for p in read_manifest(run_dir / "step-000002").parts) == [0, 1]
    record_property("committed", 1)


# --- start-up sweeps of a shared root ------------------------------------------------------------------


def test_start_up_sweep_of_a_shared_root_leaves_other_nodes_work(
    start_daemon: Callable[..., Any], workdir: Path
) -> None:
    n0 = start_daemon("--node-id", "n0")  # its lock file makes the root shared
    run_dir = n0.root / "r"
    run_dir.mkdir()
    now = time.time()

    def temp(name: str, job: shared.JobInfo | None = None, age_s: float = 0) -> Path:
        p = run_dir / name
        (p / "parts").mkdir(parents=True)
        (p / "model.safetensors").write_bytes(b"x" * 100)
        if job is not None:
            (p / "parts" / shared.JOB_FILE).write_text(job.model_dump_json())
            os.utime(p / "parts" / shared.JOB_FILE, (now - age_s, now - age_s))
        return p

    def info(job: str, nodes: int, node: str, deadline: float) -> shared.JobInfo:
        return shared.JobInfo(
            job=job, run="r", step=1, world_size=2, nodes=nodes, node=node, deadline_unix=deadline
        )

    keep = [
        temp("step-000001.ckptd-tmp-node-n0-0a0b0c0d"),  # n0's single-process snapshot
        temp("step-000002.ckptd-tmp-aaaaaaaaaaaaaaaa", info("a" * 16, 2, "n0", now + 60)),  # in flight
        temp("step-000003.ckptd-tmp-bbbbbbbbbbbbbbbb", info("b" * 16, 1, "n0", now - 999), 999),  # n0's job
        temp("step-000004.ckptd-tmp-cccccccccccccccc", info("c" * 16, 2, "n1", now - 999)),  # lease fresh
        temp("step-000005.ckptd-tmp-dddddddddddddddd"),  # just made: its job.json is on its way
    ]
    fresh_latest = run_dir / "LATEST.ckptd-tmp-01234567"
    fresh_latest.write_text("step-000001\n")
    keep.append(fresh_latest)
    gone = [
        temp("step-000006.ckptd-tmp-node-n1-0a0b0c0d"),  # n1's own, from before its restart
        temp("step-000007.ckptd-tmp-eeeeeeeeeeeeeeee.failed.1.ENOSPC.n0"),
        temp("step-000008.ckptd-tmp-ffffffffffffffff", info("f" * 16, 2, "n0", now - 999), 999),  # dead
        temp("step-000009.ckptd-tmp-9999999999999999", info("9" * 16, 1, "n1", now + 60)),  # n1's job
    ]
    start_daemon("--node-id", "n1", root=n0.root)
    assert [p.name for p in keep if not os.path.lexists(p)] == []
    assert [p.name for p in gone if os.path.lexists(p)] == []
    assert not [p.name for p in run_dir.iterdir() if "step-000008" in p.name]  # aborted, then removed
