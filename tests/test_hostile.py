"""Hostile and broken clients against a real daemon over a raw Unix socket.

Frames are built with ``ckptd.protocol.encode`` or by hand, descriptors sent with
``socket.send_fds``. For every case the daemon answers ``Failed`` (with a named code) or closes
that connection, keeps serving other clients (a normal ``Client`` commits afterwards), keeps its
descriptor count flat, and writes nothing outside its root (a sibling directory, the target of
planted symlinks, is fingerprinted before and after).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import itertools
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DaemonProc, wait_for_socket
from helpers import step_dirs, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptd
from ckptd import paths
from ckptd.protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Accepted,
    Committed,
    ComponentEntry,
    DaemonMessage,
    Failed,
    FrameReader,
    Hello,
    Message,
    RegisterArena,
    RegisterLayout,
    ReleaseArena,
    ShardEntry,
    Snapshot,
    StatusReply,
    StatusRequest,
    TensorEntry,
    decode_daemon,
    encode,
)
from client import CheckpointError, Client

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
STEPS = itertools.count(1)  # one daemon serves the module: every snapshot takes a new step
ARENA_BYTES = 8192
WEIGHT = bytes(range(256)) * 4  # the 1024 bytes of tensor "w" (256 x F32) at offset 0

# --- a raw client ----------------------------------------------------------------------------------


class Raw:
    """One connection to the daemon that speaks frames directly."""

    opened: list[Raw] = []  # closed after each test by the autouse fixture below  # noqa: RUF012

    def __init__(self, sock_path: Path, timeout_s: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        Raw.opened.append(self)
        self.sock.settimeout(timeout_s)
        self.sock.connect(str(sock_path))
        self._frames = FrameReader()
        self._queue: list[DaemonMessage] = []
        self.eof = False

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        if fds:
            sent = socket.send_fds(self.sock, [data], list(fds))
            if sent < len(data):
                self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)

    def msg(self, message: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        self.send(encode(message), fds)

    def hello(self) -> None:
        self.msg(Hello(version=PROTOCOL_VERSION, pid=os.getpid()))
        assert self.recv().kind == "welcome"

    def recv(self) -> DaemonMessage:
        """The next reply; ``EOFError`` once the daemon closed the connection."""
        while not self._queue:
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                raise EOFError("the daemon closed the connection")
            replies = (decode_daemon(body) for body in self._frames.feed(data))
            self._queue += [m for m in replies if m.kind != "heartbeat"]  # sent every second
        return self._queue.pop(0)

    def until(self, want: Callable[[DaemonMessage], bool]) -> DaemonMessage:
        while True:
            m = self.recv()
            if want(m):
                return m

    def drain(self) -> list[DaemonMessage]:
        """Every reply until the daemon closes the connection (after we stop sending)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = []
        try:
            while True:
                out.append(self.recv())
        except EOFError:
            return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(autouse=True)
def _close_raw_connections() -> Iterator[None]:
    yield
    while Raw.opened:
        Raw.opened.pop().close()


def refused(raw: Raw, code: str) -> Failed:
    """The connection-level Failed with ``code``, after which the daemon closes the connection."""
    replies = raw.drain()
    failed = [m for m in replies if isinstance(m, Failed) and m.id is None]
    assert failed and failed[-1].code == code, replies
    assert raw.eof
    return failed[-1]


def memfd(size: int = ARENA_BYTES, seals: int = SEALS, data: bytes = WEIGHT) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if data:
        os.pwrite(fd, data[:size], 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def tensor(
    name: str = "w", dtype: str = "F32", shape: list[int] | None = None, start: int = 0, end: int = 1024
) -> TensorEntry:
    return TensorEntry(
        name=name, dtype=dtype, shape=shape if shape is not None else [256], start=start, end=end
    )


def snapshot(
    *,
    id: int = 1,
    run: str = "r",
    step: int | None = None,
    arena: int = 1,
    component: str = "model",
    offset: int = 0,
    nbytes: int = 1024,
    tensors: list[TensorEntry] | None = None,
    files: dict[str, str] | None = None,
    aliases: dict[str, str] | None = None,
) -> Snapshot:
    ts = tensors if tensors is not None else [tensor()]
    return Snapshot(
        id=id,
        run=run,
        step=next(STEPS) if step is None else step,
        arena=arena,
        components=[
            ComponentEntry(
                name=component,
                shards=[ShardEntry(offset=offset, nbytes=nbytes, tensors=ts)],
                aliases=aliases or {},
            )
        ],
        tree={"$dict": {component: {"$module": component, "keys": [t.name for t in ts]}}},
        files=files or {},
    )


def registered(d: DaemonProc, size: int = ARENA_BYTES) -> Raw:
    """A connection that said hello and registered arena 1."""
    raw = Raw(d.socket)
    raw.hello()
    fd = memfd(size)
    try:
        raw.msg(RegisterArena(arena=1, size=size), fds=[fd])
    finally:
        os.close(fd)
    return raw


def failed_snapshot(raw: Raw, req: Snapshot, code: str = "invalid_request") -> Failed:
    raw.msg(req)
    m = raw.until(lambda m: isinstance(m, Failed | Committed) and getattr(m, "id", None) == req.id)
    assert isinstance(m, Failed), m
    assert m.code == code, m
    return m


# --- what must hold after every case ---------------------------------------------------------------


def fingerprint(top: Path) -> dict[str, str]:
    out = {}
    for p in sorted(top.rglob("*")):
        rel = str(p.relative_to(top))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def daemon_fds(d: DaemonProc) -> int:
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


@dataclass
class Hostile:
    d: DaemonProc
    outside: Path
    connect: Callable[..., Client]
    before: dict[str, str]
    fds: int
    steps: set[Path]

    def serves(self, *, idle: bool = True) -> None:
        """The daemon is alive, serves a normal client, wrote nothing outside its root, and (when
        ``idle``: the hostile connections are gone) holds no more descriptors than before."""
        assert self.d.proc.poll() is None, self.d.log_text()
        c = self.connect(self.d, run="normal")
        info = c.snapshot({"w": torch.arange(10.0)}, step=next(STEPS)).wait(30)
        assert info is not None and ckptd.verify(info.path) == []
        c.close()
        assert fingerprint(self.outside) == self.before, "the daemon wrote outside its root"
        if idle:
            wait_until(
                lambda: daemon_fds(self.d) <= self.fds, timeout_s=10, what="daemon fds back to baseline"
            )
        for path in committed(self.d.root) - self.steps:  # nothing partial was published
            assert ckptd.verify(path) == [], path


def committed(root: Path) -> set[Path]:
    """Every step directory (by name) under every real run directory of ``root``."""
    return {
        path
        for run_dir in root.iterdir()
        if run_dir.is_dir() and not run_dir.is_symlink()
        for _, path in paths.committed_steps(run_dir)
    }


def make_outside(top: Path) -> Path:
    """A sibling of the root that symlinks point into: the daemon must never change it."""
    outside = top / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("do not touch\n")
    (outside / "step-000001").mkdir()
    (outside / "step-000001" / "ckptd.json").write_text("{}\n")
    return outside


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[DaemonProc, Path]]:
    """One real daemon for the whole module: it must survive every case, one after another."""
    top = Path(tempfile.mkdtemp(prefix="ckptd-h-"))
    root, sock, log = top / "root", top / "d.sock", top / "d.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckptd", "serve", "--root", str(root), "--socket", str(sock)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    d = DaemonProc(proc, sock, root, log)
    try:
        wait_for_socket(sock, proc)
        yield d, make_outside(top)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def hostile(shared: tuple[DaemonProc, Path], connect: Callable[..., Client]) -> Iterator[Hostile]:
    d, outside = shared
    assert d.proc.poll() is None, f"the shared daemon died in an earlier case:\n{d.log_text()}"
    h = Hostile(d, outside, connect, fingerprint(outside), daemon_fds(d), committed(d.root))
    yield h
    h.serves()


# --- a well-formed raw snapshot commits (the baseline the hostile cases deviate from) ------------


def test_raw_snapshot_commits(hostile: Hostile) -> None:
    raw = registered(hostile.d)
    raw.msg(snapshot())
    assert isinstance(raw.recv(), Accepted)
    m = raw.until(lambda m: isinstance(m, Committed | Failed))
    assert isinstance(m, Committed), m
    loaded = ckptd.load(m.path)["model"]["w"]
    assert loaded.numpy().tobytes() == WEIGHT
    raw.close()


# --- frames ----------------------------------------------------------------------------------------


def test_oversized_length_prefix_is_refused(hostile: Hostile) -> None:
    raw = Raw(hostile.d.socket)
    raw.send(struct.pack(">I", MAX_FRAME_BYTES + 1) + b"{")
    assert "exceeds" in refused(raw, "bad_frame").message


def test_max_length_prefix_is_refused(hostile: Hostile) -> None:
    raw = Raw(hostile.d.socket)
    raw.send(b"\xff\xff\xff\xff")
    refused(raw, "bad_frame")


@pytest.mark.parametrize(
    "body",
    [
        b'{"kind": "launch_missiles"}',
        b'{"kind": "welcome", "version": 1, "pid": 1, "root": "/", "max_shard_size": 1}',
        b"[]",
        b"null",
        b"\x00\x01\x02",
        b'{"kind": "hello", "version": 1, "pid": 1, "extra": true}',
        b'{"kind": "hello", "version": 1.0, "pid": 1}',
        b"{" * 100_000,
        b'{"kind": "hello", "version": 1, "pid": 1, "root": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
    ids=["unknown-kind", "daemon-kind", "array", "null", "binary", "extra-field", "float", "deep", "nested"],
)
def test_malformed_first_frame_is_refused(hostile: Hostile, body: bytes) -> None:
    raw = Raw(hostile.d.socket)
    raw.send(struct.pack(">I", len(body)) + body)
    refused(raw, "bad_frame")


@pytest.mark.parametrize(
    "message",
    [
        StatusRequest(),
        RegisterArena(arena=1, size=ARENA_BYTES),
        ReleaseArena(arena=1),
        snapshot(),
    ],
    ids=["status", "register", "release", "snapshot"],
)
def test_messages_before_hello_are_refused(hostile: Hostile, message: Message) -> None:
    raw = Raw(hostile.d.socket)
    fd = memfd() if isinstance(message, RegisterArena) else None
    raw.msg(message, fds=[fd] if fd is not None else [])
    if fd is not None:
        os.close(fd)
    assert "hello" in refused(raw, "bad_frame").message


def test_wrong_protocol_version_is_refused(hostile: Hostile) -> None:
    raw = Raw(hostile.d.socket)
    raw.msg(Hello(version=PROTOCOL_VERSION + 1, pid=1))
    refused(raw, "version_mismatch")


def test_half_frames_and_silent_clients_do_not_block_others(hostile: Hostile) -> None:
    silent = [Raw(hostile.d.socket) for _ in range(20)]
    for i, raw in enumerate(silent):
        raw.send(encode(Hello(version=PROTOCOL_VERSION, pid=1))[: 1 + i % 8])
    hostile.serves(idle=False)
    for raw in silent:
        raw.close()


def test_client_that_never_reads_replies_does_not_block_others(hostile: Hostile) -> None:
    raw = Raw(hostile.d.socket)
    raw.hello()
    frame = encode(StatusRequest())
    raw.sock.setblocking(False)
    sent = 0
    try:
        for _ in range(20_000):  # until our receive buffer and the daemon's send buffer are full
            raw.sock.send(frame)
            sent += 1
    except BlockingIOError:
        pass
    assert sent > 100
    hostile.serves(idle=False)
    raw.close()


# --- arenas ----------------------------------------------------------------------------------------


def test_register_arena_without_a_descriptor_is_refused(hostile: Hostile) -> None:
    raw = Raw(hostile.d.socket)
    raw.hello()
    raw.msg(RegisterArena(arena=1, size=ARENA_BYTES))
    assert "descriptor" in refused(raw, "bad_frame").message


def _fd_of(kind: str, workdir: Path) -> tuple[int, int]:
    """A descriptor the daemon must refuse as an arena, and the size to declare for it."""
    if kind == "regular-file":
        p = workdir / "plain.bin"
        p.write_bytes(b"\0" * ARENA_BYTES)
        return os.open(p, os.O_RDWR | os.O_CLOEXEC), ARENA_BYTES
    if kind == "unsealed-memfd":
        return memfd(seals=0), ARENA_BYTES
    if kind == "grow-sealed-only":
        return memfd(seals=fcntl.F_SEAL_GROW), ARENA_BYTES
    if kind == "size-larger-than-declared":
        return memfd(), ARENA_BYTES // 2
    if kind == "size-smaller-than-declared":
        return memfd(), ARENA_BYTES * 2
    if kind == "empty-memfd":
        return memfd(size=0, data=b""), 0
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r, ARENA_BYTES
    if kind == "socket":
        a, b = socket.socketpair()
        b.close()
        return a.detach(), ARENA_BYTES
    if kind == "directory":
        return os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), ARENA_BYTES
    if kind == "write-only-memfd":
        fd = memfd()
        wo = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)
        os.close(fd)
        return wo, ARENA_BYTES
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "regular-file",
        "unsealed-memfd",
        "grow-sealed-only",
        "size-larger-than-declared",
        "size-smaller-than-declared",
        "empty-memfd",
        "pipe",
        "socket",
        "directory",
        "write-only-memfd",
    ],
)
def test_bad_arena_descriptors_are_refused(hostile: Hostile, workdir: Path, kind: str) -> None:
    raw = Raw(hostile.d.socket)
    raw.hello()
    fd, size = _fd_of(kind, workdir)
    try:
        raw.msg(RegisterArena(arena=1, size=size), fds=[fd])
    finally:
        os.close(fd)
    failed = refused(raw, "bad_arena")
    if kind == "unsealed-memfd":
        assert "F_SEAL_SHRINK" in failed.message


def test_registering_an_arena_twice_is_refused(hostile: Hostile) -> None:
    raw = registered(hostile.d)
    fd = memfd()
    raw.msg(RegisterArena(arena=1, size=ARENA_BYTES), fds=[fd])
    os.close(fd)
    refused(raw, "bad_arena")


def test_too_many_descriptors_in_one_message_are_refused(hostile: Hostile) -> None:
    raw = Raw(hostile.d.socket)
    raw.hello()
    fds = [memfd() for _ in range(12)]
    raw.msg(RegisterArena(arena=1, size=ARENA_BYTES), fds=fds)
    for fd in fds:
        os.close(fd)
    refused(raw, "bad_frame")


def test_stray_descriptors_are_not_hoarded(hostile: Hostile) -> None:
    """Descriptors sent with frames that are not register_arena belong to nothing: the daemon
    must not keep them open while the connection lives (a leaking client would exhaust the
    daemon's descriptor table and starve every other client)."""
    raw = Raw(hostile.d.socket)
    raw.hello()
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    for _ in range(25):
        try:
            raw.msg(StatusRequest(), fds=[null] * 8)
        except (BrokenPipeError, ConnectionResetError):
            break  # refused: fine
        while True:  # also paces the sends: one message (and its descriptors) per receive
            try:
                if isinstance(raw.recv(), StatusReply):
                    break
            except EOFError:  # refusing the connection for it is fine too
                break
    os.close(null)
    held = daemon_fds(hostile.d) - hostile.fds
    raw.close()
    assert held <= 2, f"the daemon holds {held} stray descriptors of a live connection"


def test_release_of_unknown_arena_is_harmless(hostile: Hostile) -> None:
    raw = registered(hostile.d)
    raw.msg(ReleaseArena(arena=99))
    raw.msg(ReleaseArena(arena=1))
    raw.msg(ReleaseArena(arena=1))
    failed_snapshot(raw, snapshot())  # arena 1 is gone
    raw.close()


def test_arena_released_and_connection_dropped_right_after_snapshot_still_commits(hostile: Hostile) -> None:
    raw = registered(hostile.d)
    req = snapshot(run="dropped")
    raw.msg(req)
    raw.msg(ReleaseArena(arena=1))
    raw.close()
    path = hostile.d.root / "dropped" / paths.step_dirname(req.step)
    wait_until(lambda: ckptd.latest(hostile.d.root, "dropped") == path, what="the dropped snapshot committed")
    assert ckptd.load(path)["model"]["w"].numpy().tobytes() == WEIGHT


# --- snapshot requests -----------------------------------------------------------------------------

BAD_SNAPSHOTS: dict[str, Snapshot] = {
    "offset-beyond-arena": snapshot(offset=ARENA_BYTES),
    "range-beyond-arena": snapshot(offset=ARENA_BYTES - 512),
    "negative-offset": snapshot(offset=-4096),
    "huge-offset": snapshot(offset=2**70),
    "unregistered-arena": snapshot(arena=7),
    "tensor-gap": snapshot(
        nbytes=1032, tensors=[tensor(end=1024), tensor("v", shape=[1], start=1028, end=1032)]
    ),
    "tensor-overlap": snapshot(
        nbytes=1024, tensors=[tensor(shape=[200], end=800), tensor("v", shape=[100], start=600, end=1000)]
    ),
    "tensors-short-of-shard": snapshot(nbytes=2048),
    "tensor-beyond-shard": snapshot(nbytes=512),
    "size-not-shape": snapshot(tensors=[tensor(shape=[255])]),
    "negative-dim": snapshot(tensors=[tensor(shape=[-256])]),
    "negative-dims-product": snapshot(tensors=[tensor(shape=[-16, -16])]),
    "huge-shape": snapshot(tensors=[tensor(shape=[2**62, 2**62])]),
    "unknown-dtype": snapshot(tensors=[tensor(dtype="F128")]),
    "lowercase-dtype": snapshot(tensors=[tensor(dtype="f32")]),
    "empty-tensor-name": snapshot(tensors=[tensor(name="")]),
    "metadata-tensor-name": snapshot(tensors=[tensor(name="__metadata__")]),
    "duplicate-tensor": snapshot(nbytes=2048, tensors=[tensor(end=1024), tensor(start=1024, end=2048)]),
    "run-dotdot": snapshot(run=".."),
    "run-dotdot-inside": snapshot(run="a..b"),
    "run-slash": snapshot(run="a/b"),
    "run-absolute": snapshot(run="/tmp/evil"),
    "run-parent": snapshot(run="../outside"),
    "run-dot": snapshot(run="."),
    "run-hidden": snapshot(run=".hidden"),
    "run-empty": snapshot(run=""),
    "run-temp-marker": snapshot(run="x.ckptd-tmp-1"),
    "run-too-long": snapshot(run="r" * 300),
    "run-nul": snapshot(run="a\x00b"),
    "component-slash": snapshot(component="a/b"),
    "component-dotdot": snapshot(component=".."),
    "component-parent": snapshot(component="../../outside/x"),
    "component-reserved": snapshot(component="ckptd"),
    "file-evil": snapshot(files={"evil.safetensors": "{}"}),
    "file-pickle": snapshot(files={"training_args.bin": "{}"}),
    "file-traversal": snapshot(files={"../../outside/x.json": "{}"}),
    "file-manifest": snapshot(files={"ckptd.json": "{}"}),
    "file-absolute": snapshot(files={"/tmp/config.json": "{}"}),
    "negative-step": snapshot(step=-1),
    "alias-to-nothing": snapshot(aliases={"x": "nope"}),
    "alias-shadows-tensor": snapshot(aliases={"w": "w"}),
}


LAYOUT_IDS = itertools.count(100)


def via_layout(raw: Raw, req: Snapshot) -> Snapshot:
    """Register ``req``'s components as a layout, as the client does; the same request naming it."""
    layout = next(LAYOUT_IDS)
    raw.msg(RegisterLayout(layout=layout, components=req.components))
    return req.model_copy(update={"layout": layout, "components": []})


@pytest.mark.parametrize("via", ["inline", "layout"])
@pytest.mark.parametrize("case", list(BAD_SNAPSHOTS), ids=list(BAD_SNAPSHOTS))
def test_bad_snapshot_is_refused_and_the_connection_goes_on(hostile: Hostile, case: str, via: str) -> None:
    raw = registered(hostile.d)
    before = {p.name for p in hostile.d.root.iterdir()}
    req = BAD_SNAPSHOTS[case]
    failed_snapshot(raw, via_layout(raw, req) if via == "layout" else req)
    assert {p.name for p in hostile.d.root.iterdir()} == before, "nothing is written for a refused request"
    # The same connection still commits a good snapshot.
    raw.msg(snapshot(id=2, run="after"))
    m = raw.until(lambda m: isinstance(m, Committed | Failed))
    assert isinstance(m, Committed), m
    raw.close()


def test_layouts_are_per_connection_and_named_clearly(hostile: Hostile) -> None:
    raw = registered(hostile.d)
    m = failed_snapshot(raw, snapshot().model_copy(update={"layout": 999, "components": []}))
    assert "layout 999 is not registered" in m.message
    good = snapshot()
    both = via_layout(raw, good).model_copy(update={"components": good.components})
    assert "not both" in failed_snapshot(raw, both).message
    req = via_layout(raw, snapshot(id=7, run="laid-out"))
    raw.msg(req)
    assert isinstance(raw.until(lambda m: isinstance(m, Committed | Failed)), Committed)
    other = registered(hostile.d)  # another connection does not see this one's layouts
    m = failed_snapshot(other, snapshot().model_copy(update={"layout": req.layout, "components": []}))
    assert f"layout {req.layout} is not registered" in m.message
    raw.close()
    other.close()


def test_oldest_layouts_are_forgotten_beyond_the_limit(hostile: Hostile) -> None:
    from ckptd.daemon.layouts import MAX_LAYOUTS

    raw = registered(hostile.d)
    first = via_layout(raw, snapshot(run="limit"))
    for _ in range(MAX_LAYOUTS):
        last = via_layout(raw, snapshot(run="limit"))
    assert "is not registered" in failed_snapshot(raw, first).message
    raw.msg(last)
    assert isinstance(raw.until(lambda m: isinstance(m, Committed | Failed)), Committed)
    raw.close()


def test_layout_tensors_are_limited_per_connection_and_per_daemon(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    """With limits of 8 tensors per connection and 16 per daemon (``layout-limit:8``): a larger
    layout is refused, a connection's own older layouts make room, other clients' do not, and a
    client refused for the daemon-wide limit registers its layout again once there is room."""
    d = start_daemon(faults="layout-limit:8")

    def of(k: int, run: str) -> Snapshot:
        ts = [tensor(name=f"t{i}", shape=[1], start=4 * i, end=4 * i + 4) for i in range(k)]
        return snapshot(run=run, nbytes=4 * k, tensors=ts)

    def commits(raw: Raw, req: Snapshot) -> None:
        raw.msg(req)
        m = raw.until(lambda m: isinstance(m, Committed | Failed) and m.id == req.id)
        assert isinstance(m, Committed), m

    a, b = registered(d), registered(d)
    assert "exceeds the limit of 8" in failed_snapshot(a, via_layout(a, of(9, "a"))).message
    commits(a, via_layout(a, of(8, "a")))
    commits(b, via_layout(b, of(8, "b")))
    commits(b, via_layout(b, of(8, "b")))  # replaces b's own older layout
    c = connect(d, run="c")
    state = {"w": torch.arange(3.0)}
    with pytest.raises(CheckpointError) as e:
        c.snapshot(state, step=1).wait(30)
    assert e.value.code == "layout_limit"
    assert "past its limit of 16 tensors (16 held for other connections)" in str(e.value)
    a.close()  # its layouts go with it
    for step in range(2, 50):
        try:
            info = c.snapshot(state, step=step).wait(30)
            break
        except CheckpointError as err:
            assert err.code == "layout_limit", err
            time.sleep(0.1)
    assert info is not None and ckptd.verify(info.path) == []
    b.close()


def test_two_components_in_one_snapshot_refused_when_names_repeat(hostile: Hostile) -> None:
    raw = registered(hostile.d)
    good = snapshot()
    req = good.model_copy(update={"components": [*good.components, *good.components]})
    failed_snapshot(raw, req)
    raw.close()


def test_step_too_long_for_a_file_name_fails_cleanly(hostile: Hostile) -> None:
    raw = registered(hostile.d)
    m = failed_snapshot(raw, snapshot(run="longstep", step=10**300), code="io_error")
    assert m.errno is not None
    assert step_dirs(hostile.d.root / "longstep") == []
    raw.close()


def test_snapshot_of_a_step_being_written_is_refused(start_daemon: Callable[..., DaemonProc]) -> None:
    d = start_daemon(faults="slow:0.3")
    raw = registered(d)
    raw.msg(snapshot(id=1, step=1))
    raw.msg(snapshot(id=2, step=1))
    replies = [raw.until(lambda m: isinstance(m, Committed | Failed)) for _ in range(2)]
    assert {type(m).__name__ for m in replies} == {"Committed", "Failed"}
    failed = next(m for m in replies if isinstance(m, Failed))
    assert failed.id == 2 and failed.code == "invalid_request" and "already being written" in failed.message
    raw.close()


# --- symlinks planted under the root ---------------------------------------------------------------


def test_symlinked_run_directory_is_refused(hostile: Hostile) -> None:
    (hostile.d.root / "evil").symlink_to(hostile.outside)
    raw = registered(hostile.d)
    m = failed_snapshot(raw, snapshot(run="evil"), code="commit_error")
    assert "symlink" in m.message
    raw.close()


def test_symlinked_step_directory_is_not_followed(hostile: Hostile) -> None:
    run_dir = hostile.d.root / "linkstep"
    run_dir.mkdir()
    (run_dir / "step-000001").symlink_to(hostile.outside / "step-000001")  # exists: "committed"
    (run_dir / "step-000002").symlink_to(hostile.outside / "nothing-here")  # dangling
    raw = registered(hostile.d)
    for i, step in enumerate((1, 2)):
        raw.msg(snapshot(id=10 + i, run="linkstep", step=step))
        m = raw.until(lambda m: isinstance(m, Committed | Failed))
        assert isinstance(m, Failed), m
    assert not (hostile.outside / "nothing-here").exists()
    raw.close()


def test_symlinked_latest_is_replaced_not_followed(hostile: Hostile) -> None:
    run_dir = hostile.d.root / "linklatest"
    run_dir.mkdir()
    (run_dir / "LATEST").symlink_to(hostile.outside / "precious.txt")
    raw = registered(hostile.d)
    raw.msg(snapshot(run="linklatest", step=1))
    m = raw.until(lambda m: isinstance(m, Committed | Failed))
    assert isinstance(m, Committed), m
    assert not (run_dir / "LATEST").is_symlink()
    assert paths.read_latest(run_dir) == "step-000001"
    raw.close()


def test_restart_does_not_sweep_through_symlinks(
    start_daemon: Callable[..., DaemonProc], workdir: Path
) -> None:
    outside = workdir / "outside"
    outside.mkdir()
    (outside / "step-000001.ckptd-tmp-aaaa").mkdir()
    (outside / "step-000001.ckptd-tmp-aaaa" / "keep").write_text("mine\n")
    (outside / "LATEST.ckptd-tmp-bbbb").write_text("mine\n")
    root = workdir / "root"
    (root / "real").mkdir(parents=True)
    (root / "linked").symlink_to(outside)
    (root / "real" / "step-000002.ckptd-tmp-cccc").symlink_to(outside / "step-000001.ckptd-tmp-aaaa")
    before = fingerprint(outside)
    d = start_daemon(root=root)
    assert fingerprint(outside) == before
    assert not os.path.lexists(root / "real" / "step-000002.ckptd-tmp-cccc")
    assert d.proc.poll() is None


# --- fuzzing ---------------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
KINDS = ["hello", "register_arena", "release_arena", "snapshot", "status", "welcome", "bogus"]


def _exchange(
    d: DaemonProc, data: bytes, *, hello: bool, fds: list[int] | None = None
) -> list[DaemonMessage]:
    raw = Raw(d.socket)
    try:
        if hello:
            raw.hello()
        try:
            raw.send(data, fds or [])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon already refused the connection
        return raw.drain()
    finally:
        raw.close()


def _check_replies(replies: list[DaemonMessage], seen: Counter[str]) -> None:
    """Every reply decoded as a daemon message (else ``_exchange`` raised); count their kinds."""
    seen["examples"] += 1
    for m in replies:
        seen[m.kind] += 1
        if isinstance(m, Failed):
            assert m.code, m
            seen[f"failed:{m.code}"] += 1


def _finish_fuzz(hostile: Hostile, seen: Counter[str], record: Callable[[str, object], None]) -> None:
    record("runs", seen["examples"])
    assert seen["examples"] >= 100, seen
    observer = hostile.connect(hostile.d)
    wait_until(lambda: observer.status().jobs == [], timeout_s=60, what="daemon idle")
    observer.close()
    assert hostile.d.proc.poll() is None, hostile.d.log_text()


@pytest.mark.slow
def test_fuzz_random_bytes(hostile: Hostile, record_property: Callable[[str, object], None]) -> None:
    seen: Counter[str] = Counter()

    @FUZZ
    @given(data=st.binary(max_size=512), hello=st.booleans())
    def one(data: bytes, hello: bool) -> None:
        _check_replies(_exchange(hostile.d, data, hello=hello), seen)

    one()
    _finish_fuzz(hostile, seen, record_property)


@pytest.mark.slow
def test_fuzz_random_json_messages(hostile: Hostile, record_property: Callable[[str, object], None]) -> None:
    seen: Counter[str] = Counter()

    @FUZZ
    @given(
        kind=st.sampled_from(KINDS),
        fields=st.dictionaries(
            st.sampled_from(
                [
                    "id",
                    "run",
                    "step",
                    "arena",
                    "size",
                    "version",
                    "pid",
                    "components",
                    "tree",
                    "files",
                    "rank",
                    "world_size",
                    "x",
                ]
            ),
            json_values,
            max_size=8,
        ),
        hello=st.booleans(),
    )
    def one(kind: str, fields: dict[str, Any], hello: bool) -> None:
        body = json.dumps({"kind": kind, **fields}).encode()
        _check_replies(_exchange(hostile.d, struct.pack(">I", len(body)) + body, hello=hello), seen)

    one()
    _finish_fuzz(hostile, seen, record_property)
    assert seen["failed:bad_frame"] > 0, seen


def _paths_of(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths_of(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths_of(v, (*prefix, i))
    return out


def _replace(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    if isinstance(node, dict):
        return {**node, path[0]: _replace(node[path[0]], path[1:], value)}
    items = list(node)
    items[path[0]] = _replace(items[path[0]], path[1:], value)
    return items


@pytest.mark.slow
def test_fuzz_mutated_valid_frames(hostile: Hostile, record_property: Callable[[str, object], None]) -> None:
    """A valid register + snapshot exchange, with one field of the snapshot replaced by random JSON
    or a few of its bytes flipped. Mutants that stay valid commit; the rest are refused."""
    valid = json.loads(snapshot(run="fuzz").model_dump_json())
    where = _paths_of(valid)[1:]
    steps = iter(range(1, 10**6))
    seen: Counter[str] = Counter()

    @FUZZ
    @given(
        path=st.sampled_from(where),
        value=json_values,
        flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=3),
        structural=st.booleans(),
    )
    def one(path: tuple[Any, ...], value: Any, flips: list[tuple[int, int]], structural: bool) -> None:
        doc = dict(valid, step=next(steps))
        if structural:
            doc = _replace(doc, path, value)
        body = bytearray(json.dumps(doc).encode())
        if not structural:
            for pos, x in flips:
                body[pos % len(body)] ^= x
        fd = memfd()
        try:
            register = encode(RegisterArena(arena=1, size=ARENA_BYTES))
            raw = Raw(hostile.d.socket)
            try:
                raw.hello()
                raw.send(register, [fd])
                try:
                    raw.send(struct.pack(">I", len(body)) + bytes(body))
                except (BrokenPipeError, ConnectionResetError):
                    pass
                _check_replies(raw.drain(), seen)
            finally:
                raw.close()
        finally:
            os.close(fd)

    one()
    _finish_fuzz(hostile, seen, record_property)
    assert seen["accepted"] > 0 and seen["failed"] > 0, seen  # both valid and refused mutants


# --- a client that scribbles on its arena while the daemon writes it ------------------------------


def _outcome_of(snapshot_id: int, m: DaemonMessage) -> bool:
    return isinstance(m, Committed | Failed) and m.id == snapshot_id


def test_arena_scribbled_during_the_write_never_commits_a_checkpoint_that_does_not_verify(
    start_daemon: Callable[..., DaemonProc], record_property: Callable[[str, object], None]
) -> None:
    """A broken client keeps writing into an arena whose snapshot is being written. What lands
    on disk is garbage, but the daemon must not report Committed for a checkpoint whose files do
    not match its manifest: it hashes and writes the same bytes, or fails the snapshot."""
    d = start_daemon()
    size = 8 * 2**20
    raw = Raw(d.socket)
    raw.hello()
    fd = memfd(size=size, data=b"")
    raw.msg(RegisterArena(arena=1, size=size), fds=[fd])
    arena = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=size, dtype=torch.uint8)
    os.close(fd)
    stop = threading.Event()

    def scribble() -> None:
        while not stop.is_set():
            arena.add_(1)  # releases the GIL: scribbles while the main thread waits for replies

    scribbler = threading.Thread(target=scribble, daemon=True)
    scribbler.start()
    bad: list[list[str]] = []
    committed = runs = 0
    try:
        for step in range(1, 11):  # until one shows the race (the first, nearly always)
            runs += 1
            req = snapshot(
                id=step, run="scribble", step=step, nbytes=size, tensors=[tensor(shape=[size // 4], end=size)]
            )
            raw.msg(req)
            m = raw.until(functools.partial(_outcome_of, req.id))
            if isinstance(m, Committed):
                committed += 1
                if problems := ckptd.verify(m.path):
                    bad.append(problems)
                    break
    finally:
        stop.set()
        scribbler.join()
    raw.close()
    record_property("runs", runs)
    record_property("committed", committed)
    record_property("lost", len(bad))
    assert bad == [], f"Committed checkpoints that do not verify: {bad}"
