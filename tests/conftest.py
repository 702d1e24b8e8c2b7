"""Fixtures that start real daemon processes on real Unix sockets, and clean up all they made."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from client import Client

TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass
class DaemonProc:
    proc: subprocess.Popen[bytes]
    socket: Path
    root: Path
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short temp directory (Unix socket paths must stay under 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="ckptd-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes] | None, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before listening")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(path))
            return
        except OSError:
            time.sleep(0.05)
        finally:
            s.close()
    raise TimeoutError(f"nothing listens on {path} after {timeout_s}s")


@pytest.fixture
def start_daemon(workdir: Path) -> Iterator[Callable[..., DaemonProc]]:
    """Start ``ckptd serve`` (or ``tests/faulty_daemon.py`` with ``faults=``) as a real process."""
    started: list[DaemonProc] = []

    def start(
        *args: str,
        root: Path | None = None,
        sock: Path | None = None,
        faults: str | None = None,
        env: dict[str, str] | None = None,
    ) -> DaemonProc:
        n = len(started)
        root = root or workdir / "root"
        sock = sock or workdir / f"d{n}.sock"
        log = workdir / f"d{n}.log"
        if faults is None:
            cmd = [sys.executable, "-m", "ckptd", "serve"]
        else:
            cmd = [sys.executable, str(TESTS / "faulty_daemon.py"), faults]
        cmd += ["--root", str(root), "--socket", str(sock), *args]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )
        d = DaemonProc(proc, sock, root, log)
        started.append(d)
        try:
            wait_for_socket(sock, proc)
        except Exception:
            raise RuntimeError(f"daemon did not start:\n{d.log_text()}") from None
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


@pytest.fixture
def daemon(start_daemon: Callable[..., DaemonProc]) -> DaemonProc:
    return start_daemon()


@pytest.fixture
def connect() -> Iterator[Callable[..., Client]]:
    """Connect clients (no autostart unless asked); all are closed at the end."""
    clients: list[Client] = []

    def make(d: DaemonProc, **options: object) -> Client:
        options.setdefault("autostart", False)
        c = Client.connect(d.socket, **options)  # type: ignore[arg-type]
        clients.append(c)
        return c

    yield make
    for c in clients:
        try:
            c.close(timeout_s=30)
        except Exception:  # a test that expected a failure may leave one unobserved
            pass


@pytest.fixture
def client(daemon: DaemonProc, connect: Callable[..., Client]) -> Client:
    return connect(daemon)
