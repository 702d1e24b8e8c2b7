"""Where the daemon listens by default, and how a client starts one when nothing answers.

The daemon is started as ``python -m ckptd serve --detach``: it forks, starts a new session (so
it outlives the trainer and ignores its terminal's signals), binds its socket, and only then lets
the launching command exit, with the start-up error if there was one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from client.errors import CheckpointError


def default_socket() -> Path:
    """``$CKPTD_SOCKET``, else ``$XDG_RUNTIME_DIR/ckptd/ckptd.sock``, else ``/tmp/ckptd-<uid>/ckptd.sock``."""
    env = os.environ.get("CKPTD_SOCKET")
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "ckptd" / "ckptd.sock"
    return Path(f"/tmp/ckptd-{os.getuid()}") / "ckptd.sock"


def default_root() -> Path:
    """``$CKPTD_ROOT``, else ``./checkpoints``."""
    return Path(os.environ.get("CKPTD_ROOT") or "checkpoints").absolute()


def spawn_daemon(socket_path: Path, root: Path, extra_args: list[str], timeout_s: float) -> None:
    """Start a detached daemon and return once it listens; its log is ``<socket>.log``."""
    cmd = [
        sys.executable,
        "-m",
        "ckptd",
        "serve",
        "--detach",
        "--root",
        str(root),
        "--socket",
        str(socket_path),
        "--log-file",
        str(socket_path) + ".log",
        *extra_args,
    ]
    try:
        done = subprocess.run(
            cmd,
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as e:
        raise CheckpointError(
            f"ckptd did not start within {timeout_s}s (see {socket_path}.log)", code="daemon_start"
        ) from e
    if done.returncode != 0:
        raise CheckpointError(
            f"could not start ckptd: {done.stderr.strip() or done.stdout.strip()}", code="daemon_start"
        )
