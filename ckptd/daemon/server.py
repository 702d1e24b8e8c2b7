"""The daemon's lifecycle: startup → main loop → shutdown.

Startup checks the socket's directory (ours, writable by nobody else: ``ckptd.sockdir``) and
opens everything in it through that directory's descriptor, takes a lock beside the socket (one
daemon per socket) and one in the root (one daemon per root), refuses a socket that a live
daemon answers on, replaces a stale one, sweeps temp directories left by a crash, and binds the
socket 0600. A root deleted or replaced while the daemon runs stops it (``rootguard``). Signal
handlers only set flags: the first SIGTERM/SIGINT stops accepting and drains in-flight snapshots
(up to ``drain_timeout_s``); a second one exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import resource
import secrets
import signal
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ckptd import nodes, shared, sockdir
from ckptd.daemon import connection, heartbeat
from ckptd.daemon.connection import MAX_ARENAS, Connection
from ckptd.daemon.health import Health
from ckptd.daemon.httpd import HttpEndpoint
from ckptd.daemon.metrics import Metrics
from ckptd.daemon.notify import Notifier
from ckptd.daemon.pipeline import STAGE_TIMEOUT_S, Pipeline, PipelineOptions
from ckptd.daemon.rootguard import CHECK_INTERVAL_S, RootGone, RootGuard
from ckptd.protocol import PROTOCOL_VERSION, StatusReply, Stopping, Welcome
from ckptd.storage import Storage

log = logging.getLogger(__name__)
_UCRED = struct.Struct("3i")
#: Connections over the limit kept until they have read why they are refused.
MAX_REFUSING = 64


@dataclass(frozen=True)
class DaemonOptions:
    """What ``ckptd serve`` is told. Sizes in bytes, times in seconds."""

    root: Path
    socket_path: Path
    max_shard_size: int = 5 * 10**9
    workers: int = 4
    direct_io: bool = False
    writer_nice: int = 10
    keep_last: int = 0
    budget_bytes: int = 4 * 2**30
    drain_timeout_s: float = 600.0
    stage_timeout_s: float = STAGE_TIMEOUT_S
    metrics_port: int | None = None  # serve Prometheus metrics on this TCP port
    metrics_host: str = "127.0.0.1"
    #: This daemon's node among those sharing ``root`` (one daemon per node id and root).
    node_id: str = field(default_factory=nodes.default_node_id)


class DaemonError(RuntimeError):
    """The daemon cannot start; the message says why and what to do."""


class Daemon:
    def __init__(self, options: DaemonOptions, storage: Storage | None = None) -> None:
        self.options = options
        self.storage = storage or Storage()
        self.metrics = Metrics()
        self.notifier = Notifier()
        self.pipeline = Pipeline(
            PipelineOptions(
                root=options.root,
                workers=options.workers,
                direct_io=options.direct_io,
                writer_nice=options.writer_nice,
                budget_bytes=options.budget_bytes,
                keep_last=options.keep_last,
                stage_timeout_s=options.stage_timeout_s,
                node_id=options.node_id,
            ),
            self.storage,
            self.metrics,
        )
        self.health = Health(self.pipeline)
        # Read on the HTTP thread: each takes a copy (one C call) of what the loop changes.
        self.metrics.gauges.update(
            snapshots_in_flight=lambda: self.pipeline.in_flight,
            arena_bytes=lambda: sum(a.size for c in list(self._connections) for a in list(c.arenas.values())),
            clients=self.clients,
            event_loop_lag_seconds=self.health.loop_lag_s,
        )
        self._metrics_server: HttpEndpoint | None = None
        self._health_watch: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._heartbeats: asyncio.Task[None] | None = None
        self._connections: set[Connection] = set()
        self._refusing: set[Connection] = set()  # over the limit: told so in reply to hello
        # Large frames (layouts of many thousands of tensors) are decoded here, one at a time,
        # not on the event loop.
        self.layout_executor = ThreadPoolExecutor(1, thread_name_prefix="ckptd-layout")
        self.pending_frame_bytes = 0  # unfinished frames held by all connections (connection.py)
        self._listener: socket.socket | None = None
        self._lock_fd: int | None = None
        self._root_lock_fd: int | None = None
        self._legacy_lock_fd: int | None = None  # <root>/.ckptd.lock, shared (older daemons: whole)
        self._sock_dir_fd: int | None = None
        self._root: RootGuard | None = None
        self._root_watch: asyncio.Task[None] | None = None
        self._gone: RootGone | None = None
        self._stop = asyncio.Event()
        self._signals = 0
        self._started = time.monotonic()
        self.instance = secrets.token_hex(8)

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        await self.startup()
        if on_ready is not None:
            on_ready()
        try:
            await self._stop.wait()
        finally:
            await self.shutdown()
        if self._gone is not None:
            raise DaemonError(str(self._gone)) from self._gone

    # --- startup ---------------------------------------------------------------------------------

    async def startup(self) -> None:
        opts = self.options
        _raise_fd_limit()
        _yield_session_cpu(opts.writer_nice)
        opts.root.mkdir(parents=True, exist_ok=True)
        try:  # checked before anything in it is opened; files in it are opened through this fd
            self._sock_dir_fd = sockdir.open_socket_dir(opts.socket_path.parent, create=True)
        except sockdir.UnsafeSocketDir as e:
            raise DaemonError(str(e)) from e
        name = opts.socket_path.name
        self._lock_fd = _take_lock(
            name + ".lock",
            self._sock_dir_fd,
            opts.socket_path.with_name(name + ".lock"),
            f"one is already running (or starting) on {opts.socket_path}",
        )
        # One daemon per node and root: several nodes may share a root (a shared filesystem),
        # each with its own daemon. The lock goes if the root is deleted: the root guard then
        # stops this daemon.
        self._root = RootGuard(opts.root)
        self.pipeline.root = self._root
        self.pipeline.on_root_gone = self.on_root_gone
        self._legacy_lock_fd = _share_legacy_lock(self._root.fd, opts.root)
        self._root_lock_fd = _take_node_lock(self._root.fd, opts.root, opts.node_id, self.instance)
        here = _in_dir(self._sock_dir_fd, name, opts.socket_path)
        if _answers(here):
            raise DaemonError(
                f"a ckptd daemon already answers on {opts.socket_path}; "
                "use it, or stop it first (ckptd status shows its pid)"
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._sock_dir_fd)  # stale: nobody answers on it, and we hold the lock
        for p in shared.sweep(self.storage, opts.root, opts.node_id):  # never another node's work
            log.info("swept leftover %s", p)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(here)
        finally:
            os.umask(old)
        sock.listen(64)
        sock.setblocking(False)
        self._listener = sock
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._accept)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        # Until shutdown's drain is over: clients wait on those snapshots.
        self._heartbeats = asyncio.create_task(heartbeat.send_heartbeats(self.connections, self.pipeline))
        self._health_watch = asyncio.create_task(self.health.watch())
        if opts.metrics_port is not None:
            try:
                self._metrics_server = HttpEndpoint(
                    self.metrics, self.health, opts.metrics_host, opts.metrics_port
                )
            except OSError as e:
                raise DaemonError(
                    f"cannot serve metrics on {opts.metrics_host}:{opts.metrics_port} ({e}); "
                    "pick another --metrics-port or stop what listens there"
                ) from e
        log.info("ckptd serving root=%s socket=%s pid=%s", opts.root, opts.socket_path, os.getpid())
        self.notifier.ready(f"serving {opts.root} on {opts.socket_path}")
        if self.notifier.watchdog_interval_s is not None:
            self._watchdog = asyncio.create_task(self._ping_watchdog(self.notifier.watchdog_interval_s))
        self._root_watch = asyncio.create_task(self._watch_root(self._root))

    async def _watch_root(self, root: RootGuard) -> None:
        """Stop once the root is gone (checked off the loop: a hung mount must not stall it)."""
        loop = asyncio.get_running_loop()
        while root.gone is None:
            await asyncio.sleep(CHECK_INTERVAL_S)
            try:
                await loop.run_in_executor(None, root.check)
            except RootGone as e:
                self.on_root_gone(e)
            except OSError as e:  # EIO, ESTALE: no verdict (a flaky mount); the next check looks again
                log.warning("cannot examine the checkpoint root %s (%s); checking again", root.root, e)

    def on_root_gone(self, gone: RootGone) -> None:
        """Refuse snapshots from now on, drain, and exit with the reason (so the path can be served
        by a fresh daemon, alone)."""
        if self._gone is None:
            self._gone = gone
            log.error("%s", gone)
            self._stop.set()

    async def _ping_watchdog(self, interval_s: float) -> None:
        # Runs on the event loop: if the loop wedges, the pings stop and systemd restarts us.
        while True:
            self.notifier.watchdog()
            self.notifier.status(
                f"{self.clients()} clients, {self.pipeline.in_flight} snapshots in flight, "
                f"{self.metrics.committed} committed"
            )
            await asyncio.sleep(interval_s)

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal %s: exiting without draining", sig)
            os._exit(1)
        log.info("signal %s: draining in-flight snapshots", sig)
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()

    def request_stop(self, *, now: bool, by_pid: int) -> Stopping:
        """``ckptd stop``: drain, then exit, as on SIGTERM; with ``now``, exit at once (as on a
        second signal: in-flight snapshots fail, their temp directories are swept at the next
        start). The reply is written before the process exits."""
        reply = Stopping(pid=os.getpid(), in_flight=self.pipeline.in_flight)
        if now:
            log.warning(
                "ckptd stop --now from pid %s: exiting without draining %s snapshots", by_pid, reply.in_flight
            )
            if self._listener is not None and self._sock_dir_fd is not None:
                with contextlib.suppress(OSError):  # no stale socket left behind
                    os.unlink(self.options.socket_path.name, dir_fd=self._sock_dir_fd)
            asyncio.get_running_loop().call_later(0.2, os._exit, 0)  # the reply goes out first
        else:
            log.info("ckptd stop from pid %s: draining %s in-flight snapshots", by_pid, reply.in_flight)
            self._stop.set()
        return reply

    @property
    def stopping(self) -> bool:
        """Whether snapshots are refused as "shutting down"; once the root is gone the pipeline
        refuses them itself, saying so (``root_gone``)."""
        return self._stop.is_set() and self._gone is None

    # --- main loop -------------------------------------------------------------------------------

    def _accept(self) -> None:
        if self._listener is None:
            return
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # EMFILE/ENFILE: pause accepting instead of spinning on the error
            log.error("accept failed (%s); pausing new connections for 1s", e)
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._listener.fileno())
            loop.call_later(1.0, self._resume_accept)
            return
        full = len(self._connections) >= connection.MAX_CONNECTIONS
        if full and len(self._refusing) >= MAX_REFUSING:
            log.warning("closing a connection: %d clients already", len(self._connections))
            sock.close()
            return
        sock.setblocking(False)
        pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid != os.geteuid():
            log.warning("refusing pid %s: uid %s is not the daemon's uid %s", pid, uid, os.geteuid())
            sock.close()
            return
        if full:
            log.warning("refusing pid %s: %d clients already", pid, len(self._connections))
            self._refusing.add(Connection(self, sock, pid, full=True))
        else:
            self._connections.add(Connection(self, sock, pid))

    def _resume_accept(self) -> None:
        if self._listener is not None:
            asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept)

    def forget(self, conn: Connection) -> None:
        self._connections.discard(conn)
        self._refusing.discard(conn)

    def connections(self) -> list[Connection]:
        return list(self._connections)

    def clients(self) -> int:
        """Connections of training processes (an operator's ``ckptd status`` is not one)."""
        # A copy of the set: read on the HTTP thread too.
        return sum(1 for c in list(self._connections) if not c.operator)

    def welcome(self) -> Welcome:
        return Welcome(
            version=PROTOCOL_VERSION,
            pid=os.getpid(),
            instance=self.instance,
            max_arenas=MAX_ARENAS,
            root=str(self.options.root),
            max_shard_size=self.options.max_shard_size,
            node=self.options.node_id,
        )

    def status(self) -> StatusReply:
        arenas = [a for c in self._connections for a in c.arenas.values()]
        return StatusReply(
            pid=os.getpid(),
            root=str(self.options.root),
            uptime_s=round(time.monotonic() - self._started, 3),
            clients=self.clients(),
            arenas=len(arenas),
            arena_bytes=sum(a.size for a in arenas),
            committed=self.metrics.committed,
            failed=sum(self.metrics.failed.values()),
            bytes_written=self.metrics.bytes_written,
            jobs=self.pipeline.status(),
            connections=[c.token for c in self._connections if c.token],
        )

    # --- shutdown --------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        self.notifier.stopping(f"draining {self.pipeline.in_flight} snapshots")
        if self._listener is not None:
            loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.options.socket_path.name, dir_fd=self._sock_dir_fd)
        if not await self.pipeline.drain(self.options.drain_timeout_s):
            log.error(
                "in-flight snapshots did not finish within %ss; abandoning them", self.options.drain_timeout_s
            )
        conns = [*self._connections, *self._refusing]
        writers = [conn.writer for conn in conns]
        for conn in conns:
            conn.close()
        self.layout_executor.shutdown(wait=False, cancel_futures=True)
        if self._health_watch is not None:
            self._health_watch.cancel()
        if writers:  # let queued replies (the drained jobs' Committed) reach their clients
            await asyncio.wait(writers, timeout=5.0)
        self.pipeline.close()
        for task in (self._heartbeats, self._watchdog, self._root_watch):
            if task is not None:
                task.cancel()
        if self._metrics_server is not None:
            self._metrics_server.close()
        for fd in (self._lock_fd, self._root_lock_fd, self._legacy_lock_fd, self._sock_dir_fd):
            if fd is not None:
                os.close(fd)
        self._lock_fd = self._root_lock_fd = self._legacy_lock_fd = self._sock_dir_fd = None
        if self._root is not None:
            self._root.close()
            self._root = None
        log.info("ckptd stopped")


def _take_lock(name: str, dir_fd: int, shown: Path, held_means: str) -> int:
    """Lock ``name`` in the directory ``dir_fd`` (made if missing, never through a symlink)."""
    try:
        fd = sockdir.open_private_file(name, dir_fd, os.O_RDWR | os.O_CREAT, "the lock file", shown)
    except sockdir.UnsafeSocketDir as e:
        raise DaemonError(str(e)) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DaemonError(
            f"another ckptd daemon holds {shown}: {held_means}; use it, or stop it first"
        ) from None
    return fd


def _share_legacy_lock(root_fd: int, root: Path) -> int:
    """Hold ``<root>/.ckptd.lock`` shared: a daemon of an older ckptd (one daemon per root) holds
    it whole, and would sweep this one's in-flight steps (and this one its)."""
    shown = root / ".ckptd.lock"
    try:
        fd = sockdir.open_private_file(".ckptd.lock", root_fd, os.O_RDWR | os.O_CREAT, "the lock file", shown)
    except sockdir.UnsafeSocketDir as e:
        raise DaemonError(str(e)) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DaemonError(
            f"a daemon of an older ckptd (one daemon per root) holds {shown} and serves the root "
            f"{root}: stop it first (ckptd status on its socket shows its pid), then start this one"
        ) from None
    return fd


def _take_node_lock(root_fd: int, root: Path, node_id: str, instance: str) -> int:
    """Lock this node's file in the root's ``.ckptd-nodes/`` and write who holds it (clients
    of the nodes of one job read these files to tell a shared root from node-local ones)."""
    try:
        name = nodes.lock_name(node_id)
    except ValueError as e:
        raise DaemonError(str(e)) from e
    try:
        nodes_fd = nodes.open_nodes_dir(root_fd, root)
    except sockdir.UnsafeSocketDir as e:
        raise DaemonError(str(e)) from e
    try:
        shown = root / nodes.NODES_DIR / name
        fd = _take_lock(
            name,
            nodes_fd,
            shown,
            f"another daemon serves the root {root} for node {node_id!r} (start a second one on "
            "this root with its own --node-id)",
        )
    finally:
        os.close(nodes_fd)
    nodes.write_holder(fd, node_id, instance)
    return fd


def _in_dir(dir_fd: int, name: str, path: Path) -> str:
    """A path to ``name`` through the checked directory's descriptor (so a directory swapped in
    since the check is not the one bound or connected to), where /proc allows it."""
    proc = f"/proc/self/fd/{dir_fd}"
    return f"{proc}/{name}" if os.path.isdir(proc) else str(path)


def _raise_fd_limit() -> None:
    """Each arena is a descriptor: take the hard limit of open files, not the soft default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _yield_session_cpu(nice: int) -> None:
    """A daemon that leads its own session (autostarted, ``--detach``) is, with the kernel's
    autogroup scheduling, a group of its own that competes with the training session as an
    equal, whatever its threads' niceness: lower the group's priority instead. Never done when
    the session is shared (it would slow the training processes in it too)."""
    if not nice or os.getsid(0) != os.getpid():
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(f"{min(nice, 19)}\n")


def _answers(socket_path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(1.0)
    try:
        s.connect(socket_path)
    except OSError:
        return False
    finally:
        s.close()
    return True


def run_daemon(
    options: DaemonOptions, storage: Storage | None = None, on_ready: Callable[[], None] | None = None
) -> None:
    """Run a daemon until it is signalled, on uvloop (chosen by loop factory, no global policy)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(Daemon(options, storage).run(on_ready))
