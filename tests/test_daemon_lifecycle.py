"""The daemon's life as a user sees it: start, refuse a second one, recover from a crash, sweep
leftovers, drain on SIGTERM, and be started by a client when nothing answers."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import DaemonProc, wait_for_socket
from torch import nn

import ckptd
from ckptd.protocol import PROTOCOL_VERSION, Hello, encode
from client import CheckpointError, Client


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))


def commit_step(client: Client, step: int) -> Path:
    info = client.snapshot(small_model(step), step=step).wait(30)
    assert info is not None
    assert ckptd.verify(info.path) == []
    return info.path


def serve(*args: str | Path, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    """``ckptd serve ARGS...`` run to completion (for starts that must fail)."""
    return subprocess.run(
        [sys.executable, "-m", "ckptd", "serve", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pid: int, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


# --- one daemon per socket -----------------------------------------------------------------------


@pytest.mark.parametrize("detach", [False, True], ids=["foreground", "detach"])
def test_second_serve_on_a_live_socket_is_refused(
    daemon: DaemonProc, connect: Callable[..., Client], workdir: Path, detach: bool
) -> None:
    started = time.monotonic()
    done = serve(
        "--root", workdir / "other-root", "--socket", daemon.socket, *(["--detach"] if detach else [])
    )
    assert done.returncode != 0, done.stdout + done.stderr
    assert time.monotonic() - started < 15
    assert str(daemon.socket) in done.stderr
    assert "already" in done.stderr

    # The first daemon is untouched and still serves.
    assert daemon.proc.poll() is None
    assert daemon.socket.exists()
    client = connect(daemon)
    assert client.status().pid == daemon.proc.pid
    commit_step(client, 1)


def test_serve_refuses_a_socket_a_live_daemon_answers_even_without_its_lock(
    daemon: DaemonProc, connect: Callable[..., Client], workdir: Path
) -> None:
    # Someone removed the lock file (tmp cleaner, a user): the live socket must still win.
    daemon.socket.with_name(daemon.socket.name + ".lock").unlink()
    done = serve("--root", workdir / "other-root", "--socket", daemon.socket)
    assert done.returncode != 0, done.stdout + done.stderr
    assert str(daemon.socket) in done.stderr
    assert "already" in done.stderr
    assert daemon.socket.exists()
    commit_step(connect(daemon), 1)


def test_stale_socket_of_a_killed_daemon_is_replaced(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    first = start_daemon()
    first.kill()
    assert first.socket.exists()  # SIGKILL leaves the socket file behind
    s = socket.socket(socket.AF_UNIX)
    with pytest.raises(ConnectionRefusedError):
        s.connect(str(first.socket))
    s.close()

    second = start_daemon(sock=first.socket, root=first.root)
    assert stat.S_ISSOCK(os.stat(second.socket).st_mode)
    client = connect(second)
    assert client.status().pid == second.proc.pid
    commit_step(client, 1)


def test_socket_is_private(daemon: DaemonProc) -> None:
    st = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_client_of_another_uid_is_refused(daemon: DaemonProc) -> None:
    """Even with the socket opened to everyone, the daemon closes a connection of another uid
    without a welcome (peer credentials, DESIGN §1)."""
    os.chmod(daemon.socket.parent, 0o755)
    os.chmod(daemon.socket, 0o666)
    hello = encode(Hello(version=PROTOCOL_VERSION, pid=os.getpid()))
    pid = os.fork()
    if pid == 0:  # child: only syscalls, then _exit
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(str(daemon.socket))
            try:
                s.sendall(hello)
                code = 1 if s.recv(4096) else 0  # 0: closed without a word
            except (ConnectionResetError, BrokenPipeError):
                code = 0
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "a client of another uid got an answer"
    assert daemon.proc.poll() is None


# --- crash leftovers -----------------------------------------------------------------------------


def test_leftovers_are_swept_on_start(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    first = start_daemon()
    client = connect(first)
    committed = commit_step(client, 3)
    client.close()
    assert first.stop() == 0

    run_dir = first.root / "default"
    junk = run_dir / "step-000005.ckptd-tmp-abcd"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(os.urandom(5000))
    (junk / "ckptd.json").write_text("{half a manifest")
    (junk / "sub").mkdir()
    (junk / "sub" / "x").write_bytes(b"x")
    (run_dir / "LATEST.ckptd-tmp-ef01").write_text("step-000005\n")
    before = sorted(p.name for p in committed.iterdir())

    second = start_daemon(sock=first.socket, root=first.root)
    assert not junk.exists()
    assert not (run_dir / "LATEST.ckptd-tmp-ef01").exists()
    assert sorted(p.name for p in committed.iterdir()) == before
    assert ckptd.verify(committed) == []
    assert (run_dir / "LATEST").read_text().strip() == committed.name
    assert ckptd.latest(first.root) == committed

    # The swept step can be written for real now.
    assert commit_step(connect(second), 5) == run_dir / "step-000005"


# --- SIGTERM drains ------------------------------------------------------------------------------


def test_sigterm_drains_a_snapshot_being_written(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon("--workers", "1", faults="slow:0.2")  # every pwrite sleeps 0.2 s
    client = connect(d, max_shard_size="100KB")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128), nn.Linear(128, 128))  # 64 KiB weights
    handle = client.snapshot(model, step=7)
    d.proc.send_signal(signal.SIGTERM)
    assert not handle.done_now(), "the snapshot must still be in flight when SIGTERM arrives"

    info = handle.wait(60)
    assert info is not None
    assert info.path == d.root / "default" / "step-000007"
    assert ckptd.verify(info.path) == []
    loaded = ckptd.load(info.path)["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    assert d.proc.wait(30) == 0, d.log_text()
    assert not d.socket.exists()
    assert not [p for p in (d.root / "default").iterdir() if ".ckptd-tmp-" in p.name]


def test_sigterm_when_idle_exits_cleanly(daemon: DaemonProc) -> None:
    assert daemon.stop() == 0, daemon.log_text()
    assert not daemon.socket.exists()


# --- autostart -----------------------------------------------------------------------------------


def _serving_pids(sock: Path) -> list[int]:
    """Processes whose command line names this (test-unique) socket: the daemons we started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and os.fsencode(sock) in argv:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def auto_socket(workdir: Path) -> Iterator[Path]:
    """A socket path for autostarted daemons; every daemon serving it is killed afterwards."""
    sock = workdir / "auto.sock"
    yield sock
    for pid in _serving_pids(sock):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        wait_dead(pid)


def test_autostart_starts_a_detached_daemon(auto_socket: Path, workdir: Path) -> None:
    root = workdir / "auto-root"
    client = Client.connect(auto_socket, root=root)
    try:
        status = client.status()
        pid = status.pid
        assert pid != os.getpid()
        assert alive(pid)
        assert os.getsid(pid) != os.getsid(0), "the daemon must run in its own session"
        group = Path(f"/proc/{pid}/autogroup")
        if group.exists():  # its own scheduling group yields the CPU to the training session
            assert group.read_text().split()[-1] == "10", group.read_text()
        assert Path(status.root) == root
        assert stat.S_IMODE(os.stat(auto_socket).st_mode) == 0o600

        info = client.snapshot(small_model(), step=1).wait(30)
        assert info is not None
        assert info.path == root / "default" / "step-000001"
        assert ckptd.verify(info.path) == []
    finally:
        client.close()

    # It outlives the client that started it, and the next client uses it.
    time.sleep(0.2)
    assert alive(pid)
    with Client.connect(auto_socket, autostart=False) as again:
        assert again.status().pid == pid
        assert again.root == root


def test_autostarted_daemon_root_mismatch_and_no_daemon(auto_socket: Path, workdir: Path) -> None:
    root = workdir / "auto-root"
    other = workdir / "other-root"
    with Client.connect(auto_socket, root=root) as client:
        pid = client.status().pid

    with pytest.raises(CheckpointError) as err:
        Client.connect(auto_socket, root=other)
    assert err.value.code == "root_mismatch"
    assert str(root) in str(err.value)
    assert str(other) in str(err.value)
    assert _serving_pids(auto_socket) == [pid], "a mismatch must not start a second daemon"
    assert not other.exists()

    dead = workdir / "dead.sock"
    with pytest.raises(CheckpointError) as err:
        Client.connect(dead, autostart=False)
    assert err.value.code == "no_daemon"
    assert "ckptd serve" in str(err.value)
    assert str(dead) in str(err.value)
    assert not dead.exists()
    assert _serving_pids(dead) == []


def test_autostart_replaces_a_killed_daemon(auto_socket: Path, workdir: Path) -> None:
    root = workdir / "auto-root"
    with Client.connect(auto_socket, root=root) as client:
        first = client.status().pid
    os.kill(first, signal.SIGKILL)
    assert wait_dead(first)
    assert auto_socket.exists()  # stale

    with pytest.raises(CheckpointError):
        Client.connect(auto_socket, autostart=False)
    with Client.connect(auto_socket, root=root) as client:
        second = client.status().pid
        assert second != first
        assert commit_step(client, 2) == root / "default" / "step-000002"
    wait_for_socket(auto_socket, None, timeout_s=5)
    assert alive(second)
