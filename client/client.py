"""``Client``: the training side of ckptd.

>>> from client import Client
>>> with Client.connect() as ckpt:                       # doctest: +SKIP
...     handle = ckpt.snapshot({"model": model, "optimizer": opt, "step": step}, step=step)
...     handle.wait()
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch

from ckptd import layout as layout_mod
from ckptd import paths, reading
from ckptd.manifest import ManifestError, read_manifest
from ckptd.protocol import (
    Committed,
    ComponentEntry,
    DaemonMessage,
    Failed,
    RegisterArena,
    ReleaseArena,
    ShardEntry,
    Snapshot,
    StatusReply,
    StatusRequest,
    TensorEntry,
)
from ckptd.sizes import parse_size
from ckptd.torch_dtypes import FROM_SAFETENSORS, safetensors_dtype
from client import restore as restore_mod
from client.arena import Arena
from client.channel import Channel
from client.errors import CheckpointError
from client.handle import CommitInfo, SnapshotHandle, now
from client.spawn import default_root, default_socket, spawn_daemon
from client.tree import Flat, flatten

log = logging.getLogger(__name__)
Policy = Literal["block", "skip", "error"]
_ARENA_ROUND = 2 * 2**20


@dataclass(frozen=True)
class ClientOptions:
    """Options of ``Client.connect`` beyond the socket, root and run."""

    max_shard_size: int | str | None = None  # None: the daemon's (--max-shard-size, default 5GB)
    slots: int = 2  # arenas, each holding one snapshot in flight
    connect_timeout_s: float = 60.0  # includes starting a daemon
    daemon_args: tuple[str, ...] = ()  # extra `ckptd serve` arguments when autostarting


@dataclass
class _InFlight:
    """A snapshot handed to the daemon: its bytes stay in ``arena`` until the outcome is known."""

    handle: SnapshotHandle
    arena: Arena
    request: Snapshot
    generation: int  # the arena's use count when this snapshot was copied into it


@dataclass
class _Plan:
    """A cached layout and the request parts that depend only on the snapshot's signature."""

    layout: layout_mod.Layout
    entries: list[ComponentEntry]
    order: list[tuple[int, int]]  # (component, tensor) index per placement, in layout order


class Client:
    def __init__(self, socket_path: Path, run: str, autostart: bool, options: ClientOptions) -> None:
        self.socket_path = socket_path
        self.run = paths.check_name("run", run)
        self.autostart = autostart
        self.options = options
        self.root: Path = Path()
        self._channel: Channel | None = None
        self._expected_root: Path | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._snapshot_lock = threading.Lock()  # one snapshot() at a time per client
        self._arenas: list[Arena] = []
        self._registered: set[int] = set()
        self._pending: dict[int, _InFlight] = {}
        self._orphans: list[_InFlight] = []  # in flight when the daemon died: resubmit() sends them
        self._handles: list[SnapshotHandle] = []
        self._plan_key: object = None
        self._plan: _Plan | None = None
        self._status: list[StatusReply] = []
        self._status_ready = threading.Condition()
        self._gpu_sender: ThreadPoolExecutor | None = None
        self._copy_stream: Any = None
        self._closed = False

    # --- connecting ------------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        root: str | os.PathLike[str] | None = None,
        run: str = "default",
        autostart: bool = True,
        **options: Any,
    ) -> Client:
        """Connect to the daemon on ``socket_path`` (``$CKPTD_SOCKET`` by default), starting one
        detached when nothing answers and ``autostart``. ``root`` (``$CKPTD_ROOT``) must match a
        running daemon's root; None takes whatever root it has."""
        known = {f.name for f in fields(ClientOptions)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; Client.connect accepts {sorted(known)}")
        opts = ClientOptions(**options)
        if opts.slots < 1:
            raise ValueError(f"slots must be >= 1, got {opts.slots}")
        if opts.max_shard_size is not None:
            parse_size(opts.max_shard_size)
        client = cls(Path(socket_path) if socket_path else default_socket(), run, autostart, opts)
        env_root = os.environ.get("CKPTD_ROOT")
        chosen = root if root is not None else env_root
        client._expected_root = Path(chosen).absolute() if chosen else None
        client._reconnect()
        return client

    def _reconnect(self) -> None:
        deadline = time.monotonic() + self.options.connect_timeout_s
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        try:
            channel = Channel.open(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            if not self.autostart:
                raise CheckpointError(
                    f"no ckptd daemon answers on {self.socket_path}; start one with "
                    f"`ckptd serve --socket {self.socket_path} --root DIR` or pass autostart=True",
                    code="no_daemon",
                ) from e
            channel = self._start_daemon(deadline)
        root = Path(channel.welcome.root)
        if self._expected_root is not None and root != self._expected_root:
            channel.close()
            raise CheckpointError(
                f"the ckptd daemon on {self.socket_path} writes to {root}, not {self._expected_root}; "
                "pass root=None to use it, or give this run its own socket (CKPTD_SOCKET)",
                code="root_mismatch",
            )
        self.root = root
        self._registered.clear()
        self._channel = channel
        channel.start(self._on_message, self._on_close)

    def _start_daemon(self, deadline: float) -> Channel:
        root = self._expected_root or default_root()
        args = list(self.options.daemon_args)
        if self.options.max_shard_size is not None:
            args += ["--max-shard-size", str(self.options.max_shard_size)]
        log.info("no ckptd on %s; starting one (root %s)", self.socket_path, root)
        try:
            spawn_daemon(self.socket_path, root, args, max(1.0, deadline - time.monotonic()))
        except CheckpointError:
            # Another process may have started one first; use it if it answers.
            try:
                return Channel.open(self.socket_path)
            except OSError:
                raise
        return Channel.open(self.socket_path)

    # --- snapshot --------------------------------------------------------------------------------

    def snapshot(
        self,
        obj: object,
        *,
        step: int,
        run: str | None = None,
        on_done: Callable[[SnapshotHandle], object] | None = None,
        policy: Policy = "block",
    ) -> SnapshotHandle:
        """Copy ``obj``'s tensors into a free arena slot and hand them to the daemon.

        Returns once the snapshot is consistent: the caller may change its tensors at once.
        ``policy`` says what happens when every slot is still being written: ``block`` waits,
        ``skip`` returns a handle with ``skipped`` set, ``error`` raises ``CheckpointError``.
        A failure of an earlier snapshot that nobody looked at is raised here.
        """
        with self._snapshot_lock:
            return self._snapshot(obj, step, run, on_done, policy)

    def _snapshot(
        self,
        obj: object,
        step: int,
        run: str | None,
        on_done: Callable[[SnapshotHandle], object] | None,
        policy: Policy,
    ) -> SnapshotHandle:
        started = now()
        self._raise_unobserved()
        if self._closed:
            raise CheckpointError("this client is closed", code="closed")
        run = paths.check_name("run", run or self.run)
        if policy not in ("block", "skip", "error"):
            raise ValueError(f"policy must be 'block', 'skip' or 'error', got {policy!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        flat = flatten(obj)
        plan = self._plan_for(flat)
        handle = SnapshotHandle(next(self._ids), run, step, started)
        if on_done is not None:
            handle.add_done_callback(on_done)
        if self._channel is None or self._channel.closed:
            self._reconnect()
        arena = self._acquire(plan.layout.slot_bytes, policy, step)
        if arena is None:
            handle._skip()
            return handle
        try:
            self._register(arena)
            request = Snapshot(
                id=handle.id,
                run=run,
                step=step,
                arena=arena.id,
                components=plan.entries,
                tree=flat.tree,
                files=flat.files,
            )
            pairs = self._pairs(arena, plan, flat)
            with self._lock:
                self._pending[handle.id] = _InFlight(handle, arena, request, arena.generation)
                self._handles.append(handle)
            if flat.cuda:
                event = self._stage_cuda(arena, pairs)
            else:
                with torch.no_grad():
                    for dst, src in pairs:
                        dst.copy_(src)
                handle._set_staged()
            # Set before sending: the commit can be reported before this thread runs again.
            handle.stall_s = now() - started
            if flat.cuda:
                assert self._gpu_sender is not None
                self._gpu_sender.submit(self._send_when_copied, event, request, handle)
            else:
                self._send(request, handle)
        except BaseException:
            self._finish(handle.id)
            raise
        return handle

    def _plan_for(self, flat: Flat) -> _Plan:
        key = (flat.signature(), self.options.max_shard_size)
        if key == self._plan_key and self._plan is not None:
            return self._plan
        max_shard = parse_size(self.options.max_shard_size or self._welcome_max_shard())
        specs = [
            (
                c.name,
                [
                    layout_mod.TensorSpec(n, safetensors_dtype(t.dtype, n), tuple(t.shape))
                    for n, t in c.tensors
                ],
            )
            for c in flat.components
        ]
        lay = layout_mod.plan(specs, max_shard)
        positions = [{n: i for i, (n, _) in enumerate(c.tensors)} for c in flat.components]
        order = [
            (ci, positions[ci][p.spec.name])
            for ci, comp in enumerate(lay.components)
            for shard in comp.shards
            for p in shard.tensors
        ]
        entries = [
            ComponentEntry(
                name=comp.name,
                shards=[
                    ShardEntry(
                        offset=shard.offset,
                        nbytes=shard.nbytes,
                        tensors=[
                            TensorEntry(
                                name=p.spec.name,
                                dtype=p.spec.dtype,
                                shape=list(p.spec.shape),
                                start=p.start,
                                end=p.end,
                            )
                            for p in shard.tensors
                        ],
                    )
                    for shard in comp.shards
                ],
                aliases=flat.components[ci].aliases,
            )
            for ci, comp in enumerate(lay.components)
        ]
        self._plan_key, self._plan = key, _Plan(lay, entries, order)
        return self._plan

    def _welcome_max_shard(self) -> int:
        if self._channel is None:
            self._reconnect()
        assert self._channel is not None
        return self._channel.welcome.max_shard_size

    def _pairs(self, arena: Arena, plan: _Plan, flat: Flat) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if arena.views_key is not plan:
            arena.views = [
                arena.bytes[shard.offset + p.start : shard.offset + p.end]
                .view(FROM_SAFETENSORS[p.spec.dtype])
                .view(p.spec.shape)
                for comp in plan.layout.components
                for shard in comp.shards
                for p in shard.tensors
            ]
            arena.views_key = plan
        return [
            (dst, flat.components[ci].tensors[ti][1])
            for dst, (ci, ti) in zip(arena.views, plan.order, strict=True)
        ]

    def _stage_cuda(self, arena: Arena, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        # DESIGN §8: the copy stream waits for pending work, copies run non_blocking into the
        # page-locked arena, and the current stream waits for the copies so later in-place
        # updates cannot race them. The I/O side sends the request once the event has fired.
        arena.pin_for_cuda()
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            self._gpu_sender = ThreadPoolExecutor(1, thread_name_prefix="ckptd-gpu-send")
        stream, current = self._copy_stream, torch.cuda.current_stream()
        stream.wait_stream(current)
        with torch.no_grad(), torch.cuda.stream(stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=src.is_cuda)
                if src.is_cuda:
                    src.record_stream(stream)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(stream)
        current.wait_stream(stream)
        return event

    def _send_when_copied(self, event: Any, request: Snapshot, handle: SnapshotHandle) -> None:
        event.synchronize()
        handle._set_staged()
        self._send(request, handle)

    def _send(self, request: Snapshot, handle: SnapshotHandle) -> None:
        channel = self._channel
        try:
            if channel is None:
                raise CheckpointError("not connected to ckptd", code="daemon_died")
            channel.send(request)
        except CheckpointError as e:
            self._fail(handle.id, e)

    # --- slots -----------------------------------------------------------------------------------

    def _acquire(self, nbytes: int, policy: Policy, step: int) -> Arena | None:
        with self._lock:
            while True:
                free = [a for a in self._arenas if not a.busy]
                fit = next((a for a in free if a.size >= nbytes), None)
                if fit is None and (free or len(self._arenas) < self.options.slots):
                    if len(self._arenas) >= self.options.slots:
                        self._drop_arena(free[0])  # too small for this snapshot: replace it
                    fit = Arena(layout_mod.round_up(nbytes, _ARENA_ROUND))
                    self._arenas.append(fit)
                if fit is not None:
                    fit.busy = True
                    fit.generation += 1
                    return fit
                if policy == "skip":
                    log.info("[run=%s step=%s] skipped: all %d slots busy", self.run, step, len(self._arenas))
                    return None
                if policy == "error":
                    raise CheckpointError(
                        f"all {len(self._arenas)} arena slots are still being written; wait, use "
                        "policy='block' or 'skip', or raise slots=",
                        code="busy",
                    )
                self._lock.wait()

    def _drop_arena(self, arena: Arena) -> None:
        self._arenas.remove(arena)
        if arena.id in self._registered and self._channel is not None and not self._channel.closed:
            try:
                self._channel.send(ReleaseArena(arena=arena.id))
            except CheckpointError:
                pass
        self._registered.discard(arena.id)
        arena.close()

    def _register(self, arena: Arena) -> None:
        if arena.id in self._registered:
            return
        assert self._channel is not None
        self._channel.send(RegisterArena(arena=arena.id, size=arena.size), fds=(arena.fd,))
        self._registered.add(arena.id)

    def _finish(self, snapshot_id: int) -> SnapshotHandle | None:
        with self._lock:
            entry = self._pending.pop(snapshot_id, None)
            if entry is None:
                return None
            entry.arena.busy = False
            self._lock.notify_all()
        return entry.handle

    def _fail(self, snapshot_id: int, error: CheckpointError) -> None:
        handle = self._finish(snapshot_id)
        if handle is not None:
            handle._fail(error)

    # --- I/O thread ------------------------------------------------------------------------------

    def _on_message(self, msg: DaemonMessage) -> None:
        if isinstance(msg, Committed):
            handle = self._finish(msg.id)
            if handle is not None:
                handle._commit(
                    CommitInfo(
                        path=Path(msg.path),
                        step=msg.step,
                        run=msg.run,
                        bytes=msg.bytes,
                        stall_s=handle.stall_s,
                        durable_s=now() - handle.started,
                        checksums=msg.checksums,
                        timings=msg.timings,
                    )
                )
        elif isinstance(msg, Failed):
            if msg.id is not None:
                self._fail(msg.id, CheckpointError(msg.message, code=msg.code, errno=msg.errno))
            else:
                log.error("ckptd refused this connection: %s (%s)", msg.message, msg.code)
        elif isinstance(msg, StatusReply):
            with self._status_ready:
                self._status.append(msg)
                self._status_ready.notify_all()

    def _on_close(self, reason: str) -> None:
        with self._lock:
            pending = list(self._pending.values())
            self._orphans += pending
        for entry in pending:
            self._fail(
                entry.handle.id,
                CheckpointError(
                    f"{reason}; step {entry.handle.step} was not committed (its bytes are kept until "
                    "the slot is reused: client.resubmit() sends it to a restarted daemon)",
                    code="daemon_died",
                ),
            )
        with self._status_ready:
            self._status_ready.notify_all()

    def resubmit(self) -> list[SnapshotHandle]:
        """Send the snapshots that were in flight when the daemon died to a (restarted) daemon.

        Their bytes are still in the arenas unless a later snapshot reused the slot; those are
        skipped with a warning. Returns a new handle per resubmitted snapshot.

        >>> try:                                          # doctest: +SKIP
        ...     handle.wait()
        ... except CheckpointError as e:
        ...     if e.code == "daemon_died":
        ...         handle, = client.resubmit()
        """
        with self._snapshot_lock:
            if self._channel is None or self._channel.closed:
                self._reconnect()
            with self._lock:
                orphans, self._orphans = self._orphans, []
            handles = []
            for old in sorted(orphans, key=lambda e: e.handle.id):
                with self._lock:
                    intact = old.arena in self._arenas and old.arena.generation == old.generation
                    intact = intact and not old.arena.busy
                    if intact:
                        old.arena.busy = True
                if not intact:
                    log.warning(
                        "[run=%s step=%s] cannot resubmit: its slot was reused",
                        old.handle.run,
                        old.handle.step,
                    )
                    continue
                handle = SnapshotHandle(next(self._ids), old.handle.run, old.handle.step, now())
                request = old.request.model_copy(update={"id": handle.id})
                with self._lock:
                    self._pending[handle.id] = _InFlight(handle, old.arena, request, old.generation)
                    self._handles.append(handle)
                try:
                    self._register(old.arena)
                except BaseException:
                    self._finish(handle.id)
                    raise
                handle._set_staged()
                self._send(request, handle)
                handles.append(handle)
            return handles

    # --- status, restore, close ------------------------------------------------------------------

    def status(self, timeout_s: float = 10.0) -> StatusReply:
        """What the daemon is doing now."""
        if self._channel is None or self._channel.closed:
            self._reconnect()
        assert self._channel is not None
        with self._status_ready:
            self._status.clear()
            self._channel.send(StatusRequest())
            if not self._status_ready.wait_for(lambda: bool(self._status), timeout_s):
                raise CheckpointError(f"ckptd did not answer status within {timeout_s}s", code="timeout")
            return self._status.pop()

    def restore(
        self, obj: object, *, step: int | None = None, run: str | None = None, fallback: bool = True
    ) -> int:
        """Load a committed checkpoint into ``obj`` in place and return its step.

        ``step=None`` takes the newest committed step; if its checksums do not verify, an older
        step is used (with a warning) when ``fallback``, else ``CheckpointError`` is raised. An
        explicit ``step`` that does not verify always raises.
        """
        run = paths.check_name("run", run or self.run)
        run_dir = self.root / run
        if step is not None:
            candidates = [run_dir / paths.step_dirname(step)]
        else:
            candidates = reading.candidates(run_dir)[: None if fallback else 1]
        for i, step_dir in enumerate(candidates):
            try:
                manifest = read_manifest(step_dir)
                loaded = reading.load_manifest(step_dir, manifest)
            except (ManifestError, reading.CorruptCheckpoint, OSError) as e:
                if step is not None or not fallback:
                    raise CheckpointError(f"cannot restore {step_dir}: {e}", code="corrupt") from e
                later = "; trying an older step" if i + 1 < len(candidates) else ""
                log.warning("skipping %s: %s%s", step_dir, e, later)
                continue
            restore_mod.apply(obj, loaded)
            return manifest.step
        raise CheckpointError(f"no committed checkpoint that verifies in {run_dir}", code="not_found")

    def _raise_unobserved(self) -> None:
        with self._lock:
            handles, self._handles = self._handles, [h for h in self._handles if not h.done_now()]
        for h in handles:
            err = h._unobserved_error()
            if err is not None:
                raise CheckpointError(
                    f"an earlier snapshot (step {h.step} of run {h.run!r}) failed and nobody checked: {err}",
                    code=err.code,
                    errno=err.errno,
                ) from err

    def close(self, *, wait: bool = True, timeout_s: float | None = None) -> None:
        """Wait for in-flight snapshots (unless ``wait=False``), then release everything.
        Raises a failure nobody looked at."""
        if self._closed:
            return
        if wait:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            with self._lock:
                ok = self._lock.wait_for(
                    lambda: not self._pending,
                    None if deadline is None else max(0.0, deadline - time.monotonic()),
                )
            if not ok:
                log.warning("closing with %d snapshots still in flight", len(self._pending))
        self._closed = True
        if self._gpu_sender is not None:
            self._gpu_sender.shutdown(wait=True)
        if self._channel is not None:
            self._channel.close()
        with self._lock:
            for arena in list(self._arenas):
                self._drop_arena(arena)
        self._raise_unobserved()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
