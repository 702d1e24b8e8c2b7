"""The client's connection to the daemon: a Unix socket, a send lock, and one I/O thread.

Sends happen on the caller's thread (a few hundred bytes per snapshot; descriptors ride along
with ``RegisterArena``). The I/O thread reads replies and hands each to ``on_message``; when the
daemon goes away it calls ``on_close`` once, so pending snapshots fail at once instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from ckptd.protocol import (
    PROTOCOL_VERSION,
    DaemonMessage,
    Failed,
    FrameReader,
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
    def __init__(self, sock: socket.socket, welcome: Welcome, frames: FrameReader) -> None:
        self.sock = sock
        self.welcome = welcome
        self._frames = frames
        self._send_lock = threading.Lock()
        self.closed = False
        self._thread: threading.Thread | None = None
        # What this connection was told, so a reconnect (from any thread) starts from nothing.
        self.arenas: set[int] = set()
        self.layouts: set[int] = set()

    @classmethod
    def open(cls, path: Path, timeout_s: float = 10.0) -> Channel:
        """Connect and exchange Hello/Welcome. ``OSError`` when nothing answers on ``path``."""
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise CheckpointError(
                f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; choose a shorter one "
                "(CKPTD_SOCKET)",
                code="bad_socket",
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            sock.sendall(encode(Hello(version=PROTOCOL_VERSION, pid=os.getpid())))
            frames = FrameReader()
            reply: list[bytes] = []
            while not reply:
                data = sock.recv(_RECV_BYTES)
                if not data:
                    raise ConnectionResetError(f"ckptd at {path} closed the connection during hello")
                reply = frames.feed(data)
            msg = decode_daemon(reply[0])
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
        return cls(sock, msg, frames)

    def call(self, message: Message) -> DaemonMessage:
        """Send and wait for the next reply; only before ``start()`` (tools like ``ckptd status``)."""
        if self._thread is not None:
            raise RuntimeError("call() is for channels without an I/O thread")
        self.send(message)
        while True:
            data = self.sock.recv(_RECV_BYTES)
            if not data:
                raise CheckpointError("ckptd closed the connection", code="daemon_died")
            frames = self._frames.feed(data)
            if frames:
                return decode_daemon(frames[0])

    def start(self, on_message: Callable[[DaemonMessage], None], on_close: Callable[[str], None]) -> None:
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
        """Send one encoded frame (with descriptors as SCM_RIGHTS)."""
        with self._send_lock:
            if self.closed:
                raise CheckpointError("the connection to ckptd is closed", code="daemon_died")
            try:
                if fds:
                    sent = socket.send_fds(self.sock, [data], list(fds))
                    if sent < len(data):
                        self.sock.sendall(data[sent:])
                else:
                    self.sock.sendall(data)
            except OSError as e:
                raise CheckpointError(
                    f"could not reach ckptd ({e.strerror or e}); the daemon died or was stopped",
                    code="daemon_died",
                ) from e

    def _read_loop(
        self, on_message: Callable[[DaemonMessage], None], on_close: Callable[[str], None]
    ) -> None:
        reason = "ckptd closed the connection (the daemon died or was stopped)"
        try:
            while True:
                data = self.sock.recv(_RECV_BYTES)
                if not data:
                    break
                for body in self._frames.feed(data):
                    on_message(decode_daemon(body))
        except ProtocolError as e:
            reason = f"ckptd sent a malformed reply ({e})"
        except OSError as e:
            if not self.closed:
                reason = f"connection to ckptd failed ({e})"
        finally:
            with self._send_lock:
                self.closed = True
            with contextlib.suppress(OSError):  # make sure the daemon sees the end too
                self.sock.shutdown(socket.SHUT_RDWR)
            on_close(reason)

    def close(self) -> None:
        with self._send_lock:
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.sock.close()


def _check_peer(sock: socket.socket, path: Path) -> None:
    """Refuse a daemon run by another user: it would receive this process's tensors."""
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid not in (os.geteuid(), 0):
        sock.close()
        raise CheckpointError(
            f"the process listening on {path} runs as uid {uid}, not as you ({os.geteuid()}); "
            "refusing to hand it your tensors. Remove that socket or use another (CKPTD_SOCKET)",
            code="wrong_owner",
        )
