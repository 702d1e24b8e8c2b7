"""The ``ckptd`` command: ``serve``, ``status``, ``stop``, ``ls``, ``verify``, ``prune``, ``rm``,
``export`` (the last five in ``ckptd.cli_steps``, the daemon's in ``ckptd.cli_daemon``)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from ckptd import __version__, cli_daemon, cli_steps, nodes, paths, sockdir
from ckptd.sizes import parse_size
from ckptd.storage import Storage


def main(argv: list[str] | None = None, storage: Storage | None = None) -> int:
    """Run the CLI; ``storage`` replaces the daemon's write layer (fault-injection tests)."""
    parser = argparse.ArgumentParser(prog="ckptd", description="Asynchronous checkpoint daemon for PyTorch.")
    parser.add_argument("--version", action="version", version=f"ckptd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument(
        "--root", type=Path, default=None, help="checkpoint root (default $CKPTD_ROOT or ./checkpoints)"
    )
    serve.add_argument("--socket", type=Path, default=None, help="Unix socket (default $CKPTD_SOCKET)")
    serve.add_argument(
        "--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MiB (default 5GB)"
    )
    serve.add_argument("--keep-last", type=int, default=0, help="committed steps kept per run (0: all)")
    serve.add_argument("--workers", type=int, default=4, help="shard writer threads (default 4)")
    serve.add_argument(
        "--direct-io",
        action="store_true",
        help="write shards with O_DIRECT (half the CPU, no page cache) instead of buffered write-behind",
    )
    serve.add_argument(
        "--writer-nice",
        type=int,
        default=10,
        help="niceness added to the shard writer threads, so training keeps the CPU (default 10; 0: none)",
    )
    serve.add_argument("--budget", default="4GiB", help="bytes of snapshots written at once (default 4GiB)")
    serve.add_argument("--drain-timeout", type=float, default=600.0, help="seconds to drain on SIGTERM")
    serve.add_argument(
        "--stage-timeout",
        type=float,
        default=60.0,
        help="seconds a streamed snapshot may go without its client copying more before it is "
        "discarded (default 60)",
    )
    serve.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    serve.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port")
    serve.add_argument(
        "--node-id",
        default=None,
        help="this node's name among the nodes sharing the root, one daemon each (default: "
        "$CKPTD_NODE_ID, else the host name)",
    )
    serve.add_argument("--log-file", type=Path, default=None, help="log here instead of stderr")
    serve.add_argument("--detach", action="store_true", help="fork into the background once listening")

    ls = sub.add_parser("ls", help="list runs and committed steps")
    ls.add_argument(
        "root",
        type=Path,
        nargs="?",
        default=None,
        help="checkpoint root (default $CKPTD_ROOT or ./checkpoints)",
    )
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument(
        "--verify",
        action="store_true",
        help="hash each run's LATEST step (default: its sizes and headers only, which read no data)",
    )

    verify = sub.add_parser("verify", help="check every checksum of a checkpoint")
    verify.add_argument(
        "path", type=Path, help="a step directory, a run directory (its newest step) or a root (every run)"
    )
    verify.add_argument("--all", action="store_true", help="every committed step, not only the newest")

    status = sub.add_parser("status", help="what the daemon is doing")
    status.add_argument("--socket", type=Path, default=None, help="Unix socket (default $CKPTD_SOCKET)")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--watch", type=float, default=None, metavar="SECONDS", help="refresh every SECONDS")

    stop = sub.add_parser("stop", help="stop the daemon: drain in-flight snapshots, then exit")
    stop.add_argument("--socket", type=Path, default=None, help="Unix socket (default $CKPTD_SOCKET)")
    stop.add_argument("--now", action="store_true", help="exit at once; in-flight snapshots fail")
    stop.add_argument(
        "--timeout",
        type=float,
        default=cli_daemon.STOP_TIMEOUT_S,
        metavar="SECONDS",
        help=f"how long to wait for the daemon to exit (default {cli_daemon.STOP_TIMEOUT_S:g})",
    )

    prune = sub.add_parser("prune", help="remove all but the newest committed steps of a run")
    prune.add_argument("run_dir", type=Path)
    prune.add_argument("--keep-last", type=int, required=True, help="committed steps kept (LATEST's always)")

    rm = sub.add_parser("rm", help="remove one committed step")
    rm.add_argument("step_dir", type=Path)
    rm.add_argument("--latest-too", action="store_true", help="also when LATEST names it")

    export = sub.add_parser("export", help="write a step's model as a plain save_pretrained directory")
    export.add_argument("step_dir", type=Path, help="a step directory, or a run directory (its newest step)")
    export.add_argument("out_dir", type=Path, help="a new (or empty) directory")

    return _run_writing(parser.parse_args(argv), storage)


def _run_writing(args: argparse.Namespace, storage: Storage | None) -> int:
    """Run a command; output that cannot be written is one line on stderr, never a traceback."""
    try:
        code = _run(args, storage)
        sys.stdout.flush()
    except BrokenPipeError:  # `ckptd ls | head`: the reader has gone, which is no error of ours
        _stdout_to_devnull()
        return 0
    except OSError as e:  # `ckptd ls > /dev/full`: our output cannot be written
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG):
            raise
        print(f"ckptd: cannot write its output: {e.strerror}", file=sys.stderr)
        _stdout_to_devnull()
        return 1
    return code


def _stdout_to_devnull() -> None:  # so that the interpreter's own flush at exit cannot fail too
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _run(args: argparse.Namespace, storage: Storage | None) -> int:
    match args.command:
        case "serve":
            return _serve(args, storage)
        case "ls":
            return cli_steps.ls(args.root, as_json=args.json, hash_latest=args.verify)
        case "verify":
            return cli_steps.verify(args.path, every_step=args.all)
        case "status":
            return cli_daemon.status(args.socket, as_json=args.json, watch_s=args.watch)
        case "stop":
            return cli_daemon.stop(args.socket, now=args.now, timeout_s=args.timeout)
        case "prune":
            return cli_steps.prune(args.run_dir, args.keep_last)
        case "rm":
            return cli_steps.rm(args.step_dir, latest_too=args.latest_too)
        case _:
            return cli_steps.export(args.step_dir, args.out_dir)


def _serve(args: argparse.Namespace, storage: Storage | None) -> int:
    from ckptd.daemon.server import DaemonError, DaemonOptions, run_daemon

    try:
        socket_path = args.socket or _default_socket()
        root = (args.root or cli_steps.default_root()).absolute()
        if not args.stage_timeout > 0:
            raise ValueError(f"--stage-timeout must be positive seconds, got {args.stage_timeout}")
        options = DaemonOptions(
            root=root,
            socket_path=socket_path.absolute(),
            max_shard_size=parse_size(args.max_shard_size),
            workers=args.workers,
            direct_io=args.direct_io,
            writer_nice=args.writer_nice,
            keep_last=args.keep_last,
            budget_bytes=parse_size(args.budget),
            drain_timeout_s=args.drain_timeout,
            stage_timeout_s=args.stage_timeout,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            node_id=nodes.check_node_id(args.node_id or nodes.default_node_id()),
        )
    except ValueError as e:
        print(f"ckptd serve: {e}", file=sys.stderr)
        return 2
    try:  # before anything in it is opened, the log above all (it is opened before the daemon runs)
        log_fd = _open_log(args.log_file, options.socket_path)
    except OSError as e:
        print(f"ckptd serve: {e}", file=sys.stderr)
        return 1
    ready = _Ready(_detach(log_fd)) if args.detach else None
    if log_fd is not None and ready is None:
        logging.basicConfig(
            level=logging.INFO, format=_LOG_FORMAT, stream=os.fdopen(log_fd, "a", buffering=1)
        )
    else:  # detached, stderr is the log file (or /dev/null)
        logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT)
    try:
        run_daemon(options, storage, on_ready=ready.signal if ready is not None else None)
    except (DaemonError, OSError) as e:
        logging.getLogger("ckptd").error("%s", e)
        if ready is None:
            print(f"ckptd serve: {e}", file=sys.stderr)
        else:  # once the parent was told "ready" it has gone: the line logged above is what is left
            ready.fail(f"error: {e}")
        return 1
    return 0


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _open_log(log_file: Path | None, socket_path: Path) -> int | None:
    """Check (making it if missing) the socket's directory, then open the log without following
    a symlink: appended to, 0600, a regular file of ours only. A log beside the socket is opened
    through the checked directory's descriptor; one elsewhere gets its directory made if missing."""
    dir_fd = sockdir.open_socket_dir(socket_path.parent, create=True)
    try:
        if log_file is None:
            return None
        log_file = log_file.absolute()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        if log_file.parent == socket_path.parent:
            return sockdir.open_private_file(log_file.name, dir_fd, flags, "the log file", log_file)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        return sockdir.open_private_file(str(log_file), None, flags, "the log file", log_file)
    finally:
        os.close(dir_fd)


class _Ready:
    """The pipe to the parent waiting in ``_detach``: written once, "ready" or the error."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def signal(self) -> None:
        self.fail("ready")

    def fail(self, message: str) -> None:
        """Tell the parent, unless it was told already (then it has exited)."""
        if self._fd is not None:
            os.write(self._fd, message.encode())
            os.close(self._fd)
            self._fd = None


def _detach(log_fd: int | None) -> int:
    """Fork; the parent exits once the child says it listens (or why it could not)."""
    read_fd, write_fd = os.pipe()
    if os.fork() > 0:
        os.close(write_fd)
        chunks = []
        while chunk := os.read(read_fd, 4096):
            chunks.append(chunk)
        message = b"".join(chunks).decode()
        if message != "ready":
            print(message or "ckptd exited during start-up", file=sys.stderr)
            os._exit(1)
        os._exit(0)
    os.close(read_fd)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    out = log_fd if log_fd is not None else null
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    return write_fd


def _default_socket() -> Path:
    return paths.default_socket()
