"""Where the daemon listens by default, and how a client starts one when nothing answers.

The daemon is started as ``python -m ckptd serve --detach``: it forks, starts a new session (so
it outlives the trainer and ignores its terminal's signals), binds its socket, and only then lets
the launching command exit, with the start-up error if there was one.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from ckptd import sockdir
from ckptd.paths import default_socket
from client.channel import Channel
from client.errors import CheckpointError

__all__ = ["connect_daemon", "default_root", "default_socket", "spawn_daemon"]  # default_socket: from paths

log = logging.getLogger(__name__)


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


def connect_daemon(
    socket_path: Path,
    *,
    autostart: bool,
    expected_root: Path | None,
    slots: int,
    daemon_args: tuple[str, ...],
    max_shard_size: int | str | None,
    timeout_s: float,
    hello_timeout_s: float | None = None,
) -> Channel:
    """A channel to the daemon on ``socket_path``, starting one if allowed, checked against what
    the client expects (its root, enough arenas). ``hello_timeout_s`` bounds the wait for a
    daemon that is already listening (``timeout_s`` by default; starting one may take longer)."""
    deadline = time.monotonic() + timeout_s
    try:  # before connecting or starting anything: a socket or log another user could plant
        sockdir.check_socket_dir(socket_path.parent)
    except FileNotFoundError:
        pass  # nothing listens there yet; the daemon started below makes the directory, 0700
    except sockdir.UnsafeSocketDir as e:
        raise CheckpointError(str(e), code="unsafe_socket_dir") from e
    try:
        channel = Channel.open(socket_path, min(timeout_s, hello_timeout_s or timeout_s))
    except (FileNotFoundError, ConnectionRefusedError) as e:
        if not autostart:
            raise CheckpointError(
                f"no ckptd daemon answers on {socket_path}; start one with "
                f"`ckptd serve --socket {socket_path} --root DIR` or pass autostart=True",
                code="no_daemon",
            ) from e
        root = expected_root or default_root()
        args = list(daemon_args)
        if max_shard_size is not None:
            args += ["--max-shard-size", str(max_shard_size)]
        log.info("no ckptd on %s; starting one (root %s)", socket_path, root)
        try:
            spawn_daemon(socket_path, root, args, max(1.0, deadline - time.monotonic()))
        except CheckpointError as spawn_error:
            try:  # another process may have started one first: use it if it answers
                channel = Channel.open(socket_path, timeout_s)
            except OSError:
                raise spawn_error from None
        else:
            channel = Channel.open(socket_path, timeout_s)
    welcome = channel.welcome
    problem = None
    if expected_root is not None and Path(welcome.root) != expected_root:
        problem = CheckpointError(
            f"the ckptd daemon on {socket_path} writes to {welcome.root}, not {expected_root}; "
            "pass root=None to use it, or give this run its own socket (CKPTD_SOCKET)",
            code="root_mismatch",
        )
    elif slots > welcome.max_arenas:
        problem = CheckpointError(
            f"slots={slots} exceeds the {welcome.max_arenas} arenas the daemon allows", code="bad_option"
        )
    if problem is not None:
        channel.close()
        raise problem
    return channel
