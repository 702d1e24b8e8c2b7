"""Failures are never silent: they reach wait(), done(), callbacks, or the next snapshot()."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import DaemonProc
from helpers import step_dirs

import ckptd
from client import CheckpointError, Client, SnapshotHandle


def _state(v: float = 1.0) -> dict[str, torch.Tensor]:
    return {"w": torch.full((64, 64), v), "b": torch.arange(10)}


@pytest.mark.parametrize(
    ("fault", "code"),
    [("eio-write", errno.EIO), ("enospc-write", errno.ENOSPC), ("eio-fsync", errno.EIO)],
)
def test_failed_write_raises_everywhere_and_leaves_older_checkpoints(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client], fault: str, code: int
) -> None:
    d = start_daemon(faults=f"{fault}:2")
    c = connect(d)
    first = c.snapshot(_state(1), step=1).wait(30)
    assert first is not None
    seen: list[SnapshotHandle] = []
    handle = c.snapshot(_state(2), step=2, on_done=seen.append)
    with pytest.raises(CheckpointError) as e:
        handle.wait(30)
    assert e.value.errno == code and e.value.code == "io_error"
    assert errno.errorcode[code] in str(e.value)
    with pytest.raises(CheckpointError):
        asyncio.run(handle.done())
    assert seen == [handle] and isinstance(handle.error, CheckpointError)
    run_dir = d.root / "default"
    assert step_dirs(run_dir) == ["step-000001"], "no temp directory or partial step is left"
    assert ckptd.latest(d.root) == run_dir / "step-000001"
    assert ckptd.verify(run_dir / "step-000001") == []
    # The daemon keeps serving.
    assert c.snapshot(_state(3), step=3).wait(30) is not None
    assert ckptd.latest(d.root) == run_dir / "step-000003"


def test_unobserved_failure_is_raised_by_the_next_snapshot_once(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon(faults="eio-write:2")
    c = connect(d)
    handle = c.snapshot(_state(), step=2)
    deadline = time.monotonic() + 30
    while not handle.done_now() and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(CheckpointError, match=r"step 2 .* failed and nobody checked"):
        c.snapshot(_state(), step=3)
    assert c.snapshot(_state(), step=4).wait(30) is not None, "raised once, not forever"


def test_callback_gets_the_committed_path(client: Client) -> None:
    paths: list[Path | None] = []
    handle = client.snapshot(_state(), step=5, on_done=lambda h: paths.append(h.path))
    info = handle.wait(30)
    assert info is not None and handle.path == info.path
    deadline = time.monotonic() + 5
    while not paths and time.monotonic() < deadline:
        time.sleep(0.01)
    assert paths == [client.root / "default" / "step-000005"]
    late: list[Path | None] = []
    handle.add_done_callback(lambda h: late.append(h.path))  # already done: called at once
    assert late == [info.path]
    assert asyncio.run(handle.done()) == info


def test_daemon_death_fails_pending_snapshots_fast_and_shows_nothing_partial(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon("--workers", "1", faults="slow:1.0")
    c = connect(d, max_shard_size="4KB")
    handle = c.snapshot({f"t{i}": torch.randn(32, 32) for i in range(8)}, step=1)
    time.sleep(0.5)  # the daemon is inside the write
    d.kill()
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="daemon") as e:
        handle.wait(5)
    assert time.monotonic() - t0 < 5
    assert e.value.code == "daemon_died"
    run_dir = d.root / "default"
    assert [n for n in step_dirs(run_dir) if ".ckptd-tmp-" not in n] == []
    assert ckptd.latest(d.root) is None
    with pytest.raises(CheckpointError, match="no ckptd daemon answers"):
        c.snapshot(_state(), step=2)
    # A daemon back on the socket: the client reconnects, re-registers its arenas and goes on;
    # the restarted daemon sweeps the dead one's temp directory.
    d2 = start_daemon(root=d.root, sock=d.socket)
    assert c.snapshot(_state(), step=2).wait(30) is not None
    assert step_dirs(run_dir) == ["step-000002"]
    assert d2.proc.poll() is None


def test_snapshot_of_an_existing_step_fails_clearly(client: Client) -> None:
    client.snapshot(_state(), step=1).wait(30)
    with pytest.raises(CheckpointError, match="already committed"):
        client.snapshot(_state(), step=1).wait(30)


def test_in_flight_snapshots_are_resubmitted_from_the_arenas_after_a_daemon_death(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon("--workers", "1", faults="slow:1.0")
    c = connect(d, max_shard_size="4KB")
    state = {f"t{i}": torch.randn(32, 32) for i in range(4)}
    expected = {k: v.clone() for k, v in state.items()}
    handle = c.snapshot(state, step=1)
    for v in state.values():  # the trainer moves on; only the arena still holds step 1
        v.zero_()
    time.sleep(0.3)
    d.kill()
    with pytest.raises(CheckpointError, match="resubmit"):
        handle.wait(5)
    start_daemon(root=d.root, sock=d.socket)
    (again,) = c.resubmit()
    info = again.wait(60)
    assert info is not None and info.step == 1
    loaded = ckptd.load(info.path)["model"]
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k
    assert c.resubmit() == [], "each snapshot is resubmitted once"


def test_resubmit_skips_a_snapshot_whose_slot_was_reused(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon("--workers", "1", faults="slow:1.0")
    c = connect(d, slots=1)
    handle = c.snapshot({"w": torch.ones(8)}, step=1)
    time.sleep(0.3)
    d.kill()
    with pytest.raises(CheckpointError):
        handle.wait(5)
    start_daemon(root=d.root, sock=d.socket)
    with pytest.raises(CheckpointError, match="discard_lost"):  # step 1's slot is never overwritten
        c.snapshot({"w": torch.full((8,), 2.0)}, step=2)
    assert c.discard_lost() == [handle]
    c.snapshot({"w": torch.full((8,), 2.0)}, step=2).wait(60)  # reuses the only slot
    assert c.resubmit() == []


def test_a_lost_connection_never_lets_the_next_snapshot_overwrite_bytes_being_written(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon("--workers", "1", faults="slow:0.15")
    c = connect(d, slots=1, max_shard_size="4KB")
    first = {f"t{i}": torch.full((32, 32), 1.0) for i in range(4)}
    handle = c.snapshot(first, step=1)
    # Break this connection while the daemon, alive, is still writing step 1 from the slot.
    assert c._channel is not None
    c._channel.send_bytes(b"\x00\x00\x00\x02{}")
    with pytest.raises(CheckpointError) as e:
        handle.wait(10)
    assert e.value.code == "daemon_died"
    second = {f"t{i}": torch.full((32, 32), 2.0) for i in range(4)}
    info = c.snapshot(second, step=2).wait(60)  # must wait for the slot, not overwrite it
    assert info is not None
    step1 = ckptd.load(d.root / "default" / "step-000001")["model"]
    assert all(torch.equal(v, first[k]) for k, v in step1.items()), "step 1 is not torn"
    assert c.resubmit() == [], "step 1 was committed by the daemon after all"
