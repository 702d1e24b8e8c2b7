"""The operator's connection to a daemon (``ckptd status``, ``ckptd stop``): blocking, one
request at a time, no threads. It says hello as an operator, so the daemon does not count it
among its clients, and skips the heartbeats every connection gets."""

from __future__ import annotations

import os
import socket
import time
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

#: Longest path a Unix socket address can hold on Linux.
MAX_SOCKET_PATH = 107


class OperatorError(RuntimeError):
    """The daemon refused, went away, or did not answer in time; the message says which."""


class OperatorChannel:
    def __init__(self, sock: socket.socket, path: Path) -> None:
        self._sock = sock
        self._path = path
        self._frames = FrameReader()
        self._ready: list[bytes] = []
        self.welcome: Welcome | None = None

    @classmethod
    def open(cls, path: Path, timeout_s: float = 10.0) -> OperatorChannel:
        """Connect and say hello. ``OSError`` when nothing listens on ``path``; ``OperatorError``
        when something does but refuses or does not answer within ``timeout_s``."""
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise OperatorError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            channel = cls(sock, path)
            channel._send(Hello(version=PROTOCOL_VERSION, pid=os.getpid(), role="operator"))
            reply = channel.receive(timeout_s)
        except BaseException:
            sock.close()
            raise
        if not isinstance(reply, Welcome):
            sock.close()
            raise OperatorError(f"the daemon on {path} did not welcome us: {_describe(reply)}")
        channel.welcome = reply
        return channel

    def call(self, message: Message, timeout_s: float = 10.0) -> DaemonMessage:
        """Send ``message`` and return the daemon's reply (``Failed`` raises)."""
        self._send(message)
        reply = self.receive(timeout_s)
        if isinstance(reply, Failed):
            raise OperatorError(f"the daemon refused {message.__class__.__name__}: {reply.message}")
        return reply

    def receive(self, timeout_s: float) -> DaemonMessage:
        """The next message that is not a heartbeat."""
        deadline = time.monotonic() + timeout_s
        while True:
            while self._ready:
                msg = decode_daemon(self._ready.pop(0))
                if not isinstance(msg, Heartbeat):
                    return msg
            chunk = self._recv(deadline)
            if not chunk:
                raise OperatorError(f"the daemon on {self._path} closed the connection")
            try:
                self._ready += self._frames.feed(chunk)
            except ProtocolError as e:
                raise OperatorError(f"the daemon on {self._path} sent a bad frame: {e}") from e

    def wait_closed(self, timeout_s: float) -> bool:
        """Wait until the daemon closes this connection (it does once its drain is over); False
        if it is still open after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        try:
            while self._recv(deadline):
                pass
        except OperatorError:
            return False
        except OSError:  # reset: gone
            return True
        return True

    def close(self) -> None:
        self._sock.close()

    def _send(self, message: Message) -> None:
        self._sock.sendall(encode(message))

    def _recv(self, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise OperatorError(f"the daemon on {self._path} did not answer in time")
        self._sock.settimeout(left)
        try:
            return self._sock.recv(1 << 16)
        except TimeoutError:
            raise OperatorError(f"the daemon on {self._path} did not answer in time") from None


def _describe(msg: DaemonMessage) -> str:
    return msg.message if isinstance(msg, Failed) else msg.kind
