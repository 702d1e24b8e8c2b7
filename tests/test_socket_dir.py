"""The socket's directory against another user, a fresh machine, and a root deleted under the daemon.

Two real unprivileged users (uids no one else uses, made per test run with ``setpriv``): an
attacker prepares ``/tmp/ckptd-<victim uid>`` (the default socket directory) before the victim's
first trainer autostarts a daemon there. The victim keeps CAP_DAC_READ_SEARCH only so that it can
read the interpreter and the repository wherever they are installed; it writes as itself.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import DaemonProc
from helpers import wait_until

import ckptd
from client import CheckpointError, Client

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "demo.py"

# The victim's first trainer: connect with every default (autostart, default socket), take one
# snapshot, and print what happened as JSON.
VICTIM = """
import json, sys, torch
from client import CheckpointError, Client
try:
    c = Client.connect(run="r", connect_timeout_s=60)
    info = c.snapshot({"w": torch.arange(4.0)}, step=1).wait(60)
    print(json.dumps({"ok": str(info.path), "socket": str(c.socket_path)}))
    c.close()
except CheckpointError as e:
    print(json.dumps({"code": e.code, "message": str(e)}))
"""


@dataclass
class Users:
    victim: int
    attacker: int
    home: Path  # the victim's home and working directory (0700, theirs)

    @property
    def default_dir(self) -> Path:
        return Path(f"/tmp/ckptd-{self.victim}")

    def env(self, **extra: str) -> dict[str, str]:
        """The victim's environment: no CKPTD_* and no XDG_RUNTIME_DIR, as on a fresh login."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "TMPDIR": str(self.home),
        }
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env | extra

    def run(
        self, uid: int, argv: list[str], timeout_s: float = 120, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            as_user(uid, argv),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            cwd=self.home,
            env=self.env(),
            **kw,  # type: ignore[arg-type]
        )

    def victim_trainer(self, **env: str) -> dict[str, str]:
        done = subprocess.run(
            as_user(self.victim, [sys.executable, "-c", VICTIM]),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
            cwd=self.home,
            env=self.env(**env),
        )
        assert done.returncode == 0, done.stdout + done.stderr
        result: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def attacker_python(self, code: str) -> None:
        done = self.run(self.attacker, [sys.executable, "-c", code], timeout_s=60)
        assert done.returncode == 0, done.stderr

    def processes(self, uid: int) -> list[int]:
        """Pids of the processes running as ``uid`` (only this test starts any)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
            state = next(line for line in status.splitlines() if line.startswith("State:")).split()[1]
            if str(uid) in uids and state != "Z":
                pids.append(int(entry))
        return pids


def as_user(uid: int, argv: list[str]) -> list[str]:
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
        *argv,
    ]


@pytest.fixture
def users() -> Iterator[Users]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as two other users")
    victim = 40000 + 2 * (os.getpid() % 10000)
    home = Path(tempfile.mkdtemp(prefix="ckptd-home-"))
    os.chown(home, victim, victim)
    u = Users(victim, victim + 1, home)
    shutil.rmtree(u.default_dir, ignore_errors=True)
    if u.default_dir.is_symlink():
        u.default_dir.unlink()
    yield u
    for uid in (u.victim, u.attacker):  # a daemon either of them left running
        for pid in u.processes(uid):
            os.kill(pid, signal.SIGKILL)
    if u.default_dir.is_symlink():
        u.default_dir.unlink()
    shutil.rmtree(u.default_dir, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)


def assert_refused(result: dict[str, str], users: Users, *words: str) -> None:
    assert result.get("code") == "unsafe_socket_dir", result
    message = result["message"]
    for w in (str(users.default_dir), "CKPTD_SOCKET", *words):
        assert w in message, message


# --- item 3: another user made the default socket directory ------------------------------------


@pytest.mark.parametrize("target", ["existing", "new"])
def test_attacker_dir_with_symlinked_log_writes_nothing_through_it(users: Users, target: str) -> None:
    precious = users.home / "precious"
    precious.write_text("mine\n")
    os.chown(precious, users.victim, users.victim)
    link_to = precious if target == "existing" else users.home / "created-by-ckptd"
    users.attacker_python(
        f"import os; d = {str(users.default_dir)!r}; os.mkdir(d); os.chmod(d, 0o1777); "
        f"os.symlink({str(link_to)!r}, d + '/ckptd.sock.log')"
    )
    result = users.victim_trainer()
    assert_refused(result, users, f"owned by uid {users.attacker}", "remove")
    # What autostart runs, run directly: the CLI refuses before opening the log.
    done = users.run(
        users.victim,
        [
            sys.executable,
            "-m",
            "ckptd",
            "serve",
            "--detach",
            "--log-file",
            str(users.default_dir / "ckptd.sock.log"),
        ],
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"owned by uid {users.attacker}" in done.stderr and "CKPTD_SOCKET" in done.stderr, done.stderr
    assert precious.read_text() == "mine\n"
    assert not (users.home / "created-by-ckptd").exists()
    assert users.processes(users.victim) == []  # no daemon serves from the attacker's directory


def test_attacker_precreated_log_learns_nothing(users: Users) -> None:
    users.attacker_python(
        f"import os; d = {str(users.default_dir)!r}; os.mkdir(d); os.chmod(d, 0o1777); "
        "fd = os.open(d + '/ckptd.sock.log', os.O_CREAT | os.O_WRONLY, 0o666); os.fchmod(fd, 0o666)"
    )
    result = users.victim_trainer()
    assert_refused(result, users, f"owned by uid {users.attacker}")
    assert (users.default_dir / "ckptd.sock.log").read_bytes() == b""  # no root, run or pid leaked
    assert list(users.home.iterdir()) == []  # nothing written, no ./checkpoints either


ATTACKER_LISTENER = """
import os, socket, sys
d = sys.argv[1]
os.mkdir(d, 0o755)
s = socket.socket(socket.AF_UNIX)
s.bind(d + "/ckptd.sock")
os.chmod(d + "/ckptd.sock", 0o777)
s.listen(8)
print("listening", flush=True)
s.settimeout(60)
while True:
    try:
        c, _ = s.accept()
    except (TimeoutError, OSError):
        break
    print("connected", flush=True)
    c.close()
"""


def test_attacker_planted_socket_is_never_connected_to(users: Users) -> None:
    listener = subprocess.Popen(
        as_user(users.attacker, [sys.executable, "-c", ATTACKER_LISTENER, str(users.default_dir)]),
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
        env=users.env(),
    )
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "listening"
        result = users.victim_trainer()
        assert_refused(result, users, f"owned by uid {users.attacker}")
    finally:
        listener.kill()
        out, _ = listener.communicate(timeout=30)
    assert "connected" not in out  # the victim never handed the attacker's socket a connection


def test_default_dir_as_a_symlink_is_refused(users: Users) -> None:
    users.attacker_python(
        f"import os; os.mkdir({str(users.home)!r} + '-a', 0o777); "
        f"os.symlink({str(users.home)!r} + '-a', {str(users.default_dir)!r})"
    )
    try:
        result = users.victim_trainer()
        assert_refused(result, users, "symlink")
        assert not Path(str(users.home) + "-a", "ckptd.sock.log").exists()
    finally:
        shutil.rmtree(str(users.home) + "-a", ignore_errors=True)


def test_socket_in_a_sticky_world_writable_dir_is_refused(workdir: Path) -> None:
    shared = workdir / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp itself
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptd",
            "serve",
            "--detach",
            "--root",
            str(workdir / "root"),
            "--socket",
            str(shared / "s.sock"),
            "--log-file",
            str(shared / "s.sock.log"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "writable by other users" in done.stderr and "sticky" in done.stderr, done.stderr
    assert "chmod 700" in done.stderr and "CKPTD_SOCKET" in done.stderr, done.stderr
    assert list(shared.iterdir()) == []


@pytest.mark.parametrize("kind", ["symlink", "fifo", "hardlink"])
def test_log_that_is_not_a_plain_file_of_ours_is_refused(workdir: Path, kind: str) -> None:
    log, target = workdir / "s.sock.log", workdir / "target"
    what = {"symlink": "a symlink", "fifo": "a FIFO or socket", "hardlink": "a file with 2 hard links"}
    target.write_text("keep\n")
    if kind == "symlink":
        log.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(log)
    else:
        os.link(target, log)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptd",
            "serve",
            "--detach",
            "--root",
            str(workdir / "root"),
            "--socket",
            str(workdir / "s.sock"),
            "--log-file",
            str(log),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"refusing the log file {log}: it is {what[kind]}; remove it" in done.stderr, done.stderr
    assert target.read_text() == "keep\n"
    assert not (workdir / "s.sock").exists()


# --- item 5: a fresh machine -----------------------------------------------------------------------


def daemon_pid(sock: Path, uid: int | None = None) -> int | None:
    """The pid ``ckptd status`` reports, asked as ``uid`` (a daemon answers its own user only)."""
    argv = [sys.executable, "-m", "ckptd", "status", "--socket", str(sock), "--json"]
    done = subprocess.run(
        argv if uid is None else as_user(uid, argv),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return int(json.loads(done.stdout)["pid"]) if done.returncode == 0 else None


@pytest.mark.slow
def test_demo_on_a_fresh_machine_as_readme_runs_it(users: Users) -> None:
    """`make demo` as a new user: no /tmp/ckptd-<uid>, no CKPTD_*, no XDG_RUNTIME_DIR."""
    assert not users.default_dir.exists()
    done = users.run(
        users.victim,
        [
            sys.executable,
            str(DEMO),
            "--steps",
            "3",
            "--every",
            "2",
            "--hidden",
            "64",
            "--layers",
            "1",
            "--vocab",
            "256",
            "--batch",
            "2",
            "--seq",
            "16",
            "--run",
            "demo",
        ],
        timeout_s=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "restore: OK" in done.stdout, out
    st = users.default_dir.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (users.victim, 0o700)
    log = users.default_dir / "ckptd.sock.log"
    assert (log.stat().st_uid, log.stat().st_mode & 0o777) == (users.victim, 0o600)
    assert "ckptd serving" in log.read_text()
    assert ckptd.latest(users.home / "checkpoints", "demo") is not None
    pid = daemon_pid(users.default_dir / "ckptd.sock", users.victim)
    assert pid is not None and pid in users.processes(users.victim)
    os.kill(pid, signal.SIGTERM)  # the fixture kills whatever is left
    wait_until(lambda: pid not in users.processes(users.victim), 30, "the demo's daemon to stop")


def test_fresh_xdg_runtime_dir(users: Users) -> None:
    runtime = users.home / "run"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, users.victim, users.victim)
    result = users.victim_trainer(XDG_RUNTIME_DIR=str(runtime))
    assert "ok" in result, result
    assert result["socket"] == str(runtime / "ckptd" / "ckptd.sock")
    assert (runtime / "ckptd").stat().st_mode & 0o777 == 0o700
    pid = daemon_pid(runtime / "ckptd" / "ckptd.sock", users.victim)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: pid not in users.processes(users.victim), 30, "the daemon to stop")


def test_detach_with_a_log_file_in_a_missing_directory(workdir: Path) -> None:
    """What deploy/slurm/train.sbatch runs on a node where its socket directory is new."""
    job = workdir / "ckptd-1234"
    pids = []
    try:
        for sock, log in (
            (job / "ckptd.sock", job / "ckptd.log"),
            (workdir / "b.sock", workdir / "logs" / "x.log"),
        ):
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "ckptd",
                    "serve",
                    "--detach",
                    "--root",
                    str(workdir / "root" / sock.stem),
                    "--socket",
                    str(sock),
                    "--log-file",
                    str(log),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            pid = daemon_pid(sock)
            assert pid is not None
            pids.append(pid)
            assert "ckptd serving" in log.read_text()
        assert job.stat().st_mode & 0o777 == 0o700
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)


# --- item 13: the root deleted while the daemon runs ------------------------------------------------


def tree() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(1 << 16, dtype=torch.float32)}


def test_root_deleted_mid_write_reports_root_gone_and_the_daemon_stops(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d1 = start_daemon(faults="slow:0.5")
    c = connect(d1, run="r")
    c.snapshot(tree(), step=1).wait(60)
    handle = c.snapshot(tree(), step=2)
    wait_until(lambda: any(".ckptd-tmp-" in p.name for p in (d1.root / "r").iterdir()), 30, "step 2 staged")
    shutil.rmtree(d1.root)
    with pytest.raises(CheckpointError) as e:
        handle.wait(60)
    assert e.value.code == "root_gone", e.value
    msg = str(e.value)
    assert str(d1.root) in msg and "deleted" in msg and "older checkpoints are intact" not in msg, msg
    assert "start ckptd again" in msg, msg
    assert d1.proc.wait(30) == 1  # it stops: the path is free for a daemon that owns it
    assert "was deleted" in d1.log_text()
    assert not d1.root.exists()  # nothing was made again under the deleted path


def test_a_replaced_root_is_never_served_by_two_daemons(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d1 = start_daemon()
    c1 = connect(d1, run="r")
    c1.snapshot(tree(), step=1).wait(60)
    shutil.rmtree(d1.root)
    d1.root.mkdir()  # made again: the first daemon's lock went with the old one
    d2 = start_daemon(root=d1.root)  # starts: nothing locks the new root
    with pytest.raises(CheckpointError) as e:
        c1.snapshot(tree(), step=2).wait(60)
    assert e.value.code in ("root_gone", "daemon_died"), e.value
    if e.value.code == "root_gone":
        assert "replaced" in str(e.value) or "deleted" in str(e.value), e.value
    assert d1.proc.wait(30) == 1  # the first daemon stops within a check interval
    assert d2.proc.poll() is None
    c2 = connect(d2, run="r")
    c2.snapshot(tree(), step=2).wait(60)
    assert ckptd.latest(d1.root, "r") == d1.root / "r" / "step-000002"
    assert [p.name for p in (d1.root / "r").iterdir() if p.name.startswith("step-")] == ["step-000002"]


def test_idle_daemon_stops_once_its_root_is_gone(start_daemon: Callable[..., DaemonProc]) -> None:
    d1 = start_daemon()
    shutil.rmtree(d1.root)
    t0 = time.monotonic()
    assert d1.proc.wait(30) == 1
    assert time.monotonic() - t0 < 10
    assert not d1.socket.exists()  # a client's autostart gets a fresh daemon
    assert "was deleted" in d1.log_text()


def test_eio_while_the_root_glitches_fails_that_snapshot_and_the_daemon_serves_on(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    """EIO from a write, and from every stat of the root for 2 s after it (a flaky mount), is an
    I/O error of that snapshot: the root is still there, so the daemon neither stops nor refuses."""
    d = start_daemon(faults="eio-glitch:2")
    c = connect(d, run="r")
    c.snapshot(tree(), step=1).wait(60)
    with pytest.raises(CheckpointError) as e:
        c.snapshot(tree(), step=2).wait(60)
    assert e.value.code == "io_error" and e.value.errno == errno.EIO, e.value
    assert "EIO" in str(e.value) and "older checkpoints are intact" in str(e.value), e.value
    time.sleep(3)  # the idle root check runs through the glitch too
    assert d.proc.poll() is None, d.log_text()
    assert "EIO from stat" in d.log_text()  # the fault did reach the root check
    info = c.snapshot(tree(), step=3).wait(60)
    assert info is not None and info.path == d.root / "r" / "step-000003"
    assert ckptd.latest(d.root, "r") == d.root / "r" / "step-000003"
    assert "root_gone" not in d.log_text() and "cannot be reached" not in d.log_text()


# --- item 16 (part): run="" -------------------------------------------------------------------------


def test_empty_run_name_is_refused_not_written_to_default(
    daemon: DaemonProc, connect: Callable[..., Client]
) -> None:
    c = connect(daemon)  # run="default"
    with pytest.raises(ValueError, match="run name ''"):
        c.snapshot(tree(), step=1, run="")
    assert not (daemon.root / "default").exists()
