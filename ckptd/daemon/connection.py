"""One client connection: frames in, replies out, arenas received with SCM_RIGHTS.

asyncio streams carry no ancillary data, so the connection reads its raw non-blocking socket
with ``loop.add_reader`` and ``socket.recv_fds``. A descriptor arrives with the first byte of the
``RegisterArena`` frame it was sent with; descriptors are queued and taken in frame order.
A broken or hostile client gets a ``Failed`` and is disconnected; the daemon goes on.

What a client handed over is in the socket: every complete request is read and processed even
when the client is gone. A reply that cannot be sent (EPIPE: a trainer killed after
``snapshot()`` returned) only stops the replies; the connection reads on until EOF.

Frames are dispatched in order. A large one (a layout of many thousands of tensors) is decoded
and prepared on the daemon's layout thread while this connection's reading pauses, so the event
loop goes on serving every other client meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import socket
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING

from ckptd.daemon import layouts as limits
from ckptd.daemon.arenas import Arena, ArenaError
from ckptd.daemon.layouts import LayoutParts, PreparedLayout, prepare
from ckptd.daemon.pipeline import Job
from ckptd.daemon.rows import ComponentRows, component_rows
from ckptd.daemon.validate import InvalidRequest, check_snapshot, files_bytes
from ckptd.protocol import (
    PROTOCOL_VERSION,
    Abandon,
    Accepted,
    ClientMessage,
    ComponentEntry,
    Failed,
    FrameReader,
    Hello,
    Message,
    ProtocolError,
    RegisterArena,
    RegisterLayout,
    ReleaseArena,
    Snapshot,
    Staged,
    StatusRequest,
    StopRequest,
    decode_client,
    encode,
)

if TYPE_CHECKING:
    from ckptd.daemon.server import Daemon

log = logging.getLogger(__name__)
#: Bytes one readiness callback reads at most (and so decodes): a bound on its time on the loop.
_RECV_BYTES = 256 * 2**10
_MAX_FDS_PER_RECV = 8
#: Frames larger than this are decoded and prepared off the event loop (about 2,500 tensors of
#: a layout; a 700,000-tensor layout takes seconds of CPU).
HEAVY_FRAME_BYTES = 256 * 2**10
#: Frames larger than this must be snapshot requests (whose ``tree`` grows with the tensors),
#: saying so first (``{"kind":"snapshot"``, as every ckptd encoder writes them); others, layouts
#: above all, are refused before they are decoded: decoding holds the GIL (a 28.7 MiB layout
#: frame held the loop 1.6 s), and ckptd's client sends a layout in parts of under 256 KiB.
MAX_LAYOUT_FRAME_BYTES = 2**20
_SNAPSHOT_FRAME = re.compile(rb'\A\s*\{\s*"kind"\s*:\s*"snapshot"')
#: Seconds a new connection has to say hello before it is closed (idle connections must not
#: hold the connection limit).
HELLO_TIMEOUT_S = 5.0
#: Descriptors a client may have registered and not yet released.
MAX_ARENAS = 64
#: Clients one daemon serves at once.
MAX_CONNECTIONS = 1024
#: Replies queued for a client that does not read them before it gets no more (its requests are
#: still read and carried out).
MAX_QUEUED_REPLY_BYTES = 16 * 2**20
#: Bytes of unfinished frames all connections together may hold: half-sent frames of up to
#: MAX_FRAME_BYTES each from 1024 clients would be 64 GiB. Past it, a connection holding more
#: than FRAME_BYTES_BLAMED of them is refused (a legitimate frame is a few MB and sent at once).
MAX_PENDING_FRAME_BYTES = 2**30
FRAME_BYTES_BLAMED = 16 * 2**20
#: Bytes of small files (tokenizers, configs) that the snapshots in flight may hold in the
#: daemon's memory together; each snapshot's are bounded by ``validate.MAX_FILES_BYTES``.
MAX_HELD_FILE_BYTES = 512 * 2**20


class Connection:
    """``full``: the daemon serves ``MAX_CONNECTIONS`` already; this one is told so in reply to
    its hello (a client reads that reply, not a bare reset) and closed."""

    def __init__(self, daemon: Daemon, sock: socket.socket, peer_pid: int, *, full: bool = False) -> None:
        self.daemon = daemon
        self.peer_pid = peer_pid
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._frames = FrameReader()
        self._fds: deque[int] = deque()
        self._ready: deque[bytes] = deque()  # complete frames not dispatched yet, in order
        self._offloaded = False  # a large frame is being decoded off the loop; reading paused
        self._eof = False
        self._replying = True  # False once a reply failed: the peer is gone, reading goes on
        self._full = full
        self.arenas: dict[int, Arena] = {}
        # A layout that failed its checks is kept as the reason its snapshots fail.
        self.layouts: dict[int, PreparedLayout | str] = {}
        self._parts: LayoutParts | None = None  # a layout whose parts are still arriving
        # Streamed snapshots of this connection not yet copied whole, by id.
        self.streaming: dict[int, Job] = {}
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._queued = 0
        self._hello = False
        self.token = ""  # the client's name for this connection (Hello.token)
        self.operator = False  # ``ckptd status``/``stop``: not counted as a client
        self._pending = 0  # bytes of an unfinished frame, counted in daemon.pending_frame_bytes
        self.closed = False
        self.writer = asyncio.create_task(self._write_loop(), name=f"ckptd-conn-{peer_pid}-writer")
        self._hello_timer = self._loop.call_later(HELLO_TIMEOUT_S, self._hello_expired)
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def greeted(self) -> bool:  # past hello: heartbeats may be sent (ckptd/daemon/heartbeat.py)
        return self._hello

    # --- sending ---------------------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue a reply; a reply to a client that is gone is dropped, and a client that lets
        replies pile up unread is disconnected."""
        if self.closed or not self._replying:
            return
        data = encode(message)
        self._queued += len(data)
        if self._queued > MAX_QUEUED_REPLY_BYTES:
            # Not a close: what it sent is still read to the end (and its snapshots committed).
            log.warning("client pid %s does not read its replies; no more replies to it", self.peer_pid)
            self._replying = False
            return
        self._out.put_nowait(data)

    async def _write_loop(self) -> None:
        while (data := await self._out.get()) is not None:
            if self._replying:
                try:
                    await self._loop.sock_sendall(self._sock, data)
                except (ConnectionError, OSError) as e:
                    # The client is gone, but what it sent before is still in the socket: stop
                    # replying, read on until EOF (its snapshots are committed all the same).
                    log.info(
                        "client pid %s: send failed (%s); no more replies, reading its requests to the end",
                        self.peer_pid,
                        e,
                    )
                    self._replying = False
            self._queued -= len(data)

    # --- receiving -------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        """Read up to about ``_RECV_BYTES`` (a read stops at each passed descriptor, so several
        reads), then dispatch what is complete; EOF closes once every frame is dispatched."""
        got = 0
        while got < _RECV_BYTES and not (self.closed or self._eof or self._offloaded or self._ready):
            try:
                data, fds, flags, _ = socket.recv_fds(
                    self._sock, _RECV_BYTES, _MAX_FDS_PER_RECV, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # ECONNRESET comes only once every byte queued was read
                log.info("client pid %s: recv failed (%s)", self.peer_pid, e)
                data, fds, flags = b"", [], 0
            got += len(data)
            self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC or len(self._fds) > 1:
                self._refuse("bad_frame", "send exactly one descriptor, with its register_arena frame")
                return
            self._eof = not data
            try:
                self._ready.extend(self._frames.feed(data))
            except ProtocolError as e:
                self._refuse("bad_frame", str(e))
                return
            if self._hold_pending(self._frames.pending_bytes):
                return
            self._pump()

    def _pump(self) -> None:
        """Dispatch the frames read, in order. A large one goes to the layout thread, with this
        connection's reading paused, and the frames after it wait for it."""
        while self._ready and not (self.closed or self._offloaded):
            body = self._ready.popleft()
            if len(body) > HEAVY_FRAME_BYTES:
                if not self._hello:
                    self._refuse("bad_frame", f"first message must be hello, got {len(body)} bytes")
                    return
                if len(body) > MAX_LAYOUT_FRAME_BYTES and not _SNAPSHOT_FRAME.match(body):
                    self._refuse(
                        "bad_frame",
                        f"a frame of {len(body)} bytes is over the {MAX_LAYOUT_FRAME_BYTES}-byte limit "
                        "of anything but a snapshot request (which must begin with its kind); send "
                        "a layout in parts of RegisterLayout frames, as ckptd's client does",
                    )
                    return
                self._offload(functools.partial(_decode_large, body))
                return
            try:
                msg = decode_client(body)
            except ProtocolError as e:
                self._refuse("bad_frame", str(e))
                return
            self._dispatch(msg)
        if self.closed or self._offloaded:
            return
        if self._fds and not self._frames.pending_bytes:  # a descriptor that came with another frame
            self._refuse("bad_frame", "a descriptor arrived without a register_arena frame")
        elif self._eof:
            self.close()

    def _offload(self, work: Callable[[], _Work]) -> None:
        """Run ``work`` on the layout thread, then dispatch what it returns; reading and the
        frames after this one wait for it."""
        self._offloaded = True
        self._loop.remove_reader(self._sock.fileno())
        future = self.daemon.layout_executor.submit(work)
        future.add_done_callback(self._offload_finished)

    def _offload_finished(self, future: Future[_Work]) -> None:
        """On the layout thread: hand the result to the event loop (gone if the daemon stopped)."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._offload_done, future)

    def _offload_done(self, future: Future[_Work]) -> None:
        self._offloaded = False
        if self.closed or future.cancelled():
            return
        try:
            msg, prepared = future.result()
        except ProtocolError as e:
            self._refuse("bad_frame", str(e))
            return
        except Exception:
            log.exception("client pid %s: decoding a large frame failed", self.peer_pid)
            self._refuse("internal_error", "ckptd could not decode a large frame; see its log")
            return
        self._dispatch(msg, prepared)
        self._pump()
        if not (self.closed or self._offloaded or self._eof):
            self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def _hello_expired(self) -> None:
        if self._hello or self.closed:
            return
        self._on_readable()  # a hello that waited behind a busy loop still counts
        if not (self._hello or self.closed):
            self._refuse(
                "hello_timeout",
                f"no hello within {HELLO_TIMEOUT_S:g}s of connecting; connect with client.Client",
            )

    def _dispatch(self, msg: ClientMessage, prepared: Prepared | None = None) -> None:
        if not self._hello and not isinstance(msg, Hello):
            self._refuse("bad_frame", f"first message must be hello, got {msg.kind}")
            return
        match msg:
            case Hello():
                self._on_hello(msg)
            case RegisterArena():
                self._on_register(msg)
            case RegisterLayout():
                self._on_layout(msg, prepared)
            case ReleaseArena():
                arena = self.arenas.pop(msg.arena, None)
                if arena is not None:
                    arena.release()
            case Snapshot():
                self._on_snapshot(msg, prepared)
            case Staged():
                self._on_staged(msg)
            case Abandon():
                job = self.streaming.pop(msg.id, None)
                if job is not None:
                    job.abandon("its client abandoned it")
            case StatusRequest():
                self.send(self.daemon.status())
            case StopRequest():
                self.send(self.daemon.request_stop(now=msg.now, by_pid=self.peer_pid))

    def _on_hello(self, msg: Hello) -> None:
        if msg.version != PROTOCOL_VERSION:
            self._refuse(
                "version_mismatch",
                f"client speaks protocol {msg.version}, daemon {PROTOCOL_VERSION}; "
                "install the same ckptd version on both sides",
            )
            return
        if self._full:
            self._refuse(
                "too_many_clients",
                f"ckptd already serves {MAX_CONNECTIONS} clients; close the clients you no longer "
                "use (each Client holds a connection until close()) and retry, or run another "
                "daemon on another socket (CKPTD_SOCKET)",
            )
            return
        self._hello = True
        self.token = msg.token
        self.operator = msg.role == "operator"
        self._hello_timer.cancel()
        self.send(self.daemon.welcome())

    def _on_register(self, msg: RegisterArena) -> None:
        if not self._fds:
            self._refuse("bad_frame", f"register_arena {msg.arena} arrived without a descriptor")
            return
        fd = self._fds.popleft()
        if msg.arena in self.arenas or len(self.arenas) >= MAX_ARENAS:
            os.close(fd)
            self._refuse("bad_arena", f"arena {msg.arena} is already registered or too many arenas")
            return
        try:
            self.arenas[msg.arena] = Arena(msg.arena, fd, msg.size)
        except (ArenaError, OSError) as e:
            os.close(fd)
            self._refuse("bad_arena", str(e))

    def _on_layout(self, msg: RegisterLayout, prepared: Prepared | None) -> None:
        parts = self._parts
        if parts is not None and parts.layout != msg.layout:
            parts = self._parts = None  # a new layout supersedes one left unfinished
        if not msg.more and parts is None:
            self._register_layout(msg.layout, _prepare(msg.components) if prepared is None else prepared)
            return
        if parts is None:
            parts = self._parts = LayoutParts(msg.layout)
        parts.add(msg)
        self._bound_parts(parts)
        if msg.more:
            return
        self._parts = None
        if parts.error is not None:
            error = LayoutLimit(parts.error) if parts.over_daemon_limit else InvalidRequest(parts.error)
            self._register_layout(msg.layout, error)
            return
        whole = RegisterLayout.model_construct(layout=msg.layout, components=[])
        comps = parts.components()
        self._offload(lambda: (whole, _prepare_rows(comps)))

    def _bound_parts(self, parts: LayoutParts) -> None:
        """Count the parts held so far against this connection's and the daemon's limits as they
        arrive: this connection's oldest layouts make room (as a registration would), and the
        part that takes the daemon past its limit fails the layout."""
        if parts.error is not None:
            return
        self._evict(parts.tensors)
        others = sum(c.held_tensors() for c in self.daemon.connections() if c is not self)
        mine = self.held_tensors()
        if others + mine > limits.MAX_DAEMON_LAYOUT_TENSORS:
            parts.fail(
                f"part {parts.parts} takes the layouts held by this daemon past its limit of "
                f"{limits.MAX_DAEMON_LAYOUT_TENSORS} tensors ({others} held for other connections); "
                "close idle clients, or snapshot fewer, larger tensors",
                daemon_limit=True,
            )

    def held_tensors(self) -> int:
        """Tensors and aliases of this connection's layouts, the one arriving in parts included."""
        return _tensors(self.layouts.values()) + (0 if self._parts is None else self._parts.tensors)

    def _evict(self, size: int) -> None:
        """Forget the oldest layouts until one of ``size`` more tensors fits (a job keeps its own
        reference to the layout it writes)."""
        while self.layouts and (
            len(self.layouts) >= limits.MAX_LAYOUTS
            or _tensors(self.layouts.values()) + size > limits.MAX_LAYOUT_TENSORS
        ):
            del self.layouts[next(iter(self.layouts))]

    def _register_layout(self, layout_id: int, prepared: Prepared) -> None:
        self.layouts.pop(layout_id, None)
        layout: PreparedLayout | str
        if isinstance(prepared, PreparedLayout):
            layout = prepared
        elif isinstance(prepared, LayoutLimit):  # the daemon-wide limit, passed by its parts
            layout = _OverLimit(f"layout {layout_id}: {prepared}")
        else:
            layout = f"layout {layout_id}: {prepared}"
        size = layout.tensors if isinstance(layout, PreparedLayout) else 0
        self._evict(size)
        others = sum(c.held_tensors() for c in self.daemon.connections() if c is not self)
        mine = self.held_tensors()
        if size and others + mine + size > limits.MAX_DAEMON_LAYOUT_TENSORS:
            layout = _OverLimit(
                f"layout {layout_id}: its {size} tensors and aliases would take the layouts held by "
                f"this daemon past its limit of {limits.MAX_DAEMON_LAYOUT_TENSORS} tensors ({others} "
                "held for other connections); close idle clients, or snapshot fewer, larger tensors"
            )
        self.layouts[layout_id] = layout

    def _layout_of(self, msg: Snapshot, prepared: Prepared | None) -> PreparedLayout:
        if msg.layout is None:
            if prepared is None:
                return prepare(component_rows(msg.components))
            if isinstance(prepared, ValueError):
                raise prepared
            return prepared
        if msg.components:
            raise InvalidRequest("a snapshot names a registered layout or carries components, not both")
        layout = self.layouts.get(msg.layout)
        if layout is None:
            raise InvalidRequest(f"layout {msg.layout} is not registered on this connection")
        if isinstance(layout, _OverLimit):
            raise LayoutLimit(layout)
        if isinstance(layout, str):
            raise InvalidRequest(layout)
        return layout

    def _on_snapshot(self, msg: Snapshot, prepared: Prepared | None) -> None:
        arena = self.arenas.get(msg.arena)
        if self.daemon.stopping:
            self.daemon.metrics.refuse("stopping")
            self.send(
                Failed(id=msg.id, code="stopping", message="ckptd is shutting down; snapshot not taken")
            )
            return
        try:
            if arena is None:
                raise InvalidRequest(f"arena {msg.arena} is not registered on this connection")
            layout = self._layout_of(msg, prepared)
            check_snapshot(msg, layout.components, arena.size)
            file_bytes = files_bytes(msg)
            if file_bytes and self.daemon.pipeline.file_bytes_held + file_bytes > MAX_HELD_FILE_BYTES:
                raise InvalidRequest(
                    f"snapshots in flight hold {self.daemon.pipeline.file_bytes_held} bytes of small "
                    f"files; this one's {file_bytes} would pass the daemon's {MAX_HELD_FILE_BYTES}; "
                    "snapshot again once earlier ones are committed"
                )
            if self.daemon.pipeline.busy(msg.run, msg.step, msg.rank if msg.world_size > 1 else 0):
                raise InvalidRequest(f"step {msg.step} of run {msg.run!r} is already being written")
            if msg.ready is not None:
                self._check_stream(msg)
        except InvalidRequest as e:
            code = "layout_limit" if isinstance(e, LayoutLimit) else "invalid_request"
            self.daemon.metrics.refuse(code)
            self.send(Failed(id=msg.id, code=code, message=str(e)))
            return
        self.send(Accepted(id=msg.id))
        job = Job(
            request=msg,
            layout=layout,
            arena=arena,
            reply=self.send,
            nbytes=layout.nbytes,
            file_bytes=file_bytes,
        )
        if not job.complete:
            self.streaming[msg.id] = job
        self.daemon.pipeline.submit(job)

    def _check_stream(self, msg: Snapshot) -> None:
        """One streamed snapshot at a time per connection (a client copies one at a time), so a
        client cannot hold more writer threads waiting for its copies."""
        assert msg.ready is not None
        if msg.ready < 0:
            raise InvalidRequest(f"snapshot {msg.id}: ready must be >= 0, got {msg.ready}")
        for sid, job in list(self.streaming.items()):
            if job.finished or job.complete or job.abandoned is not None:
                del self.streaming[sid]
            else:
                raise InvalidRequest(
                    f"snapshot {msg.id}: snapshot {sid} is still being streamed on this connection; "
                    "finish copying it (or abandon it) first"
                )

    def _on_staged(self, msg: Staged) -> None:
        """More of a streamed snapshot is copied. One that is unknown (refused, already whole or
        failed) is ignored: its outcome was or will be reported."""
        job = self.streaming.get(msg.id)
        if job is None:
            return
        job.stage_more(msg.ready)
        if job.complete or job.abandoned is not None:
            del self.streaming[msg.id]

    def _refuse(self, code: str, message: str) -> None:
        log.warning("client pid %s: %s: %s; disconnecting", self.peer_pid, code, message)
        self.send(Failed(id=None, code=code, message=message))
        self.close()

    def _hold_pending(self, nbytes: int) -> bool:
        """Count this connection's unfinished frame bytes daemon-wide; refuse it (True) if all
        connections hold too many and it holds a large share."""
        self.daemon.pending_frame_bytes += nbytes - self._pending
        self._pending = nbytes
        if self.daemon.pending_frame_bytes > MAX_PENDING_FRAME_BYTES and nbytes > FRAME_BYTES_BLAMED:
            self._refuse(
                "too_large",
                f"{nbytes} bytes of an unfinished frame held while unfinished frames of all clients "
                f"pass {MAX_PENDING_FRAME_BYTES} bytes; send each frame whole (ckptd's client does)",
            )
            return True
        return False

    def close(self) -> None:
        """Stop reading, flush queued replies, release this client's arenas (jobs keep theirs)."""
        if self.closed:
            return
        self.daemon.pending_frame_bytes -= self._pending
        self._pending = 0
        self._out.put_nowait(None)
        self.closed = True
        self._hello_timer.cancel()
        self._ready.clear()
        self._parts = None
        self._loop.remove_reader(self._sock.fileno())
        for job in self.streaming.values():
            job.abandon("its client disconnected before it finished copying")
        self.streaming.clear()
        for arena in self.arenas.values():
            arena.release()
        self.arenas.clear()
        while self._fds:
            os.close(self._fds.popleft())
        self.writer.add_done_callback(lambda _: self._sock.close())
        self.daemon.forget(self)


class _OverLimit(str):
    """A layout refused for the daemon-wide limit, not for its content: its snapshots fail with
    ``layout_limit``, after which the client registers it again (room may have been made)."""


class LayoutLimit(InvalidRequest):
    """A snapshot names a layout refused for the daemon-wide limit."""


#: A layout prepared, or why it could not be.
Prepared = PreparedLayout | ValueError


def _prepare(components: list[ComponentEntry]) -> Prepared:
    return _prepare_rows(component_rows(components))


def _prepare_rows(components: list[ComponentRows]) -> Prepared:
    try:
        return prepare(components)
    except ValueError as e:  # InvalidRequest, or anything else the layout's values break
        return e


#: What the layout thread hands back: a message to dispatch, and the layout prepared for it.
_Work = tuple[ClientMessage, Prepared | None]


def _decode_large(body: bytes) -> _Work:
    """On the layout thread: decode a large frame, and prepare the layout it carries (a part of
    one is prepared once it is whole)."""
    msg = decode_client(body)
    if isinstance(msg, RegisterLayout) and not (msg.more or msg.continues_shard):
        return msg, _prepare(msg.components)
    if isinstance(msg, Snapshot) and msg.layout is None:
        if len(body) > MAX_LAYOUT_FRAME_BYTES and msg.components:
            raise ProtocolError(
                f"a snapshot request of {len(body)} bytes carries its components inline (the limit "
                f"for that is {MAX_LAYOUT_FRAME_BYTES} bytes); register the layout in parts "
                "(RegisterLayout) and name it, as ckptd's client does"
            )
        return msg, _prepare(msg.components)
    return msg, None


def _tensors(layouts: Iterable[PreparedLayout | str]) -> int:
    return sum(x.tensors for x in layouts if isinstance(x, PreparedLayout))
