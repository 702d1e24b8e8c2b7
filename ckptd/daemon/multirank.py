"""The pipeline's path for a rank's part of a multi-rank step (``ckptd/daemon/parts.py`` says how
the parts become one checkpoint). Event loop only, except what runs in executors."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd import commit, shared
from ckptd.daemon import sharded
from ckptd.daemon.multinode import SharedSteps
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
from ckptd.ranks import PartManifest, PartRange

if TYPE_CHECKING:
    from ckptd.daemon.pipeline import Job, Pipeline

log = logging.getLogger(__name__)
_JOB = re.compile(r"^[0-9a-f]{8,64}$")
#: The longest a daemon waits for a step's missing parts, whatever a client asks.
MAX_COMMIT_TIMEOUT_S = 24 * 3600.0


class MultiRank(SharedSteps):
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
            *(
                loop.run_in_executor(pl._pool, sharded.seal_and_hash, pl.storage, staged.temp_dir, p)
                for p, _ in paths
            )
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
        per_rank = [c.name for c in manifest.components if c.sharding == "per-rank"]
        if per_rank:  # which path each component took (non-contiguous DTensors: per-rank files)
            log.info(
                "[run=%s step=%s] per-rank files: %s; consolidated: %s",
                group.run,
                group.step,
                ", ".join(per_rank),
                ", ".join(c.name for c in manifest.components if c.sharding == "consolidated") or "none",
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
