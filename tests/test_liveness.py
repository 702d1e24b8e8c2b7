"""A hung, stopped or stuck daemon never hangs training (issue 10, items 4, 10, 12, 14, 15, 18).

The daemon's event loop sends a ``Heartbeat`` every second with the progress of each in-flight
snapshot of the connection. A daemon that sends nothing for ``liveness_timeout_s`` (SIGSTOPped
here) fails pending handles with ``daemon_unresponsive``; a snapshot whose progress does not
move for ``stuck_timeout_s`` while heartbeats go on (a write blocked in the storage layer) fails
with ``daemon_stuck`` naming its stage. Every wait a user can make (``wait()``,
``snapshot(policy="block")``, ``close()``, ``Client.connect``) returns within those bounds with
an error saying what was stuck.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from conftest import DaemonProc
from helpers import wait_until

import ckptd
from ckptd.protocol import Failed, FrameReader, Heartbeat, decode_daemon, encode
from client import CheckpointError, Client, SnapshotHandle
from client.channel import Channel

T = TypeVar("T")
FAST = {"liveness_timeout_s": 1.5, "stuck_timeout_s": 3.0}


def _state(v: float = 1.0, n: int = 4) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((32, 32), v + i) for i in range(n)}


@contextmanager
def stopped(d: DaemonProc) -> Iterator[None]:
    """SIGSTOP the daemon; SIGCONT it whatever happens."""
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)


def bounded(fn: Callable[[], T], timeout_s: float) -> tuple[T | None, BaseException | None, float]:
    """Run ``fn`` on a thread; its result or exception and how long it took. Fails the test (instead
    of hanging it) if ``fn`` is still running after ``timeout_s``."""
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            err.append(e)

    t0 = time.monotonic()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        pytest.fail(f"still blocked after {timeout_s} s")
    return (out[0] if out else None), (err[0] if err else None), time.monotonic() - t0


# --- item 4: a stopped daemon ----------------------------------------------------------------


def test_wait_on_a_stopped_daemon_fails_within_the_liveness_bound(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon("--workers", "1", faults="slow:1.0")
    c = connect(d, max_shard_size="4KB", **FAST)
    handle = c.snapshot(_state(), step=1)
    with stopped(d):
        _, err, took = bounded(handle.wait, 15)
    assert isinstance(err, CheckpointError), err
    assert err.code == "daemon_unresponsive"
    assert f"pid {d.proc.pid}" in str(err) and "resubmit()" in str(err), str(err)
    assert took < FAST["liveness_timeout_s"] + 3


def test_blocking_snapshot_with_every_slot_in_flight_fails_when_the_daemon_stops(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon("--workers", "1", faults="slow:1.0")
    c = connect(d, slots=1, max_shard_size="4KB", **FAST)
    first = c.snapshot(_state(), step=1)
    with stopped(d):
        _, err, took = bounded(lambda: c.snapshot(_state(2), step=2, policy="block"), 15)
        assert isinstance(err, CheckpointError), err
        assert err.code == "daemon_unresponsive", str(err)
        assert took < FAST["liveness_timeout_s"] + 3
        assert first.error is not None and first.error.code == "daemon_unresponsive"


def test_close_on_a_stopped_daemon_returns_within_the_bound(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon("--workers", "1", faults="slow:1.0")
    c = connect(d, max_shard_size="4KB", **FAST)
    c.snapshot(_state(), step=1)
    with stopped(d):
        _, err, took = bounded(c.close, 15)
    assert took < FAST["liveness_timeout_s"] + 3
    assert isinstance(err, CheckpointError) and err.code == "daemon_unresponsive", err


# --- item 4: a daemon whose writes are stuck -------------------------------------------------


def test_a_write_stuck_in_storage_fails_with_daemon_stuck_while_heartbeats_go_on(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon(faults="hang-write:2")
    # Silence would be reported after 1.5 s: a daemon_stuck after 3 s shows heartbeats went on.
    # One shard per snapshot: the stuck one holds one of the four writer threads.
    c = connect(d, **FAST)
    assert c.snapshot(_state(), step=1).wait(30) is not None
    handle = c.snapshot(_state(2), step=2)
    _, err, took = bounded(handle.wait, 20)
    assert isinstance(err, CheckpointError), err
    assert err.code == "daemon_stuck", str(err)
    assert "stage 'writing'" in str(err) and "bytes written" in str(err), str(err)
    assert took < FAST["stuck_timeout_s"] + 4
    # The daemon's loop lives: it answers, lists the stuck job, and commits other work.
    jobs = c.status().jobs
    assert [(j.step, j.stage) for j in jobs] == [(2, "writing")]
    assert c.snapshot(_state(5), step=5, run="other").wait(30) is not None
    assert (d.root / "default" / "step-000002").exists() is False


def test_blocking_snapshot_behind_a_stuck_write_raises_daemon_stuck(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon(faults="hang-write:2")
    c = connect(d, slots=1, **FAST)
    stuck = c.snapshot(_state(2), step=2)
    with pytest.raises(CheckpointError) as e:
        stuck.wait(20)
    assert e.value.code == "daemon_stuck"
    # The daemon may still write step 2 from the only slot: block must not overwrite it, nor
    # wait forever for it.
    _, err, took = bounded(lambda: c.snapshot(_state(3), step=3, policy="block"), 20)
    assert isinstance(err, CheckpointError) and err.code == "daemon_stuck", err
    assert "step 2 of run 'default' at stage 'writing'" in str(err), str(err)
    assert took < FAST["stuck_timeout_s"] + 4


def test_heartbeats_come_every_second_with_the_connections_jobs(
    start_daemon: Callable[..., DaemonProc],
) -> None:
    d = start_daemon()
    ch = Channel.open(d.socket)
    try:
        first = ch.last_frame
        frames = FrameReader()
        ch.sock.settimeout(5)
        data = ch.sock.recv(1 << 16)
        (body,) = frames.feed(data)
        beat = decode_daemon(body)
        assert isinstance(beat, Heartbeat) and beat.jobs == []
        assert 0.5 < time.monotonic() - first < 3
    finally:
        ch.close()


def test_a_slow_but_progressing_write_is_not_failed(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    # One 24 MiB shard written as six 4 MiB chunks of 0.6 s each: 3.6 s, longer than
    # stuck_timeout_s, but its progress moves every 0.6 s.
    d = start_daemon("--workers", "1", faults="slow:0.6")
    c = connect(d, liveness_timeout_s=1.5, stuck_timeout_s=1.2)
    big = {"w": torch.arange(6 * 2**20, dtype=torch.float32)}
    info = c.snapshot(big, step=1).wait(60)
    assert info is not None and info.durable_s > 1.2 * 2
    assert torch.equal(ckptd.load(info.path)["model"]["w"], big["w"])


# --- item 14: errors that say what happened --------------------------------------------------


def test_close_with_a_timeout_says_it_stopped_waiting_not_that_the_daemon_died(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon("--workers", "1", faults="slow:1.0")
    c = connect(d, max_shard_size="4KB", liveness_timeout_s=60)
    handle = c.snapshot(_state(), step=1)
    with stopped(d):
        _, err, took = bounded(lambda: c.close(timeout_s=1), 10)
        assert took < 4
    assert handle.error is not None, "the handle is failed, not left pending"
    assert handle.error.code == "closed", str(handle.error)
    message = str(handle.error)
    assert "close() stopped waiting after 1 s" in message and f"pid {d.proc.pid}" in message, message
    assert "may still commit" in message
    # ...and it does: the daemon, continued, commits what it was handed.
    wait_until((d.root / "default" / "step-000001" / "ckptd.json").exists, 30, "commit")
    assert isinstance(err, CheckpointError) and err.code == "closed"


def test_connect_to_a_stopped_daemon_raises_checkpoint_error_naming_the_socket(
    daemon: DaemonProc,
) -> None:
    with stopped(daemon):
        _, err, took = bounded(
            lambda: Client.connect(daemon.socket, autostart=False, connect_timeout_s=1.5), 10
        )
    assert isinstance(err, CheckpointError), repr(err)
    assert err.code == "daemon_unresponsive"
    assert str(daemon.socket) in str(err) and "1.5 s" in str(err) and str(daemon.proc.pid) in str(err)
    assert took < 5


def _fake_daemon(path: Path, reply: bytes) -> threading.Thread:
    """A listener that reads a hello, answers ``reply`` (maybe nothing) and closes."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                if reply:
                    conn.sendall(reply)
                # close with the hello unread: the client sees a reset

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("refusal", ["failed", "reset"])
def test_a_refused_connection_is_a_checkpoint_error(workdir: Path, refusal: str) -> None:
    path = workdir / "fake.sock"
    reply = b""
    if refusal == "failed":
        reply = encode(Failed(id=None, code="too_many_clients", message="ckptd serves 1024 clients already"))
    t = _fake_daemon(path, reply)
    _, err, _ = bounded(lambda: Client.connect(path, autostart=False, connect_timeout_s=5), 10)
    t.join(5)
    assert isinstance(err, CheckpointError), repr(err)
    assert str(path) in str(err)
    if refusal == "failed":
        assert err.code == "too_many_clients" and "1024 clients" in str(err)
    else:
        assert err.code == "refused", str(err)


# --- item 12: an earlier failure does not drop the new snapshot -------------------------------


def test_an_unobserved_failure_is_raised_with_the_new_snapshot_taken(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon(faults="eio-write:2")
    c = connect(d)
    failed = c.snapshot(_state(2), step=2)
    wait_until(failed.done_now, 30, "step 2 failed")
    with pytest.raises(CheckpointError, match=r"step 2 .* failed and nobody checked") as e:
        c.snapshot(_state(3), step=3)
    new = e.value.handle
    assert isinstance(new, SnapshotHandle) and new.step == 3
    info = new.wait(30)
    assert info is not None
    loaded = ckptd.load(info.path)["model"]
    assert all(torch.equal(loaded[k], v) for k, v in _state(3).items())


# --- item 15: a lost snapshot's slot is kept until resubmitted or dropped ----------------------


def test_a_snapshot_lost_with_the_daemon_keeps_its_slot_for_resubmit(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon("--workers", "1", faults="slow:1.0")
    c = connect(d, slots=2, max_shard_size="4KB")
    lost = c.snapshot(_state(1), step=1)
    time.sleep(0.3)
    d.kill()
    with pytest.raises(CheckpointError) as e:
        lost.wait(5)
    assert e.value.code == "daemon_died"
    start_daemon(root=d.root, sock=d.socket)
    # The next snapshots use the other slot: step 1's bytes stay for resubmit().
    for step in (2, 3):
        assert c.snapshot(_state(step), step=step).wait(60) is not None
    (again,) = c.resubmit()
    info = again.wait(60)
    assert info is not None and info.step == 1
    loaded = ckptd.load(info.path)["model"]
    assert all(torch.equal(loaded[k], v) for k, v in _state(1).items()), "step 1's own bytes"


def test_when_every_slot_holds_a_lost_snapshot_snapshot_says_what_to_do(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon("--workers", "1", faults="slow:1.0")
    c = connect(d, slots=1, max_shard_size="4KB")
    lost = c.snapshot(_state(1), step=1)
    time.sleep(0.3)
    d.kill()
    with pytest.raises(CheckpointError):
        lost.wait(5)
    start_daemon(root=d.root, sock=d.socket)
    for policy in ("block", "skip", "error"):
        with pytest.raises(CheckpointError, match=r"resubmit\(\).*discard_lost\(\)") as e:
            c.snapshot(_state(2), step=2, policy=policy)  # type: ignore[arg-type]
        assert e.value.code == "lost_snapshots"
    assert c.discard_lost() == [lost]
    assert c.snapshot(_state(2), step=2).wait(60) is not None
    assert c.resubmit() == []


# --- item 18: skip and error never wait behind another thread ----------------------------------


def test_skip_and_error_do_not_block_behind_another_threads_blocked_snapshot(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon("--workers", "1", faults="slow:0.5")
    c = connect(d, slots=1, max_shard_size="4KB")
    first = c.snapshot(_state(1), step=1)
    blocked: list[SnapshotHandle] = []
    a = threading.Thread(target=lambda: blocked.append(c.snapshot(_state(2), step=2)), daemon=True)
    a.start()
    time.sleep(0.3)  # thread A now waits for the slot
    assert a.is_alive()
    _, err, took = bounded(lambda: c.snapshot(_state(3), step=3, policy="error"), 10)
    assert isinstance(err, CheckpointError) and err.code == "busy", err
    assert took < 1.0
    skipped, err, took = bounded(lambda: c.snapshot(_state(3), step=3, policy="skip"), 10)
    assert err is None and skipped is not None and skipped.skipped and took < 1.0
    a.join(60)
    assert first.wait(60) is not None and blocked and blocked[0].wait(60) is not None


# --- review: sends bounded, a lost slot never reused while its request may still be read -----


def test_a_send_into_a_stopped_daemon_is_bounded(daemon: DaemonProc, connect: Callable[..., Client]) -> None:
    """A layout of 30,000 tensors (megabytes) does not fit in the socket's buffer: with the daemon
    stopped, the send finds no room. It gives up after ``liveness_timeout_s`` without progress;
    it neither blocks the training thread forever nor the watchdog that would end it."""
    c = connect(daemon, **FAST)
    c.snapshot(_state(), step=1).wait(30)
    big = {f"t{i}": torch.zeros(2) for i in range(30_000)}
    with stopped(daemon):
        _, err, took = bounded(lambda: c.snapshot(big, step=2), 20)
    assert isinstance(err, CheckpointError), err
    assert err.code == "daemon_unresponsive", str(err)
    assert f"pid {daemon.proc.pid}" in str(err) and "read nothing" in str(err), str(err)
    assert took < FAST["liveness_timeout_s"] + 5
    # The daemon is back: the next snapshot reconnects (the stream of the old one was cut mid-frame).
    info = c.snapshot(big, step=3).wait(60)
    assert torch.equal(ckptd.load(info.path)["model"]["t29999"], big["t29999"])


def test_a_lost_slot_is_not_reused_while_the_daemon_may_still_read_its_request(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    """Step 1 is handed over while the daemon is stopped; the client gives the connection up as
    unresponsive. Resumed, the daemon still reads step 1's request from that connection, slowly
    (``slow-snapshot``: as behind a huge layout), while it answers the client's new connection at
    once. Dropping the lost step and taking step 2 in the only slot must wait until the daemon has
    read the old connection to its end: otherwise step 1 is committed with step 2's bytes, under
    checksums that verify."""
    d = start_daemon(faults="slow-snapshot:4:1")
    c = connect(d, slots=1, **FAST)
    note = "x" * 2000  # the Snapshot frame goes to the (slow) layout thread
    state = {"model": {"w": torch.full((4096,), 0.0)}, "note": note}
    c.snapshot(state, step=0).wait(30)  # arena and layout registered: step 1 sends one small frame
    state["model"]["w"].fill_(1.0)
    with stopped(d):
        first = c.snapshot(state, step=1)
        _, err, _ = bounded(lambda: first.wait(15), 20)
        assert isinstance(err, CheckpointError) and err.code == "daemon_unresponsive", err
    c.discard_lost()
    state["model"]["w"].fill_(2.0)
    second, err, _ = bounded(lambda: c.snapshot(state, step=2).wait(60), 70)
    assert err is None, err
    assert second is not None
    assert torch.equal(ckptd.load(second.path)["model"]["w"], torch.full((4096,), 2.0))
    step1 = d.root / "default" / "step-000001"
    wait_until((step1 / "ckptd.json").exists, timeout_s=30)
    assert ckptd.verify(step1) == []
    assert torch.equal(ckptd.load(step1)["model"]["w"], torch.full((4096,), 1.0))


def test_sends_stay_bounded_in_a_trainer_with_descriptors_past_1024(
    daemon: DaemonProc, connect: Callable[..., Client]
) -> None:
    """Data loaders and logs leave a trainer's sockets numbered past 1024, where ``select`` fails:
    waiting for room to send must still work there."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1300:
        pytest.skip(f"the descriptor limit ({hard}) is too low to reach 1024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
    held = []
    try:
        while len(held) < 1100:
            held.append(os.open("/dev/null", os.O_RDONLY))
        c = connect(daemon, **FAST)
        assert c._channel is not None and c._channel.sock.fileno() > 1024
        c.snapshot(_state(), step=1).wait(30)
        big = {f"t{i}": torch.zeros(2) for i in range(30_000)}
        with stopped(daemon):
            _, err, took = bounded(lambda: c.snapshot(big, step=2), 20)
        assert isinstance(err, CheckpointError) and err.code == "daemon_unresponsive", err
        assert took < FAST["liveness_timeout_s"] + 5
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
