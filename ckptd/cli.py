"""The ``ckptd`` command: ``serve``, ``ls``, ``verify``, ``status``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from ckptd import paths, reading, sockdir
from ckptd.manifest import MANIFEST_NAME, ManifestError, read_manifest
from ckptd.protocol import StatusReply
from ckptd.sizes import format_size, parse_size
from ckptd.storage import Storage


def main(argv: list[str] | None = None, storage: Storage | None = None) -> int:
    """Run the CLI; ``storage`` replaces the daemon's write layer (fault-injection tests)."""
    parser = argparse.ArgumentParser(prog="ckptd", description="Asynchronous checkpoint daemon for PyTorch.")
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
    serve.add_argument("--log-file", type=Path, default=None, help="log here instead of stderr")
    serve.add_argument("--detach", action="store_true", help="fork into the background once listening")

    ls = sub.add_parser("ls", help="list runs and committed steps")
    ls.add_argument("root", type=Path)
    ls.add_argument("--json", action="store_true", help="print JSON")

    verify = sub.add_parser("verify", help="check every checksum of a checkpoint")
    verify.add_argument("path", type=Path, help="a step directory, or a run directory (its newest step)")

    status = sub.add_parser("status", help="what the daemon is doing")
    status.add_argument("--socket", type=Path, default=None)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--watch", type=float, default=None, metavar="SECONDS", help="refresh every SECONDS")

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args, storage)
    if args.command == "ls":
        return _ls(args.root, as_json=args.json)
    if args.command == "verify":
        return _verify(args.path)
    return _status(args.socket, as_json=args.json, watch_s=args.watch)


def _serve(args: argparse.Namespace, storage: Storage | None) -> int:
    from ckptd.daemon.server import DaemonError, DaemonOptions, run_daemon

    try:
        socket_path = args.socket or _default_socket()
        root = (args.root or Path(os.environ.get("CKPTD_ROOT") or "checkpoints")).absolute()
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


def _ls(root: Path, *, as_json: bool) -> int:
    if not root.is_dir():
        print(f"ckptd ls: {root} is not a directory", file=sys.stderr)
        return 2
    rows: list[dict[str, object]] = []
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        latest = paths.read_latest(run_dir)
        for step, step_dir in paths.committed_steps(run_dir):
            row: dict[str, object] = {"run": run_dir.name, "step": step, "path": str(step_dir)}
            try:
                m = read_manifest(step_dir)
                row |= {
                    "bytes": m.bytes,
                    "components": [c.name for c in m.components],
                    "latest": step_dir.name == latest,
                    "created_unix": m.created_unix,
                }
            except ManifestError as e:
                row |= {"bytes": 0, "components": [], "latest": False, "error": str(e)}
            rows.append(row)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no checkpoints under {root}")
        return 0
    print(f"{'RUN':<20} {'STEP':>10} {'SIZE':>10}  {'COMPONENTS':<30} NOTE")
    for r in rows:
        note = "LATEST" if r["latest"] else ("NOT A CHECKPOINT: " + str(r["error"]) if "error" in r else "")
        size = format_size(r["bytes"]) if isinstance(r["bytes"], int) else "?"
        components = ",".join(map(str, r["components"])) if isinstance(r["components"], list) else ""
        print(f"{r['run']!s:<20} {r['step']!s:>10} {size:>10}  {components:<30} {note}")
    return 0


def _verify(path: Path) -> int:
    steps = [] if os.path.lexists(path / MANIFEST_NAME) else paths.committed_steps(path)
    if steps:
        step_dir = steps[-1][1]  # a run: its highest step, even if its manifest is what broke
    else:
        try:
            step_dir = reading.resolve(path)
        except FileNotFoundError as e:
            print(f"ckptd verify: {e}", file=sys.stderr)
            return 2
    problems = reading.verify(step_dir)
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        print(f"{step_dir}: {len(problems)} problem(s)")
        return 1
    print(f"OK {step_dir}")
    return 0


def _status(socket_path: Path | None, *, as_json: bool, watch_s: float | None) -> int:
    from ckptd.protocol import StatusRequest
    from client.channel import Channel
    from client.errors import CheckpointError

    path = socket_path or _default_socket()
    try:
        channel = Channel.open(path)
    except (OSError, CheckpointError) as e:
        print(f"ckptd status: no daemon answers on {path} ({e})", file=sys.stderr)
        return 1
    try:
        while True:
            reply = channel.call(StatusRequest())
            if not isinstance(reply, StatusReply):
                print(f"ckptd status: unexpected reply {reply.kind}", file=sys.stderr)
                return 1
            if as_json:
                print(reply.model_dump_json(indent=2))
            else:
                if watch_s is not None:
                    print("\033[H\033[J", end="")  # clear the terminal between refreshes
                _print_status(reply)
            if watch_s is None:
                return 0
            time.sleep(watch_s)
    except CheckpointError as e:
        print(f"ckptd status: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        channel.close()


def _print_status(reply: StatusReply) -> None:
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
            f"  {j.run} step {j.step:<8} {j.stage:<9} [{bar:<20}] {frac:5.1%} of {format_size(j.bytes)}"
            f"  {rate}  {j.age_s:.1f}s"
        )
