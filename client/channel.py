"""The client's connection to the daemon: a Unix socket, a send lock, and one I/O thread.

Sends happen on the caller's thread (a few hundred bytes per snapshot; descriptors ride along
with ``RegisterArena``). The I/O thread reads replies and hands each to ``on_message``; when the
daemon goes away it calls ``on_close(reason, code)`` once, so pending snapshots fail at once
instead of hanging. ``last_frame`` is when the daemon last sent anything (it sends a heartbeat
every second): the client's watchdog ``abort()``s a channel that has been silent too long.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ckptd.protocol import (
    PROTOCOL_VERSION,
    DaemonMessage,
    Failed,
    FrameReader,
    Heartbeat,
    Hello,
    Message,
    ProtocolError,
    Welcome,
    decode_daemon,
    encode,
)
from client.errors import CheckpointError

_RECV_BYTES = 1 << 16
#: Longest path a Unix socket address can hold on Linux.
MAX_SOCKET_PATH = 107


class Channel:
    def __init__(self, sock: socket.socket, welcome: Welcome, frames: FrameReader, token: str = "") -> None:
        self.sock = sock
        self.token = token  # this connection's name in the daemon's StatusReply.connections
        self.welcome = welcome
        self._frames = frames
        self._send_lock = threading.Lock()  # one frame at a time on the stream
        self._state = threading.Lock()  # guards closed/_end; never held while blocked on I/O
        self.closed = False
        # Seconds a send may make no progress (the daemon reads nothing) before the connection is
        # given up as unresponsive; the client sets its liveness_timeout_s.
        self.send_timeout_s = 30.0
        self._partial = 0  # bytes of the frame being sent that went
        self._thread: threading.Thread | None = None
        # What this connection was told, so a reconnect (from any thread) starts from nothing.
        self.arenas: set[int] = set()
        self.layouts: set[int] = set()
        self.last_frame = time.monotonic()  # when the daemon last sent something
        self._end: tuple[str, str] | None = None  # why this side ended it: (reason, code)

    @classmethod
    def open(cls, path: Path, timeout_s: float = 10.0) -> Channel:
        """Connect and exchange Hello/Welcome. ``OSError`` when nothing listens on ``path``;
        ``CheckpointError`` when something does but refuses, or does not answer in ``timeout_s``."""
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise CheckpointError(
                f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; choose a shorter one "
                "(CKPTD_SOCKET)",
                code="bad_socket",
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout_s)
            try:
                sock.connect(str(path))
            except TimeoutError as e:  # its listen backlog is full: nobody accepts
                raise CheckpointError(
                    f"ckptd at {path} did not accept the connection within {timeout_s:g} s: it is "
                    f"stopped, hung or overloaded; check `ckptd status` and {path}.log, or restart it",
                    code="daemon_unresponsive",
                ) from e
            token = secrets.token_hex(8)
            msg, frames = _hello(sock, path, timeout_s, token)
        except BaseException:
            sock.close()
            raise
        if isinstance(msg, Failed):
            sock.close()
            raise CheckpointError(f"ckptd at {path} refused the connection: {msg.message}", code=msg.code)
        if not isinstance(msg, Welcome):
            sock.close()
            raise CheckpointError(f"ckptd at {path} answered hello with {msg.kind}", code="protocol")
        sock.settimeout(None)
        _check_peer(sock, path)
        return cls(sock, msg, frames, token)

    def call(self, message: Message) -> DaemonMessage:
        """Send and wait for the next reply; only before ``start()`` (tools like ``ckptd status``)."""
        if self._thread is not None:
            raise RuntimeError("call() is for channels without an I/O thread")
        self.send(message)
        while True:
            data = self.sock.recv(_RECV_BYTES)
            if not data:
                raise CheckpointError("ckptd closed the connection", code="daemon_died")
            for body in self._frames.feed(data):
                msg = decode_daemon(body)
                if not isinstance(msg, Heartbeat):
                    return msg

    def start(
        self, on_message: Callable[[DaemonMessage], None], on_close: Callable[[str, str], None]
    ) -> None:
        self._thread = threading.Thread(
            target=self._read_loop, args=(on_message, on_close), name="ckptd-client-io", daemon=True
        )
        self._thread.start()

    def send(self, message: Message, fds: tuple[int, ...] = ()) -> None:
        try:
            data = encode(message)
        except ProtocolError as e:
            raise CheckpointError(str(e), code="too_large") from e
        self.send_bytes(data, fds)

    def send_bytes(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        """Send one encoded frame (with descriptors as SCM_RIGHTS); returns once all of it is in
        the kernel. A daemon that reads none of it for ``send_timeout_s`` (stopped, hung) ends
        the connection as unresponsive instead of blocking the caller forever; so does a frame
        left half sent (by an error or an interrupt): the stream could not be parsed after it."""
        with self._send_lock:
            if self.closed:
                reason, code = self.end
                raise CheckpointError(reason, code=code)
            view = memoryview(data)
            try:
                self._send_within(view, fds)
            except OSError as e:
                why = f"could not reach ckptd ({e.strerror or e}); the daemon died or was stopped"
                self.abort(why, "daemon_died")
                reason, code = self.end
                raise CheckpointError(reason, code=code) from e
            except BaseException:
                if 0 < self._partial < len(view):
                    self.abort("a frame to ckptd was interrupted half sent", "daemon_died")
                raise

    def _send_within(self, view: memoryview, fds: tuple[int, ...]) -> None:
        """Send ``view`` without blocking in the kernel, waiting for room at most
        ``send_timeout_s`` at a time; ``_partial`` counts what went, for the caller's cleanup."""
        self._partial = 0
        deadline = time.monotonic() + self.send_timeout_s
        with_fds = list(fds)
        while self._partial < len(view):
            try:
                if with_fds:
                    n = socket.send_fds(self.sock, [view], with_fds, socket.MSG_DONTWAIT)
                    with_fds = []  # they went with the first byte
                else:
                    n = self.sock.send(view[self._partial :], socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                n = 0
            if n:
                self._partial += n
                deadline = time.monotonic() + self.send_timeout_s
                continue
            if self.closed:
                reason, code = self.end
                raise CheckpointError(reason, code=code)
            left = deadline - time.monotonic()
            if left <= 0:
                pid = self.welcome.pid
                self.abort(
                    f"ckptd (pid {pid}) read nothing of a {len(view)}-byte frame for "
                    f"{self.send_timeout_s:g} s: it is stopped (`kill -CONT {pid}`) or hung",
                    "daemon_unresponsive",
                )
                reason, code = self.end
                raise CheckpointError(reason, code=code)
            _poll(self.sock, select.POLLOUT, min(left, 0.25))

    def _read_loop(
        self, on_message: Callable[[DaemonMessage], None], on_close: Callable[[str, str], None]
    ) -> None:
        reason = "ckptd closed the connection (the daemon died or was stopped)"
        try:
            while True:
                data = self.sock.recv(_RECV_BYTES)
                if not data:
                    break
                self.last_frame = time.monotonic()
                for body in self._frames.feed(data):
                    on_message(decode_daemon(body))
        except ProtocolError as e:
            reason = f"ckptd sent a malformed reply ({e})"
        except OSError as e:
            if not self.closed:
                reason = f"connection to ckptd failed ({e})"
        finally:
            with self._state:
                if self._end is None:
                    self._end = (reason, "daemon_died")
                self.closed = True
            with contextlib.suppress(OSError):  # make sure the daemon sees the end too
                self.sock.shutdown(socket.SHUT_RDWR)
            on_close(*self._end)

    @property
    def end(self) -> tuple[str, str]:
        """Why the connection ended, and the code its pending snapshots fail with."""
        return self._end or ("the connection to ckptd is closed", "daemon_died")

    def has_unread(self) -> bool:
        """Whether the daemon sent bytes the I/O thread has not read yet (this process was
        stopped or starved, not the daemon)."""
        try:
            return _poll(self.sock, select.POLLIN, 0)
        except (OSError, ValueError):
            return False

    def abort(self, reason: str, code: str) -> None:
        """End the connection from this side: ``on_close`` gets ``reason`` and ``code``. Never
        waits for a send in progress (the shutdown wakes it)."""
        with self._state:
            if self.closed:
                return
            self._end = (reason, code)
            self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._state:
            if not self.closed:
                self._end = ("this client closed its connection to ckptd", "closed")
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.sock.close()


def _poll(sock: socket.socket, events: int, timeout_s: float) -> bool:
    """Whether ``sock`` is ready for ``events`` (or failed) within ``timeout_s``; poll, not
    select: a trainer's descriptors are often numbered past select's 1024."""
    poller = select.poll()
    poller.register(sock, events)
    return bool(poller.poll(timeout_s * 1000))


def _hello(
    sock: socket.socket, path: Path, timeout_s: float, token: str
) -> tuple[DaemonMessage, FrameReader]:
    """Send Hello and read the daemon's answer (heartbeats aside); every way it can go wrong is
    a ``CheckpointError`` naming the socket."""
    refused: OSError | None = None
    try:
        sock.sendall(encode(Hello(version=PROTOCOL_VERSION, pid=os.getpid(), token=token)))
    except OSError as e:  # refused already: read the reason it sent, if any
        refused = e
    frames = FrameReader()
    while True:
        try:
            data = sock.recv(_RECV_BYTES)
        except TimeoutError as e:
            pid = _peer(sock)[0]
            raise CheckpointError(
                f"ckptd at {path} (pid {pid}) accepted the connection but did not answer hello within "
                f"{timeout_s:g} s: it is stopped (`kill -CONT {pid}`), hung or overloaded. Check "
                f"`ckptd status` and {path}.log, restart it, or raise connect_timeout_s",
                code="daemon_unresponsive",
            ) from e
        except OSError as e:
            refused, data = e, b""
        if not data:
            why = f" ({refused.strerror or refused})" if refused is not None else ""
            raise CheckpointError(
                f"ckptd at {path} closed the connection before answering hello{why}: it refuses new "
                f"clients (too many connections?) or is shutting down; see {path}.log and `ckptd status`",
                code="refused",
            ) from refused
        try:
            for body in frames.feed(data):
                msg = decode_daemon(body)
                if not isinstance(msg, Heartbeat):
                    return msg, frames
        except ProtocolError as e:
            raise CheckpointError(f"ckptd at {path} answered hello with {e}", code="protocol") from e


def _peer(sock: socket.socket) -> tuple[int, int]:
    """The pid and uid of the process listening on the other end."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


def _check_peer(sock: socket.socket, path: Path) -> None:
    """Refuse a daemon run by another user: it would receive this process's tensors."""
    _, uid = _peer(sock)
    if uid not in (os.geteuid(), 0):
        sock.close()
        raise CheckpointError(
            f"the process listening on {path} runs as uid {uid}, not as you ({os.geteuid()}); "
            "refusing to hand it your tensors. Remove that socket or use another (CKPTD_SOCKET)",
            code="wrong_owner",
        )
