"""The ``ckptd`` commands that talk to a running daemon: ``status`` and ``stop``. They find it by
the same socket defaults as the client (``ckptd.paths.default_socket``) and connect as an
operator, so they are not counted among its clients."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path

from ckptd import paths
from ckptd.opchannel import OperatorChannel, OperatorError
from ckptd.protocol import StatusReply, StatusRequest, Stopping, StopRequest
from ckptd.sizes import format_size

#: How long ``ckptd stop`` waits by default: the daemon's default --drain-timeout, and a margin.
STOP_TIMEOUT_S = 630.0
_POLL_S = 0.1
_CONNECT_S = 10.0  # at most; never more than the --timeout given


def status(socket_path: Path | None, *, as_json: bool, watch_s: float | None) -> int:
    path = socket_path or paths.default_socket()
    try:
        channel = OperatorChannel.open(path)
    except (OSError, OperatorError) as e:
        print(f"ckptd status: no daemon answers on {path} ({e})", file=sys.stderr)
        return 1
    tty = sys.stdout.isatty()
    try:
        while True:
            reply = channel.call(StatusRequest())
            if not isinstance(reply, StatusReply):
                print(f"ckptd status: unexpected reply {reply.kind}", file=sys.stderr)
                return 1
            if watch_s is not None and tty:
                print("\033[H\033[J", end="")  # clear the terminal between refreshes
            if as_json:
                print(reply.model_dump_json(indent=2))
            else:
                print_status(reply)
            if watch_s is None:
                return 0
            if not tty:
                print(flush=True)  # a blank line between refreshes in a log or a pipe
            time.sleep(watch_s)
    except OperatorError as e:
        print(f"ckptd status: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        channel.close()


def print_status(reply: StatusReply) -> None:
    print(
        f"ckptd pid {reply.pid}  root {reply.root}  up {reply.uptime_s:.0f}s  clients {reply.clients}  "
        f"arenas {reply.arenas} ({format_size(reply.arena_bytes)})"
    )
    print(f"committed {reply.committed}  failed {reply.failed}  written {format_size(reply.bytes_written)}")
    if not reply.jobs:
        print("no snapshots in flight")
    for j in reply.jobs:
        frac = j.bytes_written / j.bytes if j.bytes else 1.0
        bar = "#" * int(frac * 20)
        rate = format_size(int(j.bytes_written / j.age_s)) + "/s" if j.age_s > 0 else "-"
        print(
            f"  {j.run} step {j.step:<8} {j.stage:<9} [{bar:<20}] {frac:5.1%} "
            f"({format_size(j.bytes_written)} of {format_size(j.bytes)})  {rate}  {j.age_s:.1f}s"
        )


def stop(socket_path: Path | None, *, now: bool, timeout_s: float) -> int:
    """Ask the daemon to stop and wait until it has exited (its socket lock is free)."""
    path = socket_path or paths.default_socket()
    deadline = time.monotonic() + timeout_s
    try:
        channel = OperatorChannel.open(path, timeout_s=min(_CONNECT_S, timeout_s))
    except (FileNotFoundError, ConnectionRefusedError) as e:
        # No socket, or nobody accepts on it: a daemon that removed its socket to drain still
        # holds the lock beside it.
        if _held(path):
            if now:
                print(
                    f"ckptd stop: the daemon on {path} is already draining and no longer answers; "
                    "send it SIGTERM once more to exit without draining",
                    file=sys.stderr,
                )
                return 1
            print(f"the daemon on {path} is already stopping; waiting for it to finish its drain")
            return _wait_gone(path, None, deadline, timeout_s)
        print(f"ckptd stop: no daemon answers on {path} ({e})", file=sys.stderr)
        return 1
    except (OSError, OperatorError) as e:
        # Something holds the socket but did not take the command: hung (SIGSTOPped, blocked in
        # the kernel), another user's (it refuses us), or another protocol version.
        print(
            f"ckptd stop: the daemon on {path} did not take the command: {e}{_owner(path)}; it was "
            "not asked to stop. A hung daemon: `kill -CONT` then `kill -TERM` its pid (it drains), "
            "`kill -KILL` as a last resort (its in-flight snapshots are then lost)",
            file=sys.stderr,
        )
        return 1
    try:
        reply = channel.call(StopRequest(now=now))
        if not isinstance(reply, Stopping):
            print(f"ckptd stop: unexpected reply {reply.kind}", file=sys.stderr)
            return 1
        what = "exiting now" if now else f"draining {reply.in_flight} snapshot(s) in flight"
        print(f"stopping ckptd pid {reply.pid}: {what}", flush=True)
        channel.wait_closed(max(0.0, deadline - time.monotonic()))  # closed once drained
    except OperatorError as e:
        print(f"ckptd stop: {e}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    return _wait_gone(path, reply.pid, deadline, timeout_s)


def _owner(path: Path) -> str:
    try:
        uid = os.stat(path).st_uid
    except OSError:
        return ""
    return "" if uid == os.getuid() else f" (its socket belongs to uid {uid}, not to you)"


def _wait_gone(path: Path, pid: int | None, deadline: float, timeout_s: float) -> int:
    while _held(path):
        if time.monotonic() >= deadline:
            who = f"pid {pid}" if pid is not None else f"on {path}"
            print(
                f"ckptd stop: the daemon ({who}) is still running after {timeout_s:g} s (still draining "
                "its snapshots, up to its --drain-timeout); wait longer (--timeout), or send it SIGTERM "
                "once more to exit without draining",
                file=sys.stderr,
            )
            return 1
        time.sleep(_POLL_S)
    print(f"ckptd pid {pid} stopped" if pid is not None else "ckptd stopped")
    return 0


def _held(socket_path: Path) -> bool:
    """Whether a daemon holds the lock beside the socket (it does from start-up until it has
    exited, also while it drains after removing its socket)."""
    lock = socket_path.with_name(socket_path.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # releases our shared lock at once
    return False
