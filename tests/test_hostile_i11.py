"""Hostile tests of several daemons on one shared root (#11): what another node, a slow writer or
a forged file in the root does to a daemon's start-up sweep and to topology detection. Real
daemons; the other node's work is laid out on disk as its daemon leaves it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import DaemonProc, wait_for_socket
from test_multinode import WORKER, Nodes, assert_nothing_visible, commit_step_1, leftovers, result

from ckptd import nodes, paths, shared
from ckptd.ranks import PARTS_DIR, part_filename


@pytest.fixture
def two_nodes() -> Iterator[Nodes]:
    base = Path(tempfile.mkdtemp(prefix="ckptd-"))
    n = Nodes(base)
    try:
        yield n
    finally:
        n.close()
        shutil.rmtree(base, ignore_errors=True)


def _other_node_step(root: Path, step: int, *, job: str, deadline_unix: float, world_size: int = 2) -> Path:
    """A multi-rank step temp directory as a two-daemon job leaves it while its parts are being
    written: ``parts/job.json`` (made long ago, past its deadline) and rank 1's marker."""
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    t = run / paths.temp_dirname(step, job)
    (t / PARTS_DIR).mkdir(parents=True)
    info = shared.JobInfo(
        job=job, run="run", step=step, world_size=world_size, nodes=2, node="n1", deadline_unix=deadline_unix
    )
    (t / PARTS_DIR / shared.JOB_FILE).write_text(info.model_dump_json())
    (t / "model.safetensors").write_bytes(b"\0" * 4096)
    return t


def test_start_up_sweep_leaves_a_step_past_its_deadline_whose_parts_are_still_being_written(
    start_daemon: Callable[..., DaemonProc], workdir: Path
) -> None:
    """commit_timeout_s bounds when parts arrive, not how long they take to write: a big part
    written past the deadline (or a node whose clock is ahead) is still in flight while its
    daemon touches its marker. A daemon restarted on another node must leave it alone."""
    other = start_daemon("--node-id", "n1")
    old = time.time() - 600
    t = _other_node_step(other.root, 7, job="ab" * 8, deadline_unix=old)
    os.utime(t / PARTS_DIR / shared.JOB_FILE, (old, old))  # no coordinator lease yet
    marker = t / PARTS_DIR / shared.writing_name(1)
    marker.touch()  # rank 1's daemon is writing its part right now
    (t / PARTS_DIR / part_filename(0)).write_text("{}")
    os.utime(t / PARTS_DIR / part_filename(0), (old, old))
    me = start_daemon("--node-id", "n0", root=other.root)
    assert t.is_dir(), f"another node's in-flight step was swept:\n{me.log_text()}"
    assert marker.exists()
    assert shared.failed_dir(shared.staged_of(other.root, "run", 7, "ab" * 8)) is None


def test_start_up_sweep_still_removes_a_dead_step_past_its_deadline(
    start_daemon: Callable[..., DaemonProc], workdir: Path
) -> None:
    """The other side of the test above: nothing moved in it for long, no lease: it goes."""
    other = start_daemon("--node-id", "n1")
    old = time.time() - 600
    t = _other_node_step(other.root, 8, job="cd" * 8, deadline_unix=old)
    marker = t / PARTS_DIR / shared.writing_name(1)
    marker.touch()
    for p in (marker, t / PARTS_DIR / shared.JOB_FILE):
        os.utime(p, (old, old))
    start_daemon("--node-id", "n0", root=other.root)
    assert not t.exists()


def test_start_up_sweep_leaves_the_local_snapshot_of_a_node_whose_id_extends_this_ones(
    start_daemon: Callable[..., DaemonProc], workdir: Path
) -> None:
    """Node ids ``gpu`` and ``gpu-1`` (host names like these are common): ``gpu``'s daemon must
    not take ``step-N.ckptd-tmp-node-gpu-1-<hex>`` (gpu-1's single-process snapshot, being
    written right now) for its own leftover."""
    other = start_daemon("--node-id", "gpu-1")
    run = other.root / "run"
    run.mkdir(parents=True)
    theirs = run / paths.temp_dirname(3, shared.local_nonce("gpu-1"))
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"\0" * 4096)
    mine = run / paths.temp_dirname(2, shared.local_nonce("gpu"))
    mine.mkdir()
    me = start_daemon("--node-id", "gpu", root=other.root)
    assert theirs.is_dir(), f"node gpu-1's snapshot in progress was swept by node gpu:\n{me.log_text()}"
    assert not mine.exists()  # its own leftover still goes


def test_start_up_sweep_counts_a_node_whose_lock_file_it_cannot_read(
    start_daemon: Callable[..., DaemonProc], workdir: Path
) -> None:
    """Node n1's lock file there but its content unreadable (torn, garbage, replaced by a
    forger): the root is still shared with n1, and n0's start-up sweep must not sweep the root
    whole (n1's single-process snapshot in progress with it)."""
    other = start_daemon("--node-id", "n1")
    (other.root / nodes.NODES_DIR / "n1.lock").write_text("{torn")
    run = other.root / "run"
    run.mkdir(parents=True)
    theirs = run / paths.temp_dirname(3, shared.local_nonce("n1"))
    theirs.mkdir()
    me = start_daemon("--node-id", "n0", root=other.root)
    assert theirs.is_dir(), f"node n1's snapshot in progress was swept by node n0:\n{me.log_text()}"


def _serve(root: Path, sock: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ckptd", "serve", "--root", str(root), "--socket", str(sock), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def test_a_fifo_among_the_node_files_does_not_hang_a_daemon_or_a_client(workdir: Path) -> None:
    """A FIFO (or a link to one) named ``*.lock`` in ``.ckptd-nodes/``: reading the holders must
    not wait for a writer that never comes (the daemon's start-up sweep and every rank's
    topology detection at connect read them)."""
    root = workdir / "root"
    (root / nodes.NODES_DIR).mkdir(parents=True)
    os.mkfifo(root / nodes.NODES_DIR / "zz.lock")
    os.symlink(root / nodes.NODES_DIR / "zz.lock", root / nodes.NODES_DIR / "zy.lock")
    (root / nodes.NODES_DIR / "zx.lock").write_text("{not json")
    proc = _serve(root, workdir / "d.sock", workdir / "d.log", "--node-id", "n0")
    try:
        try:
            wait_for_socket(workdir / "d.sock", proc, timeout_s=15)
        except (TimeoutError, RuntimeError) as e:
            raise AssertionError(f"daemon did not start: {e}\n{(workdir / 'd.log').read_text()}") from None
        code = (
            "from pathlib import Path; from ckptd import nodes; "
            f"print([h.node for h in nodes.read_holders(Path({str(root)!r}))])"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.replace("'", '"')) == ["n0"]
    finally:
        proc.kill()
        proc.wait(10)


# --- two daemons, two torchrun launchers (tests/test_multinode.py's harness) ----------------------


def test_node1_daemon_killed_right_after_creating_its_part_manifest_fails_node0_not_hangs(
    two_nodes: Nodes,
) -> None:
    """Node 1's daemon dies (SIGKILL, power) between creating ``parts/rank-00001.json`` and
    writing it: an empty manifest stays, its ``.writing`` marker beside it no longer moves. The
    coordinator must not take that for a part still being written forever: rank 0's handle
    fails within the commit timeouts naming rank 1, nothing is visible."""
    two_nodes.start(0)
    n1 = two_nodes.start(1, f"kill-after:create@{part_filename(1)}:1:2")
    commit_step_1(two_nodes)
    out = two_nodes.base / "out"
    two_nodes.run(WORKER, "wait", out, 2, expect=(0,))
    assert n1.proc.poll() is not None and "faulty_daemon: SIGKILL" in n1.text()
    r0 = result(out, 0)
    assert r0.get("code") == "parts_missing" and "rank(s) [1]'s daemon stopped writing" in r0["error"], r0
    assert r0["waited_s"] < 45, r0
    assert_nothing_visible(two_nodes.root / "ddp", 2, "step-000001")


def test_failed_name_of_a_node_whose_id_holds_dot_failed_still_says_why(workdir: Path) -> None:
    """With no room for ``FAILED.json`` (ENOSPC) the ``.failed`` name alone says why; a node id
    may hold ``.failed.`` itself (``a.failed.b`` is a valid id): the reason must still read
    rank 1, ENOSPC, that node."""
    staged = shared.staged_of(workdir, "run", 4, "ee" * 8)
    staged.run_dir.mkdir()
    failed = staged.run_dir / shared.failed_name(staged, 1, "ENOSPC", "a.failed.b")
    failed.mkdir()
    time.sleep(2.1)  # past the moment its aborter could still be writing FAILED.json
    o = shared.outcome(staged, "ee" * 8, 0)
    assert o is not None and o.path is None
    assert "rank 1's part failed: [ENOSPC] on node 'a.failed.b'" in o.message, o.message
    assert (o.code, o.errno) == ("io_error", errno.ENOSPC)


def test_node1_daemon_stopped_past_the_timeouts_then_continued_resurrects_nothing(two_nodes: Nodes) -> None:
    """Node 1's daemon SIGSTOPped (not killed) while it writes its part, for longer than the
    marker timeout: node 0 aborts the step naming rank 1. SIGCONTed, node 1's daemon must not
    write into the aborted directory nor make the step again: its rank fails too, nothing of
    step 2 is visible or left, LATEST stays, and the next step commits."""
    two_nodes.start(0)
    n1 = two_nodes.start(1, "slow:2.0", "--workers", "1")
    commit_step_1(two_nodes)
    out = two_nodes.base / "out"
    procs = two_nodes.run(WORKER, "wait", out, 2, wait=False)
    run_dir = two_nodes.root / "ddp"
    marker = shared.staged_of(two_nodes.root, "ddp", 2, "x").run_dir
    deadline = time.monotonic() + 90
    while not any((p / PARTS_DIR / shared.writing_name(1)).exists() for p in marker.glob("step-000002.*")):
        assert time.monotonic() < deadline, "rank 1's part never started"
        time.sleep(0.02)
    os.kill(n1.proc.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 60
        while not (out / "rank-0.json").exists():
            assert time.monotonic() < deadline, "node 0 did not fail the step"
            time.sleep(0.1)
        time.sleep(2.0)
    finally:
        os.kill(n1.proc.pid, signal.SIGCONT)
    two_nodes.wait(procs, out, (0, 1))
    r0, r1 = result(out, 0), result(out, 1)
    assert r0.get("code") == "parts_missing" and "rank(s) [1]'s daemon stopped writing" in r0["error"], r0
    assert "error" in r1 and "step 2" in r1["error"], r1
    assert_nothing_visible(run_dir, 2, "step-000001")
    time.sleep(3.0)  # node 1's daemon, continued, had its chance to write more
    assert leftovers(run_dir, 2) == []  # only the .failed directory's FAILED.json, for a minute
    assert n1.proc.poll() is None, n1.text()
    out3 = two_nodes.base / "out3"
    two_nodes.run(WORKER, "wait", out3, 3, expect=(0, 1))
    assert [result(out3, r).get("path") for r in (0, 1)] == [str(run_dir / "step-000003")] * 2


def test_coordinator_daemon_stopped_mid_commit_then_continued_does_not_commit_the_aborted_step(
    two_nodes: Nodes,
) -> None:
    """Rank 0's daemon SIGSTOPped while it commits (every part sealed), for longer than its
    lease: node 1's daemon aborts the step. SIGCONTed, the coordinator must not commit it after
    all (one decision: both ranks fail, nothing visible, LATEST stays)."""
    n0 = two_nodes.start(0, "slow:1.0", "--workers", "1")
    two_nodes.start(1)
    commit_step_1(two_nodes)
    out = two_nodes.base / "out"
    procs = two_nodes.run(WORKER, "wait", out, 2, wait=False)
    run_dir = two_nodes.root / "ddp"

    def committing() -> bool:
        for t in run_dir.glob("step-000002.ckptd-tmp-*"):
            names = {p.name for p in (t / PARTS_DIR).glob("*")} if (t / PARTS_DIR).is_dir() else set()
            if {part_filename(0), part_filename(1)} <= names and not any(
                n.endswith(".writing") for n in names
            ):
                return True
        return False

    deadline = time.monotonic() + 90
    while not committing():
        assert time.monotonic() < deadline, "the coordinator never started committing"
        time.sleep(0.01)
    os.kill(n0.proc.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 90
        while not (out / "rank-1.json").exists():
            assert time.monotonic() < deadline, "node 1 did not fail the step"
            time.sleep(0.1)
    finally:
        os.kill(n0.proc.pid, signal.SIGCONT)
    two_nodes.wait(procs, out, (0, 1))
    r0, r1 = result(out, 0), result(out, 1)
    assert r1.get("code") == "commit_error" and "did not commit" in r1["error"], r1
    assert "error" in r0, r0
    assert_nothing_visible(run_dir, 2, "step-000001")
