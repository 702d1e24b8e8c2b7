"""The daemon's snapshot pipeline: from an accepted request to a committed checkpoint.

Stages, as reported in status and timings: accepted → writing → synced → committed → pruned
(or failed). Shards are written concurrently by a thread pool straight from the arena mapping,
each hashed while written and fsynced; small files follow; the manifest seals the temp directory;
snapshots of one run commit in the order they were accepted; retention runs only after commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ckptd import __version__, commit, shared
from ckptd.daemon.arenas import Arena
from ckptd.daemon.layouts import PreparedLayout
from ckptd.daemon.metrics import Metrics
from ckptd.daemon.multirank import MultiRank
from ckptd.daemon.parts import component_records
from ckptd.daemon.rootguard import RootGone, RootGuard
from ckptd.manifest import FORMAT, PER_RANK_FORMAT, ComponentRecord, FileRecord, Manifest, PartRecord
from ckptd.protocol import Committed, Failed, JobStatus, Message, Progress, Snapshot
from ckptd.storage import Storage

log = logging.getLogger(__name__)


#: A streamed snapshot not copied whole this long after it was accepted is abandoned (a copy
#: moves gigabytes per second; this frees the writer threads a hung or hostile client would hold).
STAGE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class PipelineOptions:
    """How the daemon writes. Sizes in bytes."""

    root: Path
    workers: int = 4  # shard writer threads
    direct_io: bool = False  # write shards with O_DIRECT where the filesystem allows it
    writer_nice: int = 10  # niceness added to the writer threads: training keeps the CPU it needs
    budget_bytes: int = 4 * 2**30  # bytes of snapshots being written at once
    keep_last: int = 0  # committed steps kept per run; 0 keeps all
    stage_timeout_s: float = STAGE_TIMEOUT_S  # the longest a streamed snapshot may take to be copied
    node_id: str = ""  # this daemon's node: it names the single-process temp directories


class Abandoned(RuntimeError):
    """A streamed snapshot whose client stopped before it finished copying."""


@dataclass
class Job:
    request: Snapshot
    layout: PreparedLayout
    arena: Arena
    reply: Callable[[Message], None]
    nbytes: int
    stage: str = "accepted"
    bytes_written: int = 0
    started: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)
    #: Bytes at the start of the slot that the client has copied (all of it unless streamed).
    ready: int = -1
    abandoned: str | None = None
    stage_timeout_s: float = STAGE_TIMEOUT_S
    finished: bool = False  # committed or failed
    file_bytes: int = 0  # of the request's small files, held until it finishes
    _cond: threading.Condition = field(default_factory=threading.Condition)
    #: Bytes of each shard being written (by its offset) read into the write so far.
    _partial: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ready < 0:
            self.ready = self.layout.end if self.request.ready is None else self.request.ready

    @property
    def complete(self) -> bool:
        return self.ready >= self.layout.end

    @property
    def progress_bytes(self) -> int:
        """Bytes of its shards written so far, moving with every chunk (not only per shard)."""
        with self._cond:
            return self.bytes_written + sum(self._partial.values())

    @property
    def progress(self) -> int:
        """Grows whenever the job moves: bytes written or a stage passed (heartbeats)."""
        return self.progress_bytes + len(self.timings)

    def note_written(self, offset: int, done: int, finished: bool = False) -> None:
        """A writer thread has written ``done`` bytes of the shard at ``offset``."""
        with self._cond:
            if finished:
                self._partial.pop(offset, None)
                self.bytes_written += done
            else:
                self._partial[offset] = done

    def mark(self, stage: str) -> None:
        self.stage = stage
        self.timings[f"{stage}_s"] = round(time.monotonic() - self.started, 6)

    def stage_more(self, ready: int) -> None:
        """The client copied the slot up to ``ready`` (event loop)."""
        with self._cond:
            if ready > self.ready and self.abandoned is None:
                self.ready = ready
                if self.complete:
                    self.timings["staged_s"] = round(time.monotonic() - self.started, 6)
                self._cond.notify_all()

    def abandon(self, reason: str) -> None:
        """Discard a streamed snapshot that is not complete (event loop)."""
        with self._cond:
            if not self.complete:
                self.abandoned = reason
                self._cond.notify_all()

    def wait_ready(self, end: int) -> None:
        """Block a writer until the slot is copied up to ``end``; raise if it never will be (the
        snapshot was abandoned, or was not copied whole within ``stage_timeout_s``)."""
        if self.ready >= end:
            return
        deadline = self.started + self.stage_timeout_s
        with self._cond:
            while self.ready < end and self.abandoned is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.abandoned = f"its client did not copy it whole within {self.stage_timeout_s:g} s"
                    self._cond.notify_all()
                    break
                self._cond.wait(left)
            if self.ready < end:
                raise Abandoned(f"step {self.request.step} of run {self.request.run!r}: {self.abandoned}")


class ByteBudget:
    """Admits work while the bytes held stay within capacity; an oversized job runs alone."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._used = 0
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        n = min(nbytes, self._capacity)
        async with self._cond:
            await self._cond.wait_for(lambda: self._used + n <= self._capacity)
            self._used += n
        try:
            yield
        finally:
            async with self._cond:
                self._used -= n
                self._cond.notify_all()


class Pipeline:
    def __init__(self, options: PipelineOptions, storage: Storage, metrics: Metrics) -> None:
        self.options = options
        self.storage = storage
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(
            options.workers,
            thread_name_prefix="ckptd-write",
            initializer=_lower_priority,
            initargs=(options.writer_nice,),
        )
        self._budget = ByteBudget(options.budget_bytes)
        self._tails: dict[str, asyncio.Future[None]] = {}
        self._jobs: dict[tuple[str, int, int], Job] = {}  # by run, step and rank
        self._multirank = MultiRank(self)
        self._tasks: set[asyncio.Task[None]] = set()
        #: The root as found at start-up (set by the daemon); checked before staging and committing.
        self.root: RootGuard | None = None
        self.on_root_gone: Callable[[RootGone], None] | None = None
        self._finished_work = 0  # the ``progress`` of jobs no longer in flight

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    @property
    def file_bytes_held(self) -> int:
        """Bytes of small files that the jobs in flight hold in the daemon's memory."""
        return sum(j.file_bytes for j in self._jobs.values())

    def busy(self, run: str, step: int, rank: int = 0) -> bool:
        """Whether a snapshot of this step (this rank's part of it) is being written (an abandoned
        one is only unwinding: the step may be taken again at once)."""
        job = self._jobs.get((run, step, rank))
        return job is not None and job.abandoned is None

    def ping_writers(self) -> Future[None]:
        """A no-op run by the writer pool: done once a writer thread is free (``health``)."""
        return self._pool.submit(_noop)

    def submit(self, job: Job) -> None:
        if job.request.world_size > 1:
            self._multirank.submit(job)
            return
        key = (job.request.run, job.request.step)
        if self.root is not None and self.root.gone is not None:  # refused at once, nothing held
            failure = _failure(job.request.id, *key, self.root.gone_error())
            self.metrics.fail(failure.code)
            job.finished = True
            job.reply(failure)
            return
        job.stage_timeout_s = self.options.stage_timeout_s
        self._jobs[(*key, 0)] = job
        job.arena.acquire()
        prev = self._tails.get(job.request.run)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails[job.request.run] = done
        task = asyncio.create_task(self._run(job, prev, done), name=f"snapshot {key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def jobs(self) -> list[Job]:
        """The jobs in flight (event loop)."""
        return list(self._jobs.values())

    def work(self) -> int:
        """A counter that grows whenever any job moves (for heartbeats; event loop)."""
        return self._finished_work + sum(j.progress for j in self._jobs.values())

    def status(self) -> list[JobStatus]:
        now = time.monotonic()
        return [
            JobStatus(
                run=j.request.run,
                step=j.request.step,
                stage=j.stage,
                bytes=j.nbytes,
                bytes_written=j.progress_bytes,
                age_s=round(now - j.started, 3),
            )
            for j in self._jobs.values()
        ]

    async def drain(self, timeout_s: float) -> bool:
        """Wait for every job; True when all finished in time."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        return not pending

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def _run(self, job: Job, prev: asyncio.Future[None] | None, done: asyncio.Future[None]) -> None:
        req = job.request
        try:
            path = await self._write_and_commit(job, prev)
            self.metrics.commit(job.nbytes, _stage_durations(job.timings))
            job.reply(
                Committed(
                    id=req.id,
                    run=req.run,
                    step=req.step,
                    path=str(path),
                    bytes=job.nbytes,
                    checksums=job.checksums,
                    timings=job.timings,
                )
            )
            log.info(
                "[run=%s step=%s] committed %s bytes in %.3fs",
                req.run,
                req.step,
                job.nbytes,
                time.monotonic() - job.started,
            )
        except Exception as e:  # every failure is reported to the client, never swallowed
            e = await self._root_verdict(e)
            job.mark("failed")
            log.error("[run=%s step=%s] failed: %s", req.run, req.step, e)
            failure = _failure(req.id, req.run, req.step, e)
            if isinstance(e, commit.AlreadyCommitted):
                self.metrics.refuse(failure.code)  # the caller's to fix, not an I/O failure
            else:
                self.metrics.fail(failure.code)
            job.reply(failure)
        finally:
            done.set_result(None)
            job.finished = True
            if self._tails.get(req.run) is done:
                del self._tails[req.run]
            self._untrack(job)

    def _untrack(self, job: Job) -> None:
        req = job.request
        key = (req.run, req.step, req.rank if req.world_size > 1 else 0)
        if self._jobs.get(key) is job:
            del self._jobs[key]
            self._finished_work += job.progress + 1
        job.arena.release_reader()

    async def _write_and_commit(self, job: Job, prev: asyncio.Future[None] | None) -> Path:
        # accepted → writing → synced → committed → pruned
        req, loop, st = job.request, asyncio.get_running_loop(), self.storage
        staged = await loop.run_in_executor(None, self._stage, req.run, req.step)
        try:
            job.mark("writing")
            job.reply(Progress(id=req.id, stage="writing", bytes_written=0))
            async with self._budget.hold(job.nbytes):
                components = await self._write_shards(job, staged)
            job.mark("synced")
            manifest = await loop.run_in_executor(None, self._write_small_files, job, staged, components)
            if prev is not None:
                await asyncio.shield(prev)  # commit in order within a run
            path = await loop.run_in_executor(None, self._commit, staged)
        except BaseException:
            await loop.run_in_executor(None, commit.discard, st, staged)
            raise
        job.mark("committed")
        job.checksums = {s.file: s.xxh3_128 for c in manifest.components for s in c.shards}
        # The snapshot's own keep_last (save_total_limit, ...) and the daemon's --keep-last: the
        # fewer of both when both are set (the operator's disk budget wins).
        keep_last = commit.retained(req.keep_last, self.options.keep_last)
        if keep_last:
            try:
                removed = await loop.run_in_executor(
                    None, commit.apply_retention, st, staged.run_dir, keep_last, path, req.keep_steps
                )
                if removed:
                    log.info(
                        "[run=%s step=%s] retention removed %s", req.run, req.step, [p.name for p in removed]
                    )
            except OSError as e:  # the new checkpoint is committed; an old one lingers
                log.warning("[run=%s step=%s] retention failed: %s", req.run, req.step, e)
            job.mark("pruned")
        return path

    def _check_root(self) -> None:
        if self.root is not None:
            self.root.check()

    def _stage(self, run: str, step: int, nonce: str | None = None) -> commit.StagedCheckpoint:
        self._check_root()
        if nonce is None and self.options.node_id:  # swept by this node's daemon only
            nonce = shared.local_nonce(self.options.node_id)
        return commit.stage(self.storage, self.options.root, run, step, nonce=nonce)

    def _commit(self, staged: commit.StagedCheckpoint) -> Path:
        self._check_root()  # a root made again by another daemon is not ours to publish into
        return commit.commit(self.storage, staged)

    async def _root_verdict(self, e: Exception) -> Exception:
        """A failure seen after the root went (ENOENT mid-write, say) is reported as that; any
        other failure (EIO from a flaky mount) as itself. The root is looked at in an executor
        thread: a hung mount must not stall the event loop."""
        if self.root is None:
            return e
        if isinstance(e, OSError) and self.root.gone is None:
            await asyncio.get_running_loop().run_in_executor(None, _look_at_root, self.root)
        if self.root.gone is None:
            return e
        gone = self.root.gone_error()
        if self.on_root_gone is not None:
            self.on_root_gone(gone)
        return gone

    async def _write_shards(self, job: Job, staged: commit.StagedCheckpoint) -> list[ComponentRecord]:
        return component_records(job.layout, await self._write_shard_files(job, staged))

    async def _write_shard_files(
        self, job: Job, staged: commit.StagedCheckpoint, owned: set[int] | None = None
    ) -> dict[int, FileRecord]:
        """Write the shards (``owned``: only those of these global indexes) concurrently; their
        records by global index (every component's shards in order)."""
        loop = asyncio.get_running_loop()
        dirs = [c.files.dir for c in job.layout.components if c.files.dir]
        await loop.run_in_executor(None, commit.make_dirs, self.storage, staged, dirs)
        futures, which = [], []
        g = -1
        for c, headers in zip(job.layout.components, job.layout.headers, strict=True):
            for i, (shard, header) in enumerate(zip(c.shards, headers, strict=True)):
                g += 1
                if owned is not None and g not in owned:
                    continue
                data = job.arena.view(shard.offset, shard.nbytes)
                path = staged.temp_dir / c.files.shard(i)
                futures.append(
                    loop.run_in_executor(
                        self._pool, self._write_one, job, staged.temp_dir, path, header, data, shard.offset
                    )
                )
                which.append(g)
        results = await asyncio.gather(*futures, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return {i: r for i, r in zip(which, results, strict=True) if isinstance(r, FileRecord)}

    def _write_one(  # noqa: PLR0917 - one shard's write, run in a writer thread
        self, job: Job, base: Path, path: Path, header: bytes, data: memoryview, offset: int
    ) -> FileRecord:
        nbytes = len(data)

        def ready(end: int) -> None:  # a streamed snapshot: wait for the client's copy
            if not job.complete:
                job.wait_ready(offset + end)

        def written(done: int) -> None:
            # After each chunk is written: the progress heartbeats and ``ckptd status`` report
            # moves with the bytes on disk, so a long shard on a slow disk is seen moving.
            job.note_written(offset, done)

        with data:
            record = commit.write_shard(
                self.storage,
                path,
                header,
                data,
                direct=self.options.direct_io,
                ready=ready,
                written=written,
                base=base,
            )
        job.note_written(offset, nbytes, finished=True)
        return record

    def _write_small_files(
        self,
        job: Job,
        staged: commit.StagedCheckpoint,
        components: list[ComponentRecord],
        part_records: list[PartRecord] | None = None,
    ) -> Manifest:
        """Indexes, small files and the manifest; of a multi-rank step, ``job`` is rank 0's part
        (its tree and files are the step's) and ``part_records`` name every rank's part."""
        req, st = job.request, self.storage
        files = [
            commit.write_file(st, staged.temp_dir / c.index, index, staged.temp_dir)
            for c, index in zip(components, job.layout.indexes, strict=True)
            if c.index is not None and index is not None
        ]
        # ``layout.small_file`` paths (checked): text ``files`` and bytes ``blobs``.
        small = {**{n: t.encode() for n, t in req.files.items()}, **req.blobs}
        for path, data in sorted(small.items()):
            files.append(commit.write_file(st, staged.temp_dir / path, data, staged.temp_dir))
        job.timings["write_s"] = round(time.monotonic() - job.started, 6)
        manifest = Manifest(
            format=PER_RANK_FORMAT if any(c.sharding == "per-rank" for c in components) else FORMAT,
            ckptd_version=__version__,
            run=req.run,
            step=req.step,
            rank=req.rank,
            world_size=req.world_size,
            created_unix=time.time(),
            bytes=sum(c.total_size for c in components),
            components=components,
            files=files,
            tree=req.tree,
            timings=job.timings,
            parts=part_records or [],
        )
        commit.seal(st, staged, manifest)
        return manifest


def _look_at_root(root: RootGuard) -> None:
    """Look whether the root is gone (``root.gone`` says); one that cannot be examined is not."""
    try:
        root.check()
    except RootGone:
        pass
    except OSError as e:
        log.warning("cannot examine the checkpoint root %s (%s); not taken as gone", root.root, e)


def _noop() -> None:
    pass


def _lower_priority(nice: int) -> None:
    """Make the calling writer thread yield the CPU to training processes (Linux schedules each
    thread by its own niceness). The event loop keeps the daemon's priority."""
    if nice:
        try:
            current = os.getpriority(os.PRIO_PROCESS, 0)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(current + nice, 19))
        except OSError as e:
            log.warning("could not lower the writer threads' priority (%s)", e)


_STAGES = (
    ("queued", "writing_s"),
    ("writing", "synced_s"),
    ("committing", "committed_s"),
    ("pruning", "pruned_s"),
)


def _stage_durations(timings: dict[str, float]) -> dict[str, float]:
    """Seconds spent in each stage, from the cumulative marks ``Job.mark`` records."""
    out, last = {}, 0.0
    for stage, mark in _STAGES:
        if mark in timings:
            out[stage] = timings[mark] - last
            last = timings[mark]
    return out


def _failure(snapshot_id: int, run: str, step: int, e: BaseException) -> Failed:
    where = f"step {step} of run {run!r}"
    if isinstance(e, OSError) and e.errno is not None:
        name = errno.errorcode.get(e.errno, str(e.errno))
        target = f" ({e.filename})" if e.filename else ""
        return Failed(
            id=snapshot_id,
            code="io_error",
            errno=e.errno,
            message=f"writing {where} failed: [{name}] {e.strerror}{target}; older checkpoints are intact",
        )
    if isinstance(e, RootGone):
        return Failed(id=snapshot_id, code="root_gone", message=f"{where} not taken: {e}")
    if isinstance(e, commit.AlreadyCommitted):
        return Failed(id=snapshot_id, code="already_committed", message=f"{e}")
    if isinstance(e, Abandoned):
        return Failed(id=snapshot_id, code="abandoned", message=f"{e}; discarded, nothing was committed")
    code = "commit_error" if isinstance(e, commit.CommitError) else "internal_error"
    return Failed(id=snapshot_id, code=code, message=f"{where}: {e}")
