"""The part of a multi-rank step that several daemons (one per node) write into one shared root:
aborting it on disk, coordinating its commit from the other daemons' part manifests, and watching
for the outcome another daemon decides (``ckptd/shared.py`` has the filesystem side). A mixin of
``MultiRank`` (``ckptd/daemon/multirank.py``). Event loop only, except what runs in executors."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd import commit, shared
from ckptd.daemon import sharded
from ckptd.daemon.parts import Group, Key, PartFailed
from ckptd.ranks import PartManifest, part_filename

if TYPE_CHECKING:
    from ckptd.daemon.pipeline import Pipeline

log = logging.getLogger(__name__)


class SharedSteps:
    """Steps whose parts several daemons write (``Group.nodes`` > 1)."""

    pipeline: Pipeline
    groups: dict[Key, Group]

    def _fail(self, group: Group, e: PartFailed) -> None:
        raise NotImplementedError

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        raise NotImplementedError

    def _release_tail(self, group: Group) -> None:
        raise NotImplementedError

    def _expire(self, group: Group, timeout_s: float) -> None:
        raise NotImplementedError

    async def _commit(self, group: Group, staged: commit.StagedCheckpoint) -> None:
        raise NotImplementedError

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
            if r in group.jobs or r in group.parts:
                continue  # written here (not stalled while this daemon runs), or read whole
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
