"""The demo (``make demo``) end to end: it autostarts a daemon, trains, snapshots, restores and
checks, and leaves the daemon running, which this test then stops."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ckptd

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "demo.py"


def daemon_pid(sock: Path, env: dict[str, str]) -> int | None:
    """The pid of the daemon answering on ``sock``, from ``ckptd status --json``; None if none."""
    done = subprocess.run(
        [sys.executable, "-m", "ckptd", "status", "--socket", str(sock), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        return None
    pid: int = json.loads(done.stdout)["pid"]
    return pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # The detached daemon is not our child: once it exits it may stay a zombie until whoever
    # adopted it reaps it, and a zombie answers kill(0). It has stopped all the same.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop(pid: int, timeout_s: float = 30) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"daemon {pid} still running {timeout_s}s after SIGTERM; killed")
        time.sleep(0.05)


@pytest.mark.slow
def test_demo_trains_snapshots_restores_and_leaves_the_daemon_running(workdir: Path) -> None:
    sock, root = workdir / "s.sock", workdir / "root"
    env = {**os.environ, "CKPTD_SOCKET": str(sock), "CKPTD_ROOT": str(root)}
    try:
        # cwd in the temp dir: whatever the demo writes relative to it stays out of the repo.
        done = subprocess.run(
            [sys.executable, str(DEMO), "--steps", "12", "--every", "5", "--run", "demo"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        out = done.stdout + done.stderr
        assert done.returncode == 0, out
        assert re.search(r"^restore: OK, step \d+ .* tensors match$", done.stdout, re.M), out
        assert "MISMATCH" not in out
        assert "FAILED" not in out

        # One line per snapshot (step, loss, stall ms, durable ms), steps multiples of 5 but the last.
        rows = re.findall(r"^\s*(\d+)\s+(\d+\.\d+)\s+(\d+\.\d) ms\s+(\d+\.\d) ms$", done.stdout, re.M)
        assert len(rows) >= 2, out
        steps = [int(r[0]) for r in rows]
        assert steps == sorted(set(steps)), steps  # a run's snapshots commit in step order
        assert all(s % 5 == 0 for s in steps[:-1]), steps
        assert re.search(r"^snapshots: (\d+) taken, \1 committed, 0 failed$", done.stdout, re.M), out

        path = ckptd.latest(root, "demo")
        assert path is not None
        assert path.name == f"step-{max(steps):06d}"
        assert f"checkpoint: {path}" in done.stdout
        assert ckptd.verify(path) == []
        state = ckptd.load(path)
        assert state["step"] == max(steps)
        assert set(state) == {"model", "optimizer", "step", "loss"}

        # The daemon outlives the demo; the pid the demo printed is the one answering.
        m = re.search(r"^daemon: pid (\d+) keeps running", done.stdout, re.M)
        assert m, out
        pid = int(m.group(1))
        assert alive(pid)
        assert daemon_pid(sock, env) == pid
    finally:
        # Stop the autostarted daemon even when the demo failed before printing its pid.
        running = daemon_pid(sock, env)
        if running is not None:
            stop(running)
    assert not alive(pid)
    assert daemon_pid(sock, env) is None
