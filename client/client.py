"""``Client``: the training side of ckptd.

>>> from client import Client
>>> with Client.connect() as ckpt:                       # doctest: +SKIP
...     handle = ckpt.snapshot({"model": model, "optimizer": opt, "step": step}, step=step)
...     handle.wait()
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ckptd import paths
from ckptd.protocol import (
    Abandon,
    Committed,
    DaemonMessage,
    Failed,
    Heartbeat,
    ProtocolError,
    RegisterArena,
    ReleaseArena,
    Staged,
    StatusReply,
    StatusRequest,
    Welcome,
    encode,
)
from ckptd.sizes import parse_size
from client import noderoots, topology
from client import ranks as ranks_mod
from client import restore as restore_mod
from client.arena import Arena
from client.channel import Channel
from client.errors import CheckpointError
from client.handle import CommitInfo, SnapshotHandle, now
from client.inflight import InFlight, Request
from client.liveness import Progress, Watchdog
from client.plan import Plan, copy_pairs, make_plan, signature
from client.reap import Lost, Reaper, committed, no_longer_read
from client.slots import Policy, Quarantine, SlotPool
from client.spawn import connect_daemon, default_socket
from client.staging import CudaStager, copy_host, copy_pairs_host
from client.tree import Flat, flatten, paused_gc

log = logging.getLogger(__name__)
#: Seconds a reconnection waits for the hello of a daemon that is listening: a live one answers
#: at once (its event loop never blocks for long); a stopped one must not hold training longer.
RECONNECT_HELLO_S = 10.0
# How long close() lets done callbacks still running look at their failure before raising it.
_CALLBACK_SETTLE_S = 5.0


@dataclass(frozen=True)
class ClientOptions:
    """Options of ``Client.connect`` beyond the socket, root and run."""

    max_shard_size: int | str | None = None  # None: the daemon's (--max-shard-size, default 5GB)
    slots: int = 2  # arenas, each holding one snapshot in flight
    connect_timeout_s: float = 60.0  # includes starting a daemon
    daemon_args: tuple[str, ...] = ()  # extra `ckptd serve` arguments when autostarting
    # Hand a host snapshot of more than one 64 MiB copy batch to the daemon while copying it, so
    # its writing can start during the copy; the daemon then competes with the copy (on 2 cores:
    # stall +17 % at 1 GB, +33 % at 3 GB, durable no sooner). `python -m bench.handoff` measures.
    stream: bool = False
    # Seconds the daemon may send nothing (it sends a heartbeat every second) while snapshots are
    # pending before they fail with `daemon_unresponsive` (stopped, hung, or its loop blocked).
    liveness_timeout_s: float = 30.0
    # Seconds a pending snapshot's progress (stage, bytes written) and the daemon's may stand still,
    # heartbeats going on, before it fails with `daemon_stuck` (its storage hangs: a dead NFS mount).
    stuck_timeout_s: float = 300.0
    # Under torchrun (several ranks): seconds the daemon waits, from the first rank's part of a
    # step, for every other rank's before the step fails naming the ranks missing. Below
    # stuck_timeout_s: a part waiting for its peers makes no progress meanwhile.
    commit_timeout_s: float = 120.0
    # Timeout of the client's own gloo group: bounds the collectives of connect() and restore().
    group_timeout_s: float = 1800.0


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
        self._lock = threading.Condition()  # guards _pending, _orphans, _handles
        self._snapshot_lock = threading.RLock()  # one snapshot() / resubmit() / close() at a time
        self._slots = SlotPool(options.slots, self._release_remote)
        self._pending: dict[int, InFlight] = {}
        self._orphans: list[InFlight] = []  # in flight when the connection was lost
        self._handles: list[SnapshotHandle] = []
        self._plan_key: object = None
        self._plan: Plan | None = None
        self._status: list[StatusReply] = []
        self._status_ready = threading.Condition()
        self._status_call = threading.Lock()  # one status() at a time: replies carry no id
        self._reconnect_failed: tuple[float, CheckpointError] | None = None  # when, and why
        self._cuda = CudaStager()
        self._ranks: ranks_mod.Ranks | None = None  # under torchrun: this rank's place in its job
        self._topology: topology.Topology | None = None  # and the daemons (nodes) of that job
        # The ranks whose parts make one step directory: the job's, or on node-local roots this
        # node's (client/noderoots.py); None: this process writes its steps alone.
        self._writers: ranks_mod.Ranks | None = None
        self._local: noderoots.NodeLocal | None = None  # node-local roots: the job's nodes
        self._owned: tuple[Plan, dict[str, object], list[tuple[int, int]]] | None = None
        self._closed = False
        self._progress = Progress(options.stuck_timeout_s)
        self._watchdog: Watchdog | None = None
        self._reaper = Reaper(
            self._slots,
            self.status,
            self._lost,
            self._committed,
            liveness_timeout_s=options.liveness_timeout_s,
            stuck_timeout_s=options.stuck_timeout_s,
        )

    # --- connecting ------------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        root: str | os.PathLike[str] | None = None,
        run: str = "default",
        autostart: bool = True,
        process_group: object = None,
        **options: Any,
    ) -> Client:
        """Connect to the daemon on ``socket_path`` (``$CKPTD_SOCKET`` by default), starting one
        detached when nothing answers and ``autostart``. ``root`` (``$CKPTD_ROOT``) must match a
        running daemon's root; None takes whatever root it has.

        Under an initialised ``torch.distributed`` process group of several ranks (or the
        ``process_group`` given), this is a collective: every rank must call it, on its main
        thread. It makes the client's own gloo group and the job's uid, and checks that every
        rank reached the same daemon. Each rank's ``snapshot(state, step=N)`` (same N on every
        rank) then copies and hands over only its share of the shards, and the step commits once
        as one checkpoint. ``process_group=False`` opts out (each rank checkpoints on its own)."""
        known = {f.name for f in fields(ClientOptions)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; Client.connect accepts {sorted(known)}")
        opts = ClientOptions(**options)
        if opts.slots < 1:
            raise ValueError(f"slots must be >= 1, got {opts.slots}")
        if not (opts.liveness_timeout_s > 0 and opts.stuck_timeout_s > 0):
            raise ValueError("liveness_timeout_s and stuck_timeout_s must be > 0 (seconds)")
        if opts.max_shard_size is not None:
            parse_size(opts.max_shard_size)
        client = cls(Path(socket_path) if socket_path else default_socket(), run, autostart, opts)
        chosen = root if root is not None else os.environ.get("CKPTD_ROOT")
        client._expected_root = Path(chosen).absolute() if chosen else None
        if not opts.commit_timeout_s > 0:
            raise ValueError(f"commit_timeout_s must be > 0 (seconds), got {opts.commit_timeout_s}")
        client._reconnect()
        client._ranks = client._writers = ranks_mod.join(process_group, opts.group_timeout_s)
        if client._ranks is not None and opts.commit_timeout_s >= opts.stuck_timeout_s:
            client.close(wait=False)
            raise ValueError(
                f"commit_timeout_s={opts.commit_timeout_s:g} must be below stuck_timeout_s="
                f"{opts.stuck_timeout_s:g} (seconds) under torchrun: a part waiting that long for "
                "its peers would be taken for stuck storage"
            )
        if client._ranks is not None and client._channel is not None:
            try:
                client._topology = _topology(client._ranks, client._channel.welcome, str(client.root))
                if not client._topology.shared_root:  # node-local roots: each node its own copy
                    client._writers = noderoots.part_group(client._ranks, client._topology)
                    node = client._channel.welcome.node
                    client._local = noderoots.nodes_of(client._ranks, client._topology, node)
            except CheckpointError:
                client.close(wait=False)
                raise
        client._watchdog = Watchdog(opts.liveness_timeout_s, lambda: client._channel, client._waiting_on)
        return client

    def _reconnect(self, hello_timeout_s: float | None = None) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        channel = connect_daemon(
            self.socket_path,
            autostart=self.autostart,
            expected_root=self._expected_root,
            slots=self.options.slots,
            daemon_args=self.options.daemon_args,
            max_shard_size=self.options.max_shard_size,
            timeout_s=self.options.connect_timeout_s,
            hello_timeout_s=hello_timeout_s,
        )
        channel.send_timeout_s = self.options.liveness_timeout_s
        welcome = channel.welcome
        self.root = Path(welcome.root)
        self._channel = channel
        # A different daemon instance means the one that could still read quarantined slots is gone.
        self._slots.release_quarantined(lambda q: q.instance != welcome.instance)
        channel.start(self._on_message, lambda reason, code: self._on_close(channel, reason, code))

    def _connected(self) -> Channel:
        """The connection, made again if it was lost. Against a daemon that is stopped or hung,
        one attempt waits at most ``RECONNECT_HELLO_S`` for its hello, and for
        ``liveness_timeout_s`` after such an attempt failed the error is raised again at once: the
        training thread is never held for ``connect_timeout_s`` at every snapshot."""
        if self._channel is None or self._channel.closed:
            failed = self._reconnect_failed
            if failed is not None and time.monotonic() - failed[0] < self.options.liveness_timeout_s:
                ago = time.monotonic() - failed[0]
                raise CheckpointError(
                    f"not connected to ckptd; reconnecting {ago:.1f} s ago failed: {failed[1]} "
                    f"(tried again {self.options.liveness_timeout_s:g} s after that, "
                    "liveness_timeout_s)",
                    code=failed[1].code,
                ) from failed[1]
            try:
                self._reconnect(min(self.options.connect_timeout_s, RECONNECT_HELLO_S))
            except CheckpointError as e:
                if e.code == "daemon_unresponsive":  # a wait; a refusal or no daemon is quick to retry
                    self._reconnect_failed = (time.monotonic(), e)
                raise
            self._reconnect_failed = None
        if self._channel is None:
            raise CheckpointError("not connected to ckptd", code="daemon_died")
        return self._channel

    # --- snapshot --------------------------------------------------------------------------------

    def snapshot(
        self,
        obj: object,
        *,
        step: int,
        run: str | None = None,
        on_done: Callable[[SnapshotHandle], object] | None = None,
        policy: Policy = "block",
        files: Mapping[str, bytes] | None = None,
        keep_last: int | None = None,
        keep_steps: Sequence[int] = (),
    ) -> SnapshotHandle:
        """Copy ``obj``'s tensors into a free arena slot and hand them to the daemon.

        Returns once the snapshot is consistent: the caller may change its tensors at once.
        ``policy`` says what happens when every slot is still being written: ``block`` waits,
        ``skip`` returns a handle with ``skipped`` set, ``error`` raises ``CheckpointError``.
        ``skip`` and ``error`` never wait, neither for a slot nor for another thread's
        ``snapshot()`` that waits for one. ``block`` waits while a slot can come free: it raises
        ``CheckpointError`` once none can (the daemon is unresponsive or stuck; every slot holds
        a lost snapshot: call ``resubmit()`` or ``discard_lost()``).

        A failure of an earlier snapshot that nobody looked at is raised here, after this
        snapshot was taken: the error's ``handle`` is this snapshot's handle.

        ``files``: small files (name -> bytes, binary-safe; tokenizer files, trainer_state.json)
        written at the top of the step directory beside the model's ``config.json``, 40 MiB in all
        at most. ``keep_last``: once this step is committed, keep only the newest ``keep_last``
        committed steps of the run (never removing the newest); None: the daemon's --keep-last.
        ``keep_steps``: steps retention keeps besides (the best one of a Trainer).

        >>> try:                                          # doctest: +SKIP
        ...     handle = ckpt.snapshot(model, step=2)
        ... except CheckpointError as e:
        ...     log.error("an earlier checkpoint failed: %s", e)
        ...     handle = e.handle                         # step 2 was taken all the same
        """
        started = now()
        if policy not in ("block", "skip", "error"):
            raise ValueError(f"policy must be 'block', 'skip' or 'error', got {policy!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        run = paths.check_name("run", self.run if run is None else run)
        with self._snapshot_lock:
            flat, channel, plan = self._planned(obj)
        if keep_last is not None and (isinstance(keep_last, bool) or keep_last < 1):
            raise ValueError(f"keep_last must be an int >= 1 (or None: the daemon's), got {keep_last!r}")
        blobs = dict(files or {})
        twice = sorted(set(blobs) & set(flat.files))
        if twice:
            raise ValueError(f"files {twice} are written from the model already (its config)")
        handle = SnapshotHandle(next(self._ids), run, step, started)
        if on_done is not None:
            handle.add_done_callback(on_done)
        # Not under the lock: another thread's skip or error must not wait behind this wait.
        arena = self._slots.acquire(plan.layout.slot_bytes, policy, self._reap)
        if arena is None:
            log.info("[run=%s step=%s] skipped: every slot is still being written", run, step)
            handle._skip()
            return self._taken(handle)
        part = self._part(plan)
        request = Request(
            run,
            step,
            arena,
            plan,
            flat.tree,
            flat.files,
            blobs,
            keep_last,
            None if part is None else part[0],
            tuple(int(s) for s in keep_steps),
        )
        try:
            with self._snapshot_lock:
                if self._closed:
                    raise CheckpointError("this client is closed", code="closed")
                self._register(channel, arena, plan)
                with paused_gc():
                    self._stage(handle, request, flat, channel, started)
        except BaseException as e:
            self._unstage(handle, arena, e)
            raise
        return self._taken(handle)

    def prepare(self, obj: object) -> int:
        """Make and register, before the training loop, the arena slots and the layout that
        snapshots of ``obj`` will use, so the first ``snapshot()`` pays only its copy (making a
        slot costs about 0.73 s per GB on a small VM) and a slot that does not fit in memory
        fails here, not at the first checkpoint. It makes every slot: ``slots`` times the
        snapshot's bytes of shared memory, as snapshots that overlap would. Pass the tree as it
        will be snapshotted (after the first optimizer step, for an optimizer that makes its
        state then). Slots busy with snapshots in flight are left alone. Returns how many slots
        are ready."""
        with self._snapshot_lock:
            self._raise_unobserved()
            flat, channel, plan = self._planned(obj)
            held: list[Arena] = []
            try:
                while len(held) < self.options.slots:
                    try:
                        arena = self._slots.acquire(plan.layout.slot_bytes, "skip", self._reap)
                    except CheckpointError as e:
                        if e.code != "lost_snapshots":
                            raise
                        arena = None  # the others hold lost snapshots: left alone too
                    if arena is None:
                        break
                    held.append(arena)
                    self._register(channel, arena, plan)
                    if flat.cuda:  # page-lock it and make its views now, not in the first snapshot
                        arena.pin_for_cuda()
                        copy_pairs(arena, plan, flat)
            finally:
                for arena in held:
                    arena.generation -= 1  # nothing was copied into it
                    self._slots.free(arena)
            return len(held)

    def _unstage(self, handle: SnapshotHandle, arena: Arena, error: BaseException) -> None:
        """``snapshot()`` raised while staging: the caller has the exception, not the handle.
        The snapshot is never resubmitted (its slot may be half copied). Its slot is freed, unless
        a daemon may still read it (a streamed request it holds, or a connection lost meanwhile):
        then it stays quarantined until that daemon no longer lists the snapshot."""
        self._forget(handle.id)
        handle._observed = True  # raised to the caller: not again by the next snapshot()
        handle._copied.set()  # the copy raised: nothing writes the slot any more
        handle._fail(CheckpointError(f"snapshot() raised while copying: {error!r}", code="copy_error"))
        self._slots.discard(arena)  # lost meanwhile: kept for nothing, it holds a partial copy
        if arena.quarantine is None:
            self._slots.free(arena)

    def _forget(self, snapshot_id: int) -> None:
        """Drop a snapshot whose slot may hold a partial copy: neither pending nor resubmittable."""
        with self._lock:
            self._pending.pop(snapshot_id, None)
            self._orphans = [o for o in self._orphans if o.handle.id != snapshot_id]
            self._lock.notify_all()

    def _planned(self, obj: object) -> tuple[Flat, Channel, Plan]:
        """``obj`` flattened, the connection and the plan (under ``_snapshot_lock``)."""
        if self._closed:
            raise CheckpointError("this client is closed", code="closed")
        flat = flatten(obj)
        channel = self._connected()
        return flat, channel, self._plan_for(flat, channel)

    def _plan_for(self, flat: Flat, channel: Channel) -> Plan:
        max_shard = parse_size(self.options.max_shard_size or channel.welcome.max_shard_size)
        with paused_gc():
            key = signature(flat, max_shard)
            if key != self._plan_key or self._plan is None:
                if flat.sharded and self._local is not None:
                    raise CheckpointError(_SHARDED_NODE_LOCAL, code="multi_node")
                try:
                    ranks = self._writers
                    plan = make_plan(
                        flat, max_shard, None if ranks is None else (ranks.rank, ranks.world_size)
                    )
                except ProtocolError as e:
                    raise CheckpointError(f"snapshot layout too large: {e}", code="too_large") from e
                except ValueError as e:  # a sharded snapshot without the ranks to write it
                    raise CheckpointError(str(e), code="not_multi_rank") from e
                self._plan_key, self._plan = key, plan
        return self._plan

    def _stage(
        self, handle: SnapshotHandle, request: Request, flat: Flat, channel: Channel, started: float
    ) -> None:
        part = self._part(request.plan)
        streamed = (
            flat.host
            and not flat.cuda
            and self.options.stream
            and len(request.plan.batches) > 1
            and part is None
        )
        try:
            frame = request.frame(handle.id)
            first = request.frame(handle.id, ready=0) if streamed else b""
        except ProtocolError as e:
            raise CheckpointError(f"snapshot request too large: {e}", code="too_large") from e
        entry = InFlight(handle, request, frame, request.arena.generation, channel)
        with self._lock:
            self._pending[handle.id] = entry
            self._handles.append(handle)
        if flat.cuda:
            event = self._cuda.copy(request.arena, _mine(copy_pairs(request.arena, request.plan, flat), part))
        elif streamed:
            self._stream(entry, flat, first, started)
            return
        elif flat.host:
            for start, stop in [(0, len(request.plan.comps))] if part is None else part[1]:
                copy_host(request.arena, request.plan, flat, start, stop)
            handle._set_staged()
        else:  # another accelerator: torch copies to host synchronously
            copy_pairs_host(_mine(copy_pairs(request.arena, request.plan, flat), part))
            handle._set_staged()
        # Set before sending: the commit can be reported before this thread runs again.
        handle.stall_s = now() - started
        if flat.cuda:
            self._cuda.after(event, lambda error: self._sent_after_copy(entry, error))
        else:
            self._send(entry)

    def _stream(self, entry: InFlight, flat: Flat, first: bytes, started: float) -> None:
        """Send the request (``first``) before copying, then copy batch by batch, telling the
        daemon after each how far the copy has got, so it writes while the rest is copied. If the
        connection goes, the copy still finishes (the slot then holds the whole snapshot for
        ``resubmit()``). If the copy raises, the daemon is told to abandon the snapshot and the
        slot stays quarantined until the daemon no longer lists it."""
        request, handle, channel = entry.request, entry.handle, entry.channel
        lost = self._try_send(channel, first)
        if lost is None:
            self._progress.sent(handle.id)
        try:
            last = len(request.plan.batches) - 1
            for i, (start, stop, ready) in enumerate(request.plan.batches):
                copy_host(request.arena, request.plan, flat, start, stop)
                if i == last:
                    handle._set_staged()
                    handle.stall_s = now() - started  # before the last send: a commit may follow
                if lost is None:
                    lost = self._try_send(channel, encode(Staged(id=handle.id, ready=ready)))
        except BaseException:
            if lost is None:
                self._try_send(channel, encode(Abandon(id=handle.id)))
                q = Quarantine(handle.run, handle.step, channel.welcome.instance, lambda: True, channel.token)
                self._slots.quarantine(request.arena, q)
            raise
        if lost is not None:
            self._lose([entry], str(lost), lost.code)

    @staticmethod
    def _try_send(channel: Channel, frame: bytes) -> CheckpointError | None:
        """Send ``frame``; why it could not be sent, or None."""
        try:
            channel.send_bytes(frame)
        except CheckpointError as e:
            return e
        return None

    def _sent_after_copy(self, entry: InFlight, error: BaseException | None) -> None:
        entry.handle._set_staged()
        if error is not None:
            with self._lock:  # lost meanwhile: its slot holds a partial copy, never resubmit it
                lost = entry in self._orphans
                self._orphans = [o for o in self._orphans if o is not entry]
            if lost:
                self._slots.discard(entry.request.arena)
            self._fail(
                entry.handle.id, CheckpointError(f"device-to-host copy failed: {error}", code="copy_error")
            )
        else:
            self._send(entry)

    def _send(self, entry: InFlight) -> None:
        """Send on the connection the snapshot was staged for; if it is gone, the snapshot is lost
        with it (and can be resubmitted)."""
        try:
            entry.channel.send_bytes(entry.frame)
        except CheckpointError as e:
            self._lose([entry], str(e), e.code)
        else:
            self._progress.sent(entry.handle.id)

    @property
    def world_size(self) -> int:
        """Ranks whose snapshots of a step make one checkpoint (1: this process alone)."""
        return 1 if self._ranks is None else self._ranks.world_size

    def _nodes(self) -> int:
        """The daemons (one per node, one shared root) that write this job's parts."""
        return 1 if self._topology is None else self._topology.daemons

    def _part(self, plan: Plan) -> tuple[dict[str, object], list[tuple[int, int]]] | None:
        """Under torchrun: this rank's part of a snapshot of ``plan`` (the request's multi-rank
        fields, and the placements it copies, as ranges); None for one process."""
        ranks = self._writers
        if ranks is None:
            return None
        if (self._owned is None or self._owned[0] is not plan) and plan.pieces is not None:
            fields_ = {
                "rank": ranks.rank,
                "world_size": ranks.world_size,
                "job": ranks.job,
                "pieces": [list(p) for p in plan.pieces],
                "commit_timeout_s": float(self.options.commit_timeout_s),
                "nodes": self._nodes(),
            }
            self._owned = (plan, fields_, list(plan.mine))
        if self._owned is None or self._owned[0] is not plan:
            owned = ranks.owned(plan.layout)
            spans, first = [], 0
            for c in plan.layout.components:
                for s in c.shards:
                    spans.append((first, first + len(s.tensors)))
                    first += len(s.tensors)
            fields_ = {
                "rank": ranks.rank,
                "world_size": ranks.world_size,
                "job": ranks.job,
                "owned": owned,
                "commit_timeout_s": float(self.options.commit_timeout_s),
                "nodes": self._nodes(),
            }
            self._owned = (plan, fields_, [spans[i] for i in owned])
        return self._owned[1], self._owned[2]

    def _register(self, channel: Channel, arena: Arena, plan: Plan) -> None:
        """Tell the connection about the arena and the layout a snapshot uses, once each."""
        if arena.id not in channel.arenas:
            channel.send(RegisterArena(arena=arena.id, size=arena.size), fds=(arena.fd,))
            channel.arenas.add(arena.id)
        if plan.layout_id not in channel.layouts:
            channel.send_bytes(plan.register_frames)
            channel.layouts.add(plan.layout_id)

    def _release_remote(self, arena: Arena) -> None:
        channel = self._channel
        if channel is not None and arena.id in channel.arenas:
            channel.arenas.discard(arena.id)
            if not channel.closed:
                with contextlib.suppress(CheckpointError):
                    channel.send(ReleaseArena(arena=arena.id))

    def _reap(self) -> CheckpointError | None:
        return self._reaper.reap(self._channel)

    def _lost(self) -> list[Lost]:
        with self._lock:
            return [(o.handle, functools.partial(self._drop_lost, o)) for o in self._orphans]

    def _drop_lost(self, entry: InFlight) -> None:
        with self._lock:
            self._orphans = [o for o in self._orphans if o is not entry]
        self._slots.discard(entry.request.arena, read_done=True)

    def _committed(self, handle: SnapshotHandle) -> bool:
        return committed(self.root, handle)

    # --- outcomes (I/O thread) -------------------------------------------------------------------

    def _finish(self, snapshot_id: int) -> SnapshotHandle | None:
        self._progress.forget(snapshot_id)
        with self._lock:
            entry = self._pending.pop(snapshot_id, None)
            self._lock.notify_all()
        if entry is None:
            return None
        self._slots.free(entry.request.arena)
        return entry.handle

    def _fail(self, snapshot_id: int, error: CheckpointError) -> None:
        handle = self._finish(snapshot_id)
        if handle is not None:
            handle._fail(error)

    def _on_message(self, msg: DaemonMessage) -> None:
        if isinstance(msg, Heartbeat):
            self._on_heartbeat(msg)
        elif isinstance(msg, Committed):
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
            if msg.code == "layout_limit" and msg.id is not None:
                with self._lock:
                    entry = self._pending.get(msg.id)
                if entry is not None:  # register it again next time: other clients may have left
                    entry.channel.layouts.discard(entry.request.plan.layout_id)
            if msg.id is not None:
                self._fail(msg.id, CheckpointError(msg.message, code=msg.code, errno=msg.errno))
            else:
                log.error("ckptd refused this connection: %s (%s)", msg.message, msg.code)
        elif isinstance(msg, StatusReply):
            with self._status_ready:
                self._status.append(msg)
                self._status_ready.notify_all()

    def _on_heartbeat(self, beat: Heartbeat) -> None:
        """Fail the snapshots whose progress stood still too long while the daemon lives."""
        for snapshot_id, seen in self._progress.heartbeat(beat):
            with self._lock:
                entry = self._pending.get(snapshot_id)
            if entry is None:
                continue
            reason = (
                f"ckptd (pid {entry.channel.welcome.pid}) is running, but this snapshot made no progress "
                f"for {time.monotonic() - seen.since:.0f} s "
                f"(stuck_timeout_s={self.options.stuck_timeout_s:g}) "
                f"at stage {seen.stage!r} with {seen.bytes_written} bytes written: its storage is stuck "
                "(a hung mount?); the daemon may still write it, so its slot is kept"
            )
            log.error("[run=%s step=%s] %s", entry.handle.run, entry.handle.step, reason)
            self._lose([entry], reason, "daemon_stuck")

    def _waiting_on(self, channel: Channel) -> bool:
        with self._lock:
            return any(e.channel is channel for e in self._pending.values())

    def _on_close(self, channel: Channel, reason: str, code: str) -> None:
        with self._lock:
            lost = [e for e in self._pending.values() if e.channel is channel]
        self._lose(lost, reason, code)
        with self._status_ready:
            self._status_ready.notify_all()

    def _lose(self, entries: list[InFlight], reason: str, code: str = "daemon_died") -> None:
        """The connection these snapshots were sent on is gone, or the daemon stopped moving them:
        fail their handles now, but keep their slots quarantined (the daemon may still be reading
        them) and kept for ``resubmit()`` (or ``discard_lost()``)."""
        for entry in entries:
            with self._lock:
                if self._pending.pop(entry.handle.id, None) is None:
                    continue
                self._orphans.append(entry)
                self._lock.notify_all()
            self._progress.forget(entry.handle.id)
            handle = entry.handle
            # Not `staged`: a failed handle is staged at once, while a device copy may still run.
            q = Quarantine(
                handle.run,
                handle.step,
                entry.channel.welcome.instance,
                copied=handle._copied.is_set,
                connection=entry.channel.token,
            )
            self._slots.lose(entry.request.arena, q, f"step {handle.step} of run {handle.run!r}")
            handle._fail(
                CheckpointError(
                    f"{reason}; step {handle.step} of run {handle.run!r} may not be committed (its bytes "
                    "are kept in its slot: client.resubmit() sends it to a restarted daemon, "
                    "client.discard_lost() drops it)",
                    code=code,
                )
            )

    # --- resubmit, status, restore, close --------------------------------------------------------

    def resubmit(self) -> list[SnapshotHandle]:
        """Send the snapshots that were in flight when the daemon died (or stopped answering, or
        got stuck) to a (restarted) daemon, straight from the slots that kept their bytes.

        Those the old daemon committed after all are skipped with a log line; one that the same
        daemon still writes after ``stuck_timeout_s`` stays lost (resubmit later, or
        ``discard_lost()``). Returns a new handle per resubmitted snapshot.

        >>> try:                                          # doctest: +SKIP
        ...     handle.wait()
        ... except CheckpointError as e:
        ...     if e.code in ("daemon_died", "daemon_unresponsive"):
        ...         handle, = client.resubmit()
        """
        with self._snapshot_lock:
            channel = self._connected()
            with self._lock:
                orphans, self._orphans = self._orphans, []
            self._wait_for_old_jobs(orphans, channel, self.options.stuck_timeout_s)
            handles = []
            for old in sorted(orphans, key=lambda e: e.handle.id):
                if self._committed(old.handle):
                    log.info(
                        "[run=%s step=%s] not resubmitted: committed after all",
                        old.handle.run,
                        old.handle.step,
                    )
                    self._slots.discard(old.request.arena, read_done=True)
                    continue
                if not self._slots.claim(old.request.arena, old.generation):
                    log.warning(
                        "[run=%s step=%s] not resubmitted yet: ckptd may still be writing it from its slot",
                        old.handle.run,
                        old.handle.step,
                    )
                    with self._lock:
                        self._orphans.append(old)
                    continue
                handle = SnapshotHandle(next(self._ids), old.handle.run, old.handle.step, now())
                handle._set_staged()
                entry = InFlight(handle, old.request, old.request.frame(handle.id), old.generation, channel)
                with self._lock:
                    self._pending[handle.id] = entry
                    self._handles.append(handle)
                try:
                    self._register(channel, old.request.arena, old.request.plan)
                except BaseException:
                    self._finish(handle.id)
                    raise
                self._send(entry)
                handles.append(handle)
            return handles

    def discard_lost(self) -> list[SnapshotHandle]:
        """Give up the snapshots that were lost with the daemon (``daemon_died``,
        ``daemon_unresponsive``, ``daemon_stuck``) instead of resubmitting them: their slots
        are used for new snapshots again (once no daemon may still read them). Returns their
        (failed) handles. Never waits, not even for another thread's ``snapshot()``."""
        with self._lock:
            orphans, self._orphans = self._orphans, []
        for old in orphans:
            self._slots.discard(old.request.arena)
            log.info("[run=%s step=%s] lost snapshot dropped", old.handle.run, old.handle.step)
        return [o.handle for o in sorted(orphans, key=lambda e: e.handle.id)]

    def _wait_for_old_jobs(self, orphans: list[InFlight], channel: Channel, timeout_s: float) -> None:
        """If the daemon that lost them is still the one answering, wait until it no longer writes
        them, so a resubmission never races the original write."""
        deadline = time.monotonic() + timeout_s
        reply = self.status(self.options.liveness_timeout_s)
        while time.monotonic() < deadline and any(
            o.request.arena.quarantine is not None
            and not no_longer_read(o.request.arena.quarantine, reply, channel)
            for o in orphans
        ):
            time.sleep(0.2)
            reply = self.status(self.options.liveness_timeout_s)
        for o in orphans:  # a device-to-host copy may still be filling its slot
            o.handle._copied.wait(max(0.0, deadline - time.monotonic()))
        self._slots.release_quarantined(lambda q: no_longer_read(q, reply, channel))

    def status(self, timeout_s: float = 10.0) -> StatusReply:
        """What the daemon is doing now."""
        channel = self._connected()
        with self._status_call, self._status_ready:
            self._status.clear()
            channel.send(StatusRequest())
            if not self._status_ready.wait_for(lambda: bool(self._status) or channel.closed, timeout_s):
                raise CheckpointError(f"ckptd did not answer status within {timeout_s}s", code="timeout")
            if not self._status:
                raise CheckpointError("the connection to ckptd closed", code="daemon_died")
            return self._status.pop()

    def restore(
        self, obj: object, *, step: int | None = None, run: str | None = None, fallback: bool = True
    ) -> int:
        """Load a committed checkpoint into ``obj`` in place and return its step.

        ``step=None`` takes the newest committed step; if its checksums do not verify, an older
        step is used (with a warning) when ``fallback``, else ``CheckpointError`` is raised. An
        explicit ``step`` that does not verify always raises.
        """
        run_dir = self.root / paths.check_name("run", self.run if run is None else run)
        if self._ranks is not None and self._local is not None:  # a step every node holds
            return noderoots.agree_restore(
                self._ranks,
                self._local,
                run_dir,
                lambda s: restore_mod.restore_run(obj, run_dir, step=s, fallback=False, verify=False),
                step=step,
                fallback=fallback,
            )
        if self._ranks is not None:  # rank 0 picks the step, every rank loads it
            return ranks_mod.agree_restore(
                self._ranks,
                lambda s, fb: restore_mod.restore_run(
                    obj, run_dir, step=s, fallback=fb, verify=self._ranks is None or self._ranks.rank == 0
                ),
                step,
                fallback,
            )
        return restore_mod.restore_run(obj, run_dir, step=step, fallback=fallback)

    def _taken(self, handle: SnapshotHandle) -> SnapshotHandle:
        self._raise_unobserved(taken=handle)
        return handle

    def _raise_unobserved(
        self, taken: SnapshotHandle | None = None, settle_s: float | None = None
    ) -> SnapshotHandle | None:
        """Raise the failures nobody looked at, once, all in one error (``taken``, the snapshot
        just taken, is not one of them and rides on the error as ``handle``); else ``taken``.

        A failed snapshot whose done callbacks are still running is left for later (a callback
        may read its ``error``), unless ``settle_s`` is given: then they get that long, and what
        is still unobserved after it is raised (``close()``: nothing comes later)."""
        if settle_s is not None:
            deadline = now() + settle_s
            for h in list(self._handles):
                if h.done_now():
                    h._settled.wait(max(0.0, deadline - now()))

        def finished(h: SnapshotHandle) -> bool:
            return h._settled.is_set() or (settle_s is not None and h.done_now())

        with self._lock:
            done = [h for h in self._handles if finished(h) and h is not taken]
            self._handles = [h for h in self._handles if not finished(h) or h is taken]
        failed = [(h, err) for h in done if (err := h._unobserved_error()) is not None]
        if failed:
            first = failed[0][1]
            which = ", ".join(f"step {h.step} of run {h.run!r}" for h, _ in failed)
            kind = "an earlier snapshot" if len(failed) == 1 else "earlier snapshots"
            what = "; ".join(str(err) for _, err in failed)
            note = ""
            if taken is not None:
                fate = "skipped: every slot was busy" if taken.skipped else "taken all the same"
                note = f"; step {taken.step} was {fate} (this error's handle)"
            raise CheckpointError(
                f"{kind} ({which}) failed and nobody checked: {what}{note}",
                code=first.code,
                errno=first.errno,
                handle=taken,
            ) from first
        return taken

    def close(self, *, wait: bool = True, timeout_s: float | None = None) -> None:
        """Wait for in-flight snapshots (unless ``wait=False``), then release everything.

        The wait is bounded even with ``timeout_s=None``: it lasts while the daemon makes
        progress; a daemon silent for ``liveness_timeout_s`` or a snapshot standing still for
        ``stuck_timeout_s`` fails those snapshots, and ``close()`` goes on. With ``timeout_s``,
        snapshots still pending then fail with code ``closed`` (the daemon may still commit
        them). Raises a failure nobody looked at. Must not be called from a done callback."""
        if threading.current_thread().name == "ckptd-client-io":
            raise RuntimeError(
                "close() from a snapshot callback would deadlock; call it from your own thread"
            )
        with self._snapshot_lock:
            if self._closed:
                return
            if wait:
                with self._lock:
                    ok = self._lock.wait_for(lambda: not self._pending, timeout_s)
                if not ok:
                    self._stop_waiting(f"close() stopped waiting after {timeout_s:g} s", observed=False)
            else:
                self._stop_waiting("close(wait=False) did not wait", observed=True)
            self._closed = True
            if self._watchdog is not None:
                self._watchdog.close()
            self._cuda.close()
            self._slots.close()
            if self._channel is not None:
                self._channel.close()
        self._raise_unobserved(settle_s=_CALLBACK_SETTLE_S)

    def _stop_waiting(self, why: str, *, observed: bool) -> None:
        """Fail the snapshots still pending at ``close()``: handed over, maybe committed later."""
        with self._lock:
            entries, self._pending = list(self._pending.values()), {}
            self._lock.notify_all()
        if entries:
            log.warning("closing with %d snapshots still in flight", len(entries))
        for entry in entries:
            handle = entry.handle
            handle._observed = observed
            handle._fail(
                CheckpointError(
                    f"{why}; step {handle.step} of run {handle.run!r} was handed to ckptd pid "
                    f"{entry.channel.welcome.pid} and may still commit (check with `ckptd ls`)",
                    code="closed",
                )
            )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mine(
    pairs: list[tuple[Any, Any]], part: tuple[dict[str, object], list[tuple[int, int]]] | None
) -> list[tuple[Any, Any]]:
    """The copies of this rank's placements (all of them for one process)."""
    if part is None:
        return pairs
    return [pairs[i] for start, stop in part[1] for i in range(start, stop)]


def _topology(ranks: ranks_mod.Ranks, welcome: Welcome, root: str) -> topology.Topology:
    """The daemons of this job (a collective), refused where this version cannot commit it."""
    topo = topology.discover(ranks, socket.gethostname(), welcome.instance, root)
    if topo.single or topo.shared_root:  # several daemons of one root: they commit together
        return topo
    return topo  # shared root (the daemons join one temp dir) or node-local (client/noderoots.py)


_SHARDED_NODE_LOCAL = (
    "this snapshot holds sharded DTensors (FSDP2 slices), and the nodes of this job have "
    "checkpoint roots of their own (node-local): each node's daemon would hold only its own "
    "ranks' slices, never a complete checkpoint. Give every node one shared root (a shared "
    "filesystem, one daemon per node: ckptd serve --node-id), or snapshot full tensors (e.g. "
    "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options="
    "StateDictOptions(full_state_dict=True))), which every node then writes whole"
)
