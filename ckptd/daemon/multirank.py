"""The pipeline's path for a rank's part of a multi-rank step (``ckptd/daemon/parts.py`` says how
the parts become one checkpoint). Event loop only, except what runs in executors."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd import commit, shared
from ckptd.daemon import sharded
from ckptd.daemon.parts import (
    FAILED_KEPT_S,
    Group,
    Key,
    PartFailed,
    component_records,
    failure_of,
    layout_digest,
    part_bytes,
    part_files,
    part_records,
    shard_count,
    shard_records,
    write_part,
)
from ckptd.manifest import FileRecord
from ckptd.protocol import Committed, Failed, Progress
from ckptd.ranks import PartManifest, PartRange, part_filename

if TYPE_CHECKING:
    from ckptd.daemon.pipeline import Job, Pipeline

log = logging.getLogger(__name__)
_JOB = re.compile(r"^[0-9a-f]{8,64}$")
#: The longest a daemon waits for a step's missing parts, whatever a client asks.
MAX_COMMIT_TIMEOUT_S = 24 * 3600.0


class MultiRank:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.groups: dict[Key, Group] = {}
        self.failed: dict[Key, PartFailed] = {}  # steps that failed lately, for late parts

    def submit(self, job: Job) -> None:
        req, pl = job.request, self.pipeline
        key = (req.run, req.step, req.job)
        if (
            not _JOB.match(req.job)
            or (req.owned is None) == (req.pieces is None)
            or req.commit_timeout_s <= 0
            or not 1 <= req.nodes <= req.world_size
        ):
            self._refuse(
                job,
                "a multi-rank part needs a job uid (hex), its owned shards or its pieces (one of "
                "them), commit_timeout_s > 0 and 1 <= nodes <= world_size",
            )
            return
        if key in self.failed:
            self._refuse(job, str(self.failed[key]), self.failed[key])
            return
        if pl.root is not None and pl.root.gone is not None:
            self._refuse(job, str(pl.root.gone_error()), code="root_gone")
            return
        group = self.groups.get(key) or self._new_group(job)
        problem = group.admit(job)
        if problem is not None:
            self._refuse(job, f"{group.where}: {problem}; nothing was committed")
            failure = PartFailed(f"{group.where}: {problem}; nothing was committed", "invalid_request")
            if group.nodes > 1:  # the other daemons learn it from the abort
                self._spawn(self._decide_and_fail(group, failure), f"abort {key}")
            else:
                self._fail(group, failure)
            return
        job.nbytes = part_bytes(job)
        job.stage_timeout_s = pl.options.stage_timeout_s
        group.jobs[req.rank] = job
        group.writing += 1
        pl._jobs[(req.run, req.step, req.rank)] = job
        job.arena.acquire()
        if len(group.jobs) == group.world_size and group.timer is not None:
            group.timer.cancel()
        self._spawn(self._run(group, job), f"snapshot {key} rank {req.rank}")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        pl = self.pipeline
        task = asyncio.create_task(coro, name=name)
        pl._tasks.add(task)
        task.add_done_callback(pl._tasks.discard)
        return task

    def _new_group(self, job: Job) -> Group:
        req, pl = job.request, self.pipeline
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        group = Group(
            run=req.run,
            step=req.step,
            job=req.job,
            world_size=req.world_size,
            digest=layout_digest(job.layout),
            shards=shard_count(job.layout),
            prev=pl._tails.get(req.run),
            done=done,
            outcome=loop.create_future(),
            sharded=req.pieces is not None,
            nodes=req.nodes,
            deadline_unix=time.time() + min(req.commit_timeout_s, MAX_COMMIT_TIMEOUT_S),
        )
        group.outcome.add_done_callback(lambda f: f.exception())  # retrieved even if no part awaits
        pl._tails[req.run] = done
        self.groups[group.key] = group
        timeout = min(req.commit_timeout_s, MAX_COMMIT_TIMEOUT_S)
        group.timer = loop.call_later(timeout, self._expire, group, timeout)
        return group

    def _refuse(
        self, job: Job, message: str, e: PartFailed | None = None, code: str = "invalid_request"
    ) -> None:
        job.finished = True
        failure = Failed(
            id=job.request.id,
            code=e.code if e is not None else code,
            message=message,
            errno=e.errno if e is not None else None,
        )
        self.pipeline.metrics.fail(failure.code)
        job.reply(failure)

    def _expire(self, group: Group, timeout_s: float) -> None:
        if group.nodes > 1:
            self._spawn(self._expire_shared(group, timeout_s), f"expire {group.key}")
            return
        missing = group.missing()
        if not missing or group.outcome.done():
            return
        self._fail(
            group,
            PartFailed(
                f"{group.where}: rank(s) {missing} did not hand over their part within "
                f"commit_timeout_s={timeout_s:g} s of the first (killed or stopped before their "
                "snapshot() returned?); nothing was committed, LATEST is unchanged",
                "parts_missing",
            ),
        )

    def _fail(self, group: Group, e: PartFailed) -> None:
        """The step cannot commit: every rank's handle fails with ``e`` (the first failure)."""
        if group.outcome.done():
            return
        log.error("[run=%s step=%s] %s", group.run, group.step, e)
        self.pipeline.metrics.fail(e.code)
        group.outcome.set_exception(e)
        if group.timer is not None:
            group.timer.cancel()
        self.failed[group.key] = e
        asyncio.get_running_loop().call_later(FAILED_KEPT_S, self.failed.pop, group.key, None)
        self._release_tail(group)  # nothing to commit: the run's next snapshot need not wait
        self._settle(group)

    def _release_tail(self, group: Group) -> None:
        if not group.done.done():
            group.done.set_result(None)
        if self.pipeline._tails.get(group.run) is group.done:
            del self.pipeline._tails[group.run]

    def _settle(self, group: Group) -> None:
        """A failed step whose parts have all stopped writing: its temp directory goes."""
        if group.writing or not group.outcome.done() or group.outcome.exception() is None:
            return
        if self.groups.get(group.key) is group:
            del self.groups[group.key]
        staging = group.staging
        if group.nodes > 1:  # aborted (renamed .failed): its data goes, FAILED.json a while later
            if staging is not None:
                self._spawn(self._clean_shared(group), f"clean {group.key}")
            return
        if staging is not None and staging.done() and staging.exception() is None:
            staged = staging.result()
            loop = asyncio.get_running_loop()
            loop.run_in_executor(None, commit.discard, self.pipeline.storage, staged)

    async def _staged(self, group: Group, job: Job) -> commit.StagedCheckpoint:
        if group.staging is None:
            loop = asyncio.get_running_loop()
            pl = self.pipeline
            storage, layout = pl.storage, job.layout
            info = shared.JobInfo(
                job=group.job,
                run=group.run,
                step=group.step,
                world_size=group.world_size,
                nodes=group.nodes,
                node=pl.options.node_id,
                deadline_unix=group.deadline_unix,
            )

            def stage() -> commit.StagedCheckpoint:
                # Made here, or joined (another node's daemon made it); with job.json for sweeps.
                pl._check_root()
                staged = shared.stage(storage, pl.options.root, info)
                if group.sharded:  # every consolidated file, with its header: create-or-open
                    sharded.create_files(storage, staged, layout, shared=group.nodes > 1)
                return staged

            group.staging = asyncio.ensure_future(loop.run_in_executor(None, stage))
        return await asyncio.shield(group.staging)

    async def _write_pieces(self, job: Job, staged: commit.StagedCheckpoint) -> list[PartRange]:
        """This part's pieces of a sharded step, one writer thread per shard file it writes."""
        pl, loop = self.pipeline, asyncio.get_running_loop()
        paths = sharded.shard_paths(job.layout)
        by_shard: dict[int, list[sharded.Piece]] = {}
        for p in job.request.pieces or []:
            by_shard.setdefault(p[0], []).append(p)

        def written(n: int) -> None:
            job.note_written(-1, n, finished=True)

        futures = [
            loop.run_in_executor(
                pl._pool,
                sharded.write_pieces,
                pl.storage,
                staged.temp_dir,
                paths[g][0],
                len(paths[g][1]),
                g,
                pieces,
                job.arena,
                written,
            )
            for g, pieces in sorted(by_shard.items())
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [x for r in results if isinstance(r, list) for x in r]

    async def _hash_files(self, group: Group, staged: commit.StagedCheckpoint) -> dict[int, FileRecord]:
        """Every consolidated file of a sharded step, read back and hashed once (all parts durable)."""
        pl, loop = self.pipeline, asyncio.get_running_loop()
        started = time.monotonic()
        paths = sharded.shard_paths(group.jobs[0].layout)
        records = await asyncio.gather(
            *(loop.run_in_executor(pl._pool, sharded.hash_file, staged.temp_dir, p) for p, _ in paths)
        )
        group.hash_s = time.monotonic() - started
        return dict(enumerate(records))

    async def _run(self, group: Group, job: Job) -> None:
        # accepted → writing → synced (part durable) → committed (all parts) → pruned
        req, pl = job.request, self.pipeline
        loop = asyncio.get_running_loop()
        try:
            try:
                staged = await self._staged(group, job)
                if group.nodes > 1:  # the other daemons see this part is being written
                    await loop.run_in_executor(None, shared.mark_writing, pl.storage, staged, req.rank)
                    self._keep_writing(group, staged)
                job.mark("writing")
                job.reply(Progress(id=req.id, stage="writing", bytes_written=0))
                ranges: list[PartRange] = []
                records: dict[int, FileRecord] = {}
                async with pl._budget.hold(job.nbytes):
                    if group.sharded:
                        ranges = await self._write_pieces(job, staged)
                    else:
                        records = await pl._write_shard_files(job, staged, set(req.owned or []))
                part = PartManifest(
                    run=req.run,
                    step=req.step,
                    job=req.job,
                    rank=req.rank,
                    world_size=req.world_size,
                    layout=group.digest,
                    files=part_files(records),
                    ranges=ranges,
                )
                sealed = await loop.run_in_executor(None, write_part, pl.storage, staged, part)
                if group.nodes > 1:
                    await loop.run_in_executor(None, shared.unmark_writing, pl.storage, staged, req.rank)
                job.mark("synced")
            except Exception as e:
                raise failure_of(req.rank, group.where, await pl._root_verdict(e)) from e
            group.parts[req.rank] = part
            group.sealed[req.rank] = sealed
            await self._sealed(group, staged, req.rank)
            self._reply_committed(group, job, await asyncio.shield(group.outcome))
        except PartFailed as e:
            await self._decide_and_fail(group, e)
            if group.outcome.done() and group.outcome.exception() is None:  # another daemon committed
                self._reply_committed(group, job, group.outcome.result())
                return
            first = group.outcome.exception()
            failure = first if isinstance(first, PartFailed) else e
            job.mark("failed")
            job.reply(Failed(id=req.id, code=failure.code, message=str(failure), errno=failure.errno))
        except Exception as e:  # every failure is reported to every rank, never swallowed
            log.exception("[run=%s step=%s] rank %s", req.run, req.step, req.rank)
            await self._decide_and_fail(group, failure_of(req.rank, group.where, e))
            job.mark("failed")
            job.reply(Failed(id=req.id, code="internal_error", message=f"{group.where}: {e}"))
        finally:
            job.finished = True
            group.writing -= 1
            pl._untrack(job)
            self._settle(group)

    async def _sealed(self, group: Group, staged: commit.StagedCheckpoint, rank: int) -> None:
        """A local part is durable: commit once every part is, or (several daemons) coordinate
        (rank 0's daemon) or watch for the outcome another daemon decides."""
        if group.outcome.done():
            return
        if group.nodes > 1:
            if rank == 0:  # this daemon coordinates: it reads the other daemons' parts
                await self._coordinate(group, staged)
            elif group.watcher is None:
                group.watcher = self._spawn(self._watch(group, staged, rank), f"watch {group.key}")
        elif len(group.parts) == group.world_size:
            await self._commit(group, staged)

    def _reply_committed(self, group: Group, job: Job, path: Path) -> None:
        req = job.request
        job.mark("committed")
        nbytes = group.nbytes if group.nbytes is not None else sum(p.bytes for p in group.parts.values())
        job.reply(
            Committed(
                id=req.id,
                run=req.run,
                step=req.step,
                path=str(path),
                bytes=nbytes,
                checksums=group.checksums,
                timings=job.timings,
            )
        )

    async def _commit(self, group: Group, staged: commit.StagedCheckpoint) -> None:
        """All parts are durable: commit the step once (the part that completed the group)."""
        pl, loop = self.pipeline, asyncio.get_running_loop()
        first = group.jobs[0]
        try:
            if group.prev is not None:
                await asyncio.shield(group.prev)  # commit in order within a run
            if group.sharded:  # each consolidated file, whole, once every part is durable
                files = await self._hash_files(group, staged)
            else:
                files = shard_records(group.parts)
            components = component_records(first.layout, files)
            records = part_records(group.parts, group.sealed)
            manifest = await loop.run_in_executor(
                None, pl._write_small_files, first, staged, components, records
            )
            path: Path = await loop.run_in_executor(None, pl._commit, staged)
        except Exception as e:
            e = await pl._root_verdict(e)
            await self._decide_and_fail(
                group,
                PartFailed(
                    f"{group.where}: the commit failed: {e}; nothing was committed",
                    "commit_error",
                    getattr(e, "errno", None),
                ),
            )
            return
        finally:
            self._release_tail(group)
        group.checksums = {s.file: s.xxh3_128 for c in manifest.components for s in c.shards}
        nbytes = sum(p.bytes for p in group.parts.values())
        pl.metrics.commit(nbytes, {"committing": time.monotonic() - group.started})
        log.info(
            "[run=%s step=%s] committed %s bytes from %s ranks (job %s%s) in %.3fs",
            group.run,
            group.step,
            nbytes,
            group.world_size,
            group.job,
            f", sharded, files hashed in {group.hash_s:.3f}s" if group.sharded else "",
            time.monotonic() - group.started,
        )
        if self.groups.get(group.key) is group:
            del self.groups[group.key]
        group.outcome.set_result(path)
        req0 = first.request  # the fewer of the snapshot's keep_last and --keep-last
        keep_last = commit.retained(req0.keep_last, pl.options.keep_last)
        if keep_last:
            try:
                await loop.run_in_executor(
                    None, commit.apply_retention, pl.storage, staged.run_dir, keep_last, path, req0.keep_steps
                )
            except OSError as e:
                log.warning("[run=%s step=%s] retention failed: %s", group.run, group.step, e)

    # --- several daemons, one shared root (ckptd/shared.py) ----------------------------------------

    def _shared_staged(self, group: Group) -> commit.StagedCheckpoint:
        return shared.staged_of(self.pipeline.options.root, group.run, group.step, group.job)

    async def _decide_and_fail(self, group: Group, e: PartFailed) -> None:
        """The step cannot commit because of ``e``. With several daemons, it is aborted on disk
        first (the rename of its temp directory decides): another daemon may have decided first,
        and every rank is told that outcome instead."""
        if group.outcome.done():
            return
        if group.nodes <= 1:
            self._fail(group, e)
            return
        pl, loop = self.pipeline, asyncio.get_running_loop()
        rank = min(group.jobs, default=0)
        try:
            o = await loop.run_in_executor(
                None,
                functools.partial(
                    shared.abort,
                    pl.storage,
                    self._shared_staged(group),
                    job=group.job,
                    rank=rank,
                    message=str(e),
                    code=e.code,
                    err=e.errno,
                    node=pl.options.node_id,
                    failed_rank=e.rank,
                ),
            )
        except OSError as err:
            log.warning("[run=%s step=%s] could not abort the step on disk: %s", group.run, group.step, err)
            self._fail(group, e)
            return
        self._resolve(group, o)

    def _resolve(self, group: Group, o: shared.Outcome) -> None:
        """The outcome found on disk (another daemon's commit or abort, or this one's abort)."""
        if group.outcome.done():
            return
        if o.path is None or o.manifest is None:
            self._fail(group, PartFailed(o.message, o.code or "part_failed", o.errno))
            return
        manifest = o.manifest
        group.checksums = {s.file: s.xxh3_128 for c in manifest.components for s in c.shards}
        group.nbytes = sum(p.bytes for p in manifest.parts)
        if group.timer is not None:
            group.timer.cancel()
        local = sum(p.bytes for p in group.parts.values())
        self.pipeline.metrics.commit(local, {"committing": time.monotonic() - group.started})
        log.info(
            "[run=%s step=%s] committed by the coordinator's daemon (job %s): %s bytes from this node",
            group.run,
            group.step,
            group.job,
            local,
        )
        if self.groups.get(group.key) is group:
            del self.groups[group.key]
        self._release_tail(group)
        group.outcome.set_result(o.path)

    def _keep_writing(self, group: Group, staged: commit.StagedCheckpoint) -> None:
        """Touch the markers of this daemon's parts being written, while any is (once per group)."""
        if group.touching:
            return
        group.touching = True

        async def touch() -> None:
            loop = asyncio.get_running_loop()
            while not group.outcome.done():
                ranks = [r for r in group.jobs if r not in group.parts]
                if not ranks and group.writing == 0:
                    break
                await loop.run_in_executor(None, shared.touch_writing, staged, ranks)
                await asyncio.sleep(shared.WRITING_TOUCH_S)
            group.touching = False

        self._spawn(touch(), f"touch {group.key}")

    async def _coordinate(self, group: Group, staged: commit.StagedCheckpoint) -> None:
        """Rank 0's daemon: read the other daemons' part manifests from ``T/parts`` as they are
        sealed (polled, 20 ms up to 250 ms apart), check them like local parts, then commit."""
        loop = asyncio.get_running_loop()
        delay = 0.02
        while not group.outcome.done():
            need = [r for r in range(group.world_size) if r not in group.parts]
            if not need:
                break
            try:
                found = await loop.run_in_executor(None, shared.read_parts, staged, need)
            except OSError as e:
                log.warning("[run=%s step=%s] cannot read the parts: %s", group.run, group.step, e)
                found = {}
            if found is None:  # T is gone: another daemon aborted the step (FAILED.json says why)
                o = await loop.run_in_executor(None, shared.outcome, staged, group.job, 0)
                if o is not None:
                    self._resolve(group, o)
                    return
                found = {}  # its FAILED.json is being written: look again
            for r, (part, record) in sorted(found.items()):
                problem = self._part_problem(group, r, part)
                if problem is not None:
                    await self._decide_and_fail(
                        group,
                        PartFailed(f"{group.where}: {problem}; nothing was committed", "invalid_request"),
                    )
                    return
                group.parts[r], group.sealed[r] = part, record
            if len(group.parts) < group.world_size:
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.25)
        if group.outcome.done():
            return
        problem = self._cover_problem(group)
        if problem is not None:
            await self._decide_and_fail(
                group, PartFailed(f"{group.where}: {problem}; nothing was committed", "invalid_request")
            )
            return

        async def lease() -> None:  # no sweep aborts a step whose coordinator is committing
            while not group.outcome.done():
                await loop.run_in_executor(None, shared.touch_lease, staged)
                await asyncio.sleep(shared.LEASE_S)

        leasing = self._spawn(lease(), f"lease {group.key}")
        try:
            await self._commit(group, staged)
        finally:
            leasing.cancel()

    def _part_problem(self, group: Group, rank: int, part: PartManifest) -> str | None:
        """Why another daemon's part manifest cannot be a part of this step, or None."""
        if (part.run, part.step, part.job, part.rank, part.world_size) != (
            group.run,
            group.step,
            group.job,
            rank,
            group.world_size,
        ):
            return (
                f"rank {rank}'s part manifest ({part_filename(rank)}) is of another step, job or world size"
            )
        if part.layout != group.digest:
            return (
                f"rank {rank} planned another layout than rank 0; every rank must snapshot the same tree "
                "(names, dtypes, shapes) with the same max_shard_size"
            )
        if (part.ranges and not group.sharded) or (part.files and group.sharded):
            return f"rank {rank} sent another kind of part (sharded or replicated) than rank 0"
        return None

    def _cover_problem(self, group: Group) -> str | None:
        """Whether the parts of every daemon make the layout exactly once (checked at commit)."""
        layout = group.jobs[0].layout
        if group.sharded:
            headers = [len(h) for _, h in sharded.shard_paths(layout)]
            pieces = {
                r: [(g.shard, g.offset - headers[g.shard], g.bytes, 0) for g in p.ranges]
                for r, p in group.parts.items()
            }
            if any(not 0 <= g.shard < len(headers) for p in group.parts.values() for g in p.ranges):
                return "a part names a shard that is not in the layout"
            problem = sharded.tile_problem(pieces, sharded.shard_sizes(layout))
            return None if problem is None else f"the ranks' slices do not tile the layout: {problem}"
        names = [path for path, _ in sharded.shard_paths(layout)]
        seen: dict[int, int] = {}
        for r, p in sorted(group.parts.items()):
            for f in p.files:
                if not 0 <= f.shard < len(names) or f.file != names[f.shard]:
                    return f"rank {r}'s part names a shard file {f.file!r} that is not the layout's"
                if f.shard in seen:
                    return f"ranks {seen[f.shard]} and {r} both wrote shard {f.shard}"
                seen[f.shard] = r
        if len(seen) != len(names):
            return f"the ranks' shards cover {len(seen)} of the layout's {len(names)}"
        return None

    async def _watch(self, group: Group, staged: commit.StagedCheckpoint, rank: int) -> None:
        """Not the coordinator: poll for the outcome (a committed step of this job, or a failed
        one) until it is decided; the same backoff as the coordinator's."""
        loop, delay = asyncio.get_running_loop(), 0.02
        while not group.outcome.done() and 0 not in group.jobs:
            try:
                o = await loop.run_in_executor(None, shared.outcome, staged, group.job, rank)
            except OSError as e:
                log.warning("[run=%s step=%s] cannot look at the step: %s", group.run, group.step, e)
                o = None
            if o is not None:
                self._resolve(group, o)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    async def _expire_shared(self, group: Group, timeout_s: float) -> None:
        """This daemon's commit timer fired: abort if a part is missing (never arrived in any
        daemon, or its daemon stopped writing it), or if every part is sealed and rank 0's daemon
        stopped committing; otherwise look again a little later."""
        if group.outcome.done():
            return
        loop = asyncio.get_running_loop()
        staged = self._shared_staged(group)
        try:
            seen = await loop.run_in_executor(None, shared.parts_seen, staged, group.world_size)
        except OSError as e:
            log.warning("[run=%s step=%s] cannot look at the parts: %s", group.run, group.step, e)
            seen = shared.PartsSeen(frozenset(), {}, None)
        if seen is None:  # decided: the coordinator or the watcher learns how
            if group.watcher is None and 0 not in group.jobs:
                o = await loop.run_in_executor(
                    None, shared.outcome, staged, group.job, min(group.jobs, default=0)
                )
                if o is not None:
                    self._resolve(group, o)
            return
        now = time.monotonic()
        sealed = seen.sealed | set(group.parts)
        stalled = []
        for r, mtime in seen.writing.items():
            if r in group.jobs:
                continue  # written here: not stalled while this daemon runs
            last = group.writing_seen.get(r)
            if last is None or last[0] != mtime:
                group.writing_seen[r] = (mtime, now)
            elif now - last[1] > shared.WRITING_STALE_S:
                stalled.append(r)
        never = [
            r
            for r in range(group.world_size)
            if r not in sealed and r not in seen.writing and r not in group.jobs
        ]
        if never or stalled:
            why = []
            if never:
                why.append(
                    f"rank(s) {never} did not hand over their part within commit_timeout_s={timeout_s:g} s "
                    "of the first (killed or stopped before their snapshot() returned?)"
                )
            if stalled:
                why.append(
                    f"rank(s) {stalled}'s daemon stopped writing its part (no sign of it for "
                    f"{shared.WRITING_STALE_S:g} s: killed, or its node lost?)"
                )
            await self._decide_and_fail(
                group,
                PartFailed(
                    f"{group.where}: {'; '.join(why)}; nothing was committed, LATEST is unchanged",
                    "parts_missing",
                ),
            )
            return
        if len(sealed) == group.world_size and 0 not in group.jobs and seen.lease_mtime is not None:
            last_lease = group.lease_seen
            if last_lease is None or last_lease[0] != seen.lease_mtime:
                group.lease_seen = (seen.lease_mtime, now)
            elif now - last_lease[1] > shared.LEASE_STALE_S:
                await self._decide_and_fail(
                    group,
                    PartFailed(
                        f"{group.where}: every part is durable but rank 0's daemon did not commit the "
                        f"step (no sign of it for {shared.LEASE_STALE_S:g} s: killed?); nothing was "
                        "committed, LATEST is unchanged",
                        "commit_error",
                    ),
                )
                return
        if len(sealed) < group.world_size or 0 not in group.jobs:
            group.timer = loop.call_later(shared.WRITING_TOUCH_S, self._expire, group, timeout_s)

    async def _clean_shared(self, group: Group) -> None:
        """A failed step of several daemons: its data goes now, its ``.failed`` directory (and
        FAILED.json, which the other daemons read) after ``FAILED_DIR_KEPT_S``."""
        pl, loop = self.pipeline, asyncio.get_running_loop()
        staged = self._shared_staged(group)

        def clean() -> Path | None:
            failed = shared.failed_dir(staged)
            if failed is None:
                return None
            if staged.temp_dir.is_dir() and not staged.temp_dir.is_symlink():
                commit.discard(pl.storage, staged)  # made again by a late part: it can never commit
            shared.clean_failed(pl.storage, failed)
            return failed

        failed = await loop.run_in_executor(None, clean)
        if failed is None:
            return

        def remove() -> None:  # not a task: a draining daemon does not wait for it
            with contextlib.suppress(RuntimeError):  # the executor is gone: the next sweep does it
                loop.run_in_executor(None, shared.remove_failed, pl.storage, failed)

        loop.call_later(shared.FAILED_DIR_KEPT_S, remove)
