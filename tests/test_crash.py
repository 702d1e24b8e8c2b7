"""Crashes: the daemon SIGKILLed at every boundary of the write and commit sequence, I/O errors at
the same boundaries, and trainers SIGKILLed at random moments.

Each daemon kill commits step 1 normally, then snapshots step 2 on a daemon that dies at one
point (``tests/faulty_daemon.py kill-at/kill-after``). Afterwards nothing partial is visible, the
previous checkpoint loads bit-exact, ``LATEST`` and ``ckptd.latest`` name checkpoints that
verify, the pending handle fails fast with ``daemon_died``, and a daemon restarted on the same root
and socket sweeps the leftovers and commits again.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import DaemonProc
from helpers import same_bits, step_dirs, wait_until

import ckptd
from ckptd import paths
from client import CheckpointError, Client

# Four 4 KiB tensors and max_shard_size 5KB: four shards, each written as two pwrites (a 4096-byte
# header, then the data), so pwrite 2 is mid-shard and pwrite 3 lies between shards 1 and 2.
SHARD_ARGS = {"max_shard_size": "5KB"}


def state(step: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {f"w{i}": torch.randn(32, 32, generator=g) for i in range(4)},
        "extra": {"scale": torch.randn(3, generator=g, dtype=torch.float64)},
        "step": step,
    }


def damage(path: Path, step: int) -> str | None:
    """Why ``path`` is not exactly the committed ``state(step)``, or None when it is: it must
    verify and ``ckptd.load`` must return bit-exact tensors and the same plain values."""
    problems = ckptd.verify(path)
    if problems:
        return "; ".join(problems)
    loaded = ckptd.load(path)
    expected = state(step)
    if loaded["step"] != step:
        return f"{path}: step {loaded['step']}"
    for comp in ("model", "extra"):
        want = expected[comp]
        assert isinstance(want, dict)
        if set(loaded[comp]) != set(want):
            return f"{path}: {comp} holds {sorted(loaded[comp])}"
        for name, t in want.items():
            if not same_bits(loaded[comp][name], t):
                return f"{path}: {comp}/{name} differs"
    return None


def assert_loads_as(path: Path, step: int) -> None:
    assert damage(path, step) is None, damage(path, step)


def visible_steps(run_dir: Path) -> list[str]:
    return [n for n in step_dirs(run_dir) if paths.TEMP_MARKER not in n]


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if paths.TEMP_MARKER in p.name]


@dataclass(frozen=True)
class KillPoint:
    fault: str
    step2_visible: bool  # step-000002 is renamed into place before the kill
    latest: str  # what LATEST holds after the kill
    keep_last: int = 0


KILL_POINTS: dict[str, KillPoint] = {
    "after-temp-mkdir": KillPoint("kill-after:mkdir:1:2", False, "step-000001"),
    "after-component-mkdir": KillPoint("kill-after:mkdir@extra:1:2", False, "step-000001"),
    "before-first-shard": KillPoint("kill-at:create:1:2", False, "step-000001"),
    "mid-shard": KillPoint("kill-at:pwrite:2:2", False, "step-000001"),
    "between-shards": KillPoint("kill-at:pwrite:3:2", False, "step-000001"),
    "before-shard-fsync": KillPoint("kill-at:fsync:1:2", False, "step-000001"),
    "after-model-shards": KillPoint("kill-after:close@model-00004-of-00004*:1:2", False, "step-000001"),
    "before-index": KillPoint("kill-at:create@*.index.json:1:2", False, "step-000001"),
    "before-manifest": KillPoint("kill-at:create@ckptd.json:1:2", False, "step-000001"),
    "manifest-unsynced": KillPoint("kill-at:fsync@ckptd.json:1:2", False, "step-000001"),
    "before-component-dirsync": KillPoint("kill-at:fsync_dir@extra:1:2", False, "step-000001"),
    "before-seal-dirsync": KillPoint("kill-at:fsync_dir@step-*:1:2", False, "step-000001"),
    "before-rename": KillPoint("kill-at:rename:1:2", False, "step-000001"),
    "after-rename": KillPoint("kill-after:rename:1:2", True, "step-000001"),
    "after-rename-dirsync": KillPoint("kill-after:fsync_dir@default:1:2", True, "step-000001"),
    "before-latest": KillPoint("kill-at:create@LATEST*:1:2", True, "step-000001"),
    "latest-temp-written": KillPoint("kill-at:rename@LATEST*:1:2", True, "step-000001"),
    "after-latest": KillPoint("kill-after:rename@LATEST*:1:2", True, "step-000002"),
    "after-latest-dirsync": KillPoint("kill-after:fsync_dir@default:2:2", True, "step-000002"),
    "retention-after-doom-rename": KillPoint("kill-after:rename:3:2", True, "step-000002", keep_last=1),
    "retention-before-dirsync": KillPoint("kill-at:fsync_dir@default:3:2", True, "step-000002", keep_last=1),
}


@pytest.mark.parametrize("point", list(KILL_POINTS), ids=list(KILL_POINTS))
def test_daemon_killed_during_commit_leaves_nothing_partial(
    start_daemon: Callable[..., DaemonProc],
    connect: Callable[..., Client],
    record_property: Callable[[str, object], None],
    point: str,
) -> None:
    kp = KILL_POINTS[point]
    args = ["--workers", "1", *(["--keep-last", str(kp.keep_last)] if kp.keep_last else [])]
    d = start_daemon(*args, faults=kp.fault)
    c = connect(d, **SHARD_ARGS)
    first = c.snapshot(state(1), step=1).wait(30)
    assert first is not None
    run_dir = d.root / "default"

    handle = c.snapshot(state(2), step=2)
    assert d.proc.wait(30) == -9, d.log_text()
    assert "faulty_daemon: SIGKILL" in d.log_text()
    died = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        handle.wait(5)
    assert time.monotonic() - died < 5
    assert e.value.code == "daemon_died"
    assert "daemon died" in str(e.value)

    # Nothing partial is visible: step 2 only once complete, and then it verifies.
    visible = visible_steps(run_dir)
    expected = ["step-000002"] if kp.keep_last else ["step-000001"]
    if kp.step2_visible and not kp.keep_last:
        expected = ["step-000001", "step-000002"]
    # Step 1 was reported committed: it must load bit-exact (unless retention removed it on purpose).
    lost = 0 if kp.keep_last else int(damage(run_dir / "step-000001", 1) is not None)
    record_property("runs", 1)
    record_property("committed", 1)
    record_property("lost", lost)
    assert visible == expected, (visible, leftovers(d.root))
    for name in visible:
        assert damage(run_dir / name, int(name.removeprefix("step-"))) is None
    assert paths.read_latest(run_dir) == kp.latest
    assert ckptd.verify(run_dir / kp.latest) == []
    newest = ckptd.latest(d.root)
    assert newest is not None and newest.name in visible
    assert ckptd.verify(newest) == []

    # A daemon restarted on the same root and socket sweeps the leftovers and serves the client.
    d2 = start_daemon(root=d.root, sock=d.socket)
    assert leftovers(d.root) == [], d2.log_text()
    info = c.snapshot(state(3), step=3).wait(30)
    assert info is not None and info.path == run_dir / "step-000003"
    assert_loads_as(info.path, 3)
    assert paths.read_latest(run_dir) == "step-000003"
    assert d2.proc.poll() is None


# --- I/O errors at the same boundaries ------------------------------------------------------------

EIO_POINTS = {
    "shard-create": "eio-at:create:1:2",
    "index-write": "eio-at:pwrite@*.index.json:1:2",
    "manifest-fsync": "eio-at:fsync@ckptd.json:1:2",
    "component-dirsync": "eio-at:fsync_dir@extra:1:2",
    "seal-dirsync": "eio-at:fsync_dir@step-*:1:2",
    "rename": "eio-at:rename:1:2",
}


@pytest.mark.parametrize("point", list(EIO_POINTS), ids=list(EIO_POINTS))
def test_io_error_before_the_rename_fails_the_snapshot_and_changes_nothing(
    start_daemon: Callable[..., DaemonProc],
    connect: Callable[..., Client],
    record_property: Callable[[str, object], None],
    point: str,
) -> None:
    d = start_daemon("--workers", "1", faults=EIO_POINTS[point])
    c = connect(d, **SHARD_ARGS)
    assert c.snapshot(state(1), step=1).wait(30) is not None
    with pytest.raises(CheckpointError) as e:
        c.snapshot(state(2), step=2).wait(30)
    assert e.value.code == "io_error" and e.value.errno == errno.EIO
    run_dir = d.root / "default"
    record_property("committed", 1)
    record_property("lost", int(damage(run_dir / "step-000001", 1) is not None))
    assert step_dirs(run_dir) == ["step-000001"], "the failed attempt's temp directory is removed"
    assert paths.read_latest(run_dir) == "step-000001"
    assert_loads_as(run_dir / "step-000001", 1)
    info = c.snapshot(state(3), step=3).wait(30)  # the daemon serves on
    assert info is not None
    assert_loads_as(info.path, 3)


@pytest.mark.parametrize(
    "fault",
    ["eio-at:fsync_dir:2:2", "eio-at:create@LATEST*:1:2", "eio-at:rename@LATEST*:1:2"],
    ids=["run-dirsync", "latest-create", "latest-rename"],
)
def test_io_error_after_the_rename_is_committed_or_unpublished(
    start_daemon: Callable[..., DaemonProc],
    connect: Callable[..., Client],
    record_property: Callable[[str, object], None],
    fault: str,
) -> None:
    """An I/O error after step 2 was renamed into place (fsync of the run directory, LATEST).
    Either the handle reports Committed, and then readers see step 2 as the newest checkpoint
    (``ckptd.latest``, ``restore()``), or it reports the failure and step 2 is not published
    (DESIGN §5: a failed attempt is removed), so that the same step can be snapshotted again.
    In both cases no temp file is left behind."""
    d = start_daemon("--workers", "1", faults=fault)
    c = connect(d, **SHARD_ARGS)
    assert c.snapshot(state(1), step=1).wait(30) is not None
    handle = c.snapshot(state(2), step=2)
    run_dir = d.root / "default"
    try:
        handle.wait(30)
    except CheckpointError as e:
        assert e.code == "io_error"
        failed = True
    else:
        failed = False
    record_property("committed", 1 if failed else 2)
    checked = [1] if failed else [1, 2]
    record_property("lost", sum(damage(run_dir / paths.step_dirname(s), s) is not None for s in checked))
    for name in visible_steps(run_dir):
        assert ckptd.verify(run_dir / name) == []
    latest = paths.read_latest(run_dir)
    assert latest is not None and ckptd.verify(run_dir / latest) == []
    assert_loads_as(run_dir / "step-000001", 1)
    if failed:
        assert visible_steps(run_dir) == ["step-000001"], "a snapshot reported failed was left published"
        assert ckptd.latest(d.root) == run_dir / "step-000001"
        retry = c.snapshot(state(2), step=2).wait(30)
        assert retry is not None
    else:
        assert ckptd.latest(d.root) == run_dir / "step-000002", (
            "step 2 was reported committed, but readers are pointed at an older step"
        )
    assert_loads_as(run_dir / "step-000002", 2)
    assert [p.name for p in run_dir.iterdir() if paths.TEMP_MARKER in p.name] == []
    info = c.snapshot(state(3), step=3).wait(30)
    assert info is not None
    assert paths.read_latest(run_dir) == "step-000003"


# --- trainers killed at random moments -----------------------------------------------------------

# One process imports torch once and forks each trainer (a fresh `python` per trainer would spend
# seconds importing torch). A trainer snapshots steps 1, 2, ... of its own run and writes
# "returned N" once snapshot() returned; the parent SIGKILLs it after a random delay.
ZYGOTE = textwrap.dedent(
    """
    import os, random, signal, sys, time
    import torch
    from client import Client

    sock, out, count, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)

    def trainer(i):
        log = os.open(f"{out}/{i}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        c = Client.connect(sock, autostart=False, run=f"t{i}")
        for step in range(1, 10_000):
            g = torch.Generator().manual_seed(i * 10_000 + step)
            c.snapshot({"model": {"w": torch.randn(128, 128, generator=g)}, "step": step}, step=step)
            os.write(log, f"returned {step}\\n".encode())

    for i in range(count):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                trainer(i)
            except BaseException as e:
                code = 3
                print(f"trainer {i}: {e!r}", file=sys.stderr, flush=True)
            os._exit(code)
        time.sleep(rng.uniform(0.05, 1.0))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != -signal.SIGKILL:
            sys.exit(f"trainer {i} exited with {os.waitstatus_to_exitcode(status)} before the kill")
    """
)
TRAINERS = 20


@pytest.mark.slow
def test_trainers_killed_at_random_moments_lose_no_returned_snapshot(
    start_daemon: Callable[..., DaemonProc],
    connect: Callable[..., Client],
    workdir: Path,
    record_property: Callable[[str, object], None],
) -> None:
    d = start_daemon(faults="slow:0.05")  # every pwrite sleeps: snapshots are in flight at the kill
    out = workdir / "trainers"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", ZYGOTE, str(d.socket), str(out), str(TRAINERS), "20240601"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    observer = connect(d)
    wait_until(lambda: observer.status().jobs == [], timeout_s=60, what="daemon idle")

    returned = 0
    lost: list[str] = []
    for i in range(TRAINERS):
        log = out / f"{i}.log"
        steps = [int(line.split()[1]) for line in log.read_text().splitlines()] if log.exists() else []
        returned += len(steps)
        run_dir = d.root / f"t{i}"
        for step in steps:
            path = run_dir / paths.step_dirname(step)
            if not path.is_dir() or ckptd.verify(path) != []:
                lost.append(f"t{i}/{path.name}")
                continue
            g = torch.Generator().manual_seed(i * 10_000 + step)
            loaded = ckptd.load(path)
            if loaded["step"] != step or not same_bits(
                loaded["model"]["w"], torch.randn(128, 128, generator=g)
            ):
                lost.append(f"t{i}/{path.name} (content)")
        for name in visible_steps(run_dir):  # also snapshots not reported returned: never partial
            assert ckptd.verify(run_dir / name) == [], name
    record_property("runs", TRAINERS)
    record_property("committed", returned)
    record_property("lost", len(lost))
    assert lost == []
    assert returned >= TRAINERS // 2, "most trainers should have returned at least one snapshot"
    assert observer.status().failed == 0, d.log_text()
