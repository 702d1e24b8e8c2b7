"""The hand-off from trainer to daemon under faults: a dead peer, idle connections, huge layouts.

- A trainer SIGKILLed while the daemon is stopped (SIGSTOP): every snapshot whose ``snapshot()``
  returned is in the socket, and the daemon, resumed, must read and commit all of them although
  every reply to that trainer fails (EPIPE).
- Connections that never say hello are closed after the hello timeout; a client over the
  connection limit is told ``too_many_clients``, not reset.
- A client registering a layout of hundreds of thousands of tensors does not stall the daemon's
  event loop: another client commits a small snapshot meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import DaemonProc
from helpers import same_bits

import ckptd
from ckptd import paths
from ckptd.protocol import (
    PROTOCOL_VERSION,
    Failed,
    FrameReader,
    Hello,
    decode_daemon,
    encode,
    encode_register_layout,
)
from client import CheckpointError, Client

# --- item 1: a trainer killed before the daemon read what it handed over ------------------------

TRAINER = textwrap.dedent(
    """
    import sys, torch
    from client import Client
    sock, steps = sys.argv[1], int(sys.argv[2])
    c = Client.connect(sock, autostart=False, slots=steps, run="killed")
    print("connected", flush=True)
    sys.stdin.readline()  # the daemon is stopped now
    for step in range(1, steps + 1):
        g = torch.Generator().manual_seed(step)
        c.snapshot({"model": {"w": torch.randn(64, 64, generator=g)}, "step": step}, step=step)
        print("returned", step, flush=True)
    sys.stdin.readline()  # SIGKILLed while waiting here
    """
)


def test_snapshots_returned_before_the_trainer_died_are_committed(
    start_daemon: Callable[..., DaemonProc],
) -> None:
    """Each step in its own slot, so a ``RegisterArena`` + descriptor precedes each ``Snapshot``
    (a read stops at each descriptor): the daemon, resumed after the trainer is gone, fails to
    reply (EPIPE) yet must read on until EOF and commit every step."""
    d = start_daemon()
    steps = 3
    with subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(d.socket), str(steps)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as trainer:
        watchdog = threading.Timer(60, trainer.kill)  # no read below can hang the test
        watchdog.start()
        assert trainer.stdout is not None and trainer.stdin is not None
        assert trainer.stdout.readline().strip() == "connected"
        d.proc.send_signal(signal.SIGSTOP)
        try:
            trainer.stdin.write("go\n")
            trainer.stdin.flush()
            returned = [trainer.stdout.readline().split() for _ in range(steps)]
            assert returned == [["returned", str(s)] for s in range(1, steps + 1)]
            trainer.kill()
            trainer.wait(30)
        finally:
            d.proc.send_signal(signal.SIGCONT)
            watchdog.cancel()
    run_dir = d.root / "killed"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(
        (run_dir / paths.step_dirname(s)).is_dir() for s in range(1, steps + 1)
    ):
        time.sleep(0.05)
    for step in range(1, steps + 1):
        path = run_dir / paths.step_dirname(step)
        assert path.is_dir(), f"step {step} was handed over but not committed:\n{d.log_text()}"
        assert ckptd.verify(path) == []
        loaded = ckptd.load(path)
        g = torch.Generator().manual_seed(step)
        assert loaded["step"] == step
        assert same_bits(loaded["model"]["w"], torch.randn(64, 64, generator=g))
    assert "send failed" in d.log_text() or "replies" in d.log_text()


# --- item 10: idle connections and the connection limit -----------------------------------------


def _idle(sock_path: Path, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.connect(str(sock_path))
        out.append(s)
    return out


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def _closed_by_daemon(s: socket.socket, timeout_s: float) -> list[str]:
    """Read until EOF; the kinds of the frames the daemon sent before closing."""
    s.settimeout(timeout_s)
    frames = FrameReader()
    kinds = []
    while True:
        try:
            data = s.recv(1 << 16)
        except ConnectionResetError:
            data = b""
        if not data:
            return kinds
        kinds += [decode_daemon(b).kind for b in frames.feed(data)]


def test_idle_connections_time_out_and_clients_over_the_limit_are_told(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client], sockets: list[socket.socket]
) -> None:
    limit, hello_s = 8, 1.0
    d = start_daemon(faults=f"connections:{limit}:{hello_s}")
    sockets += _idle(d.socket, limit)  # never say hello: the daemon is full
    time.sleep(0.3)
    with pytest.raises(CheckpointError) as e:
        Client.connect(d.socket, autostart=False)
    assert e.value.code == "too_many_clients", e.value
    assert "close" in str(e.value)
    # The idle ones are closed once the hello timeout has passed; a real client gets in then.
    started = time.monotonic()
    for s in sockets:
        assert _closed_by_daemon(s, timeout_s=10) == ["failed"]
    assert time.monotonic() - started < hello_s + 2
    c = connect(d)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(32, 32, generator=g)
    h = c.snapshot({"model": {"w": w}}, step=1)
    h.wait(30)
    assert same_bits(ckptd.load(h.path)["model"]["w"], w)
    # Clients that said hello count too: with the limit reached again, the next one is told.
    sockets += _idle(d.socket, limit - 1)
    time.sleep(0.3)
    with pytest.raises(CheckpointError) as e:
        Client.connect(d.socket, autostart=False)
    assert e.value.code == "too_many_clients"
    h = c.snapshot({"model": {"w": w}}, step=2)
    h.wait(30)
    assert ckptd.verify(h.path) == []


# --- item 11: a huge layout does not stall other clients ----------------------------------------

BIG_TENSORS = 150_000


def _big_layout_frame(n: int) -> bytes:
    tensors = [
        {"name": f"l.{i}.w", "dtype": "F32", "shape": [4], "start": 16 * i, "end": 16 * i + 16}
        for i in range(n)
    ]
    comps = [
        {"name": "model", "shards": [{"offset": 0, "nbytes": 16 * n, "tensors": tensors}], "aliases": {}}
    ]
    return encode_register_layout(1, json.dumps(comps, separators=(",", ":")).encode())


def test_a_huge_layout_does_not_stall_other_clients(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon()
    c = connect(d)
    w = torch.arange(256, dtype=torch.float32)
    c.snapshot({"model": {"w": w}}, step=0).wait(30)  # arenas and layout registered already
    frame = _big_layout_frame(BIG_TENSORS)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    raw.settimeout(60)
    try:
        raw.connect(str(d.socket))
        raw.sendall(encode(Hello(version=PROTOCOL_VERSION, pid=os.getpid())))
        frames = FrameReader()
        while not (got := frames.feed(raw.recv(1 << 16))):
            pass
        assert decode_daemon(got[0]).kind == "welcome"
        sender = threading.Thread(target=raw.sendall, args=(frame,), daemon=True)
        sender.start()
        sender.join(60)
        time.sleep(0.05)  # the daemon now holds the whole layout frame
        started = time.monotonic()
        h = c.snapshot({"model": {"w": w + 1}, "step": 1}, step=1)
        h.wait(30)
        round_trip_s = time.monotonic() - started
        hello_started = time.monotonic()
        connect(d).close()
        hello_s = time.monotonic() - hello_started
        assert same_bits(ckptd.load(h.path)["model"]["w"], w + 1)
        assert round_trip_s < 1.0, f"a small snapshot took {round_trip_s:.2f}s behind a huge layout"
        assert hello_s < 1.0, f"a new connection took {hello_s:.2f}s behind a huge layout"
        # The huge layout itself is registered: the connection goes on (status answers).
        raw.sendall(encode_status())
        raw.settimeout(60)
        while not (got := frames.feed(raw.recv(1 << 16))):
            pass
        assert decode_daemon(got[0]).kind == "status_reply"
        assert not isinstance(decode_daemon(got[0]), Failed)
    finally:
        raw.close()


def encode_status() -> bytes:
    from ckptd.protocol import StatusRequest

    return encode(StatusRequest())
