"""A multi-rank step: W parts, one from each rank of a job, committed once as one checkpoint.

Every rank's ``Snapshot`` names the job (drawn by its rank 0 at connect), its rank, the world
size and the shards it copied. The daemon groups the parts by (run, step, job):

1. The first part stages the step's temp directory, ``step-N.ckptd-tmp-<job>`` (one for all W).
2. Each part writes its shards there (each fsynced), then its part manifest
   ``parts/rank-0000r.json`` (fsynced with ``parts/``): the part is durable.
3. Once all W parts are durable and agree (step, job, world size, layout; the shards owned by the
   ranks cover the layout exactly once), the part that completed the group commits: the global
   indexes, rank 0's small files, ``ckptd.json`` (naming which rank wrote which file), rename,
   ``LATEST``, retention. ``Committed`` then goes to every rank.

Nothing here needs a live trainer: once a rank's request and arena are in the daemon its part is
written, and the commit follows the last part, whether or not any trainer is still there. A part
that fails fails every rank's snapshot, naming the rank and why; a part that does not arrive
within ``commit_timeout_s`` of the first fails them naming the ranks missing. Either way nothing
becomes visible and the temp directory is removed once no part is writing into it.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ckptd import checksum, commit, shared
from ckptd.daemon import sharded
from ckptd.daemon.layouts import PreparedLayout
from ckptd.manifest import ComponentRecord, FileRecord, PartRecord
from ckptd.ranks import PARTS_DIR, PartFile, PartManifest, part_filename
from ckptd.storage import Storage

if TYPE_CHECKING:
    from ckptd.daemon.pipeline import Job

log = logging.getLogger(__name__)
#: A failed step's outcome is kept this long after it failed, so that a rank whose part arrives
#: late gets that failure at once rather than waiting for a commit timeout of its own.
FAILED_KEPT_S = 600.0

Key = tuple[str, int, str]  # run, step, job


class PartFailed(RuntimeError):
    """A multi-rank step that cannot commit: one rank's part failed, or some never arrived."""

    def __init__(self, message: str, code: str, errno: int | None = None, rank: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.errno = errno
        self.rank = rank  # the rank whose part failed, when one did


def layout_digest(layout: PreparedLayout) -> str:
    """Equal on every rank that planned the same layout (headers and indexes as encoded)."""
    h = checksum.new()
    for headers in layout.headers:
        for header in headers:
            h.update(header)
    for index in layout.indexes:
        h.update(b"-" if index is None else index)  # a one-shard component has no index
    return h.hexdigest()


def shard_count(layout: PreparedLayout) -> int:
    return sum(len(c.shards) for c in layout.components)


def part_bytes(job: Job) -> int:
    """Bytes a rank's part writes: its owned shards, or its pieces."""
    req = job.request
    if req.pieces is not None:
        return sum(p[2] for p in req.pieces)
    return owned_bytes(job.layout, req.owned or [])


def owned_bytes(layout: PreparedLayout, owned: list[int]) -> int:
    sizes = [s.nbytes for c in layout.components for s in c.shards]
    return sum(sizes[i] for i in owned)


@dataclass
class Group:
    """The parts of one multi-rank step in this daemon (event loop only)."""

    run: str
    step: int
    job: str
    world_size: int
    digest: str
    shards: int
    prev: asyncio.Future[None] | None  # the run's previous snapshot: commits stay in order
    done: asyncio.Future[None]  # set once this step committed or failed
    outcome: asyncio.Future[Path]
    jobs: dict[int, Job] = field(default_factory=dict)
    parts: dict[int, PartManifest] = field(default_factory=dict)
    sealed: dict[int, FileRecord] = field(default_factory=dict)  # each part's manifest file
    checksums: dict[str, str] = field(default_factory=dict)  # of the committed shards
    staging: asyncio.Future[commit.StagedCheckpoint] | None = None
    writing: int = 0  # part tasks not finished
    timer: asyncio.TimerHandle | None = None
    started: float = field(default_factory=time.monotonic)
    hash_s: float = 0.0  # of a sharded step: reading its files back for their checksums
    sharded: bool = False  # parts send pieces of the consolidated files (ckptd/daemon/sharded.py)
    nodes: int = 1  # daemons writing the step's parts into one shared root (ckptd/shared.py)
    deadline_unix: float = 0.0  # the first part here + commit_timeout_s (wall clock, for sweeps)
    nbytes: int | None = None  # of every part, when another daemon committed (from its manifest)
    watcher: asyncio.Task[None] | None = None  # polls the outcome another daemon decides
    touching: bool = False  # a task touches the markers of the parts this daemon writes
    #: Of the parts other daemons write: the last mtime of each one's marker, and when it moved.
    writing_seen: dict[int, tuple[float, float]] = field(default_factory=dict)
    lease_seen: tuple[float, float] | None = None  # the same of job.json (the coordinator's lease)

    @property
    def key(self) -> Key:
        return (self.run, self.step, self.job)

    @property
    def where(self) -> str:
        return f"step {self.step} of run {self.run!r} (job {self.job}, {self.world_size} ranks)"

    def admit(self, job: Job) -> str | None:
        """Why ``job`` cannot be a part of this step, or None."""
        req = job.request
        owned = req.owned or []
        if req.world_size != self.world_size:
            return f"rank {req.rank} says world_size {req.world_size}, rank(s) before it {self.world_size}"
        if req.rank in self.jobs:
            return f"rank {req.rank} sent its part twice"
        if layout_digest(job.layout) != self.digest:
            return (
                f"rank {req.rank} planned another layout than the rank(s) before it; every rank must "
                "snapshot the same tree (names, dtypes, shapes) with the same max_shard_size"
            )
        if (req.pieces is not None) != self.sharded:
            return (
                f"rank {req.rank} sent a {'sharded' if req.pieces is not None else 'replicated'} part, "
                "the rank(s) before it the other kind; every rank must snapshot the same tree"
            )
        if self.sharded:
            return self._admit_pieces(job)
        if sorted(set(owned)) != owned or any(not 0 <= i < self.shards for i in owned):
            return f"rank {req.rank} names shards {owned[:8]} that are not ascending indexes of its layout"
        taken = {i for j in self.jobs.values() for i in j.request.owned or []}
        if taken & set(owned):
            return f"rank {req.rank} owns shards {sorted(taken & set(owned))[:8]} that another rank owns"
        if len(self.jobs) + 1 == self.world_size and len(taken) + len(owned) != self.shards:
            return f"the ranks' shards cover {len(taken) + len(owned)} of the layout's {self.shards}"
        return None

    def _admit_pieces(self, job: Job) -> str | None:
        """The last part of a sharded step: the ranks' pieces must tile every shard exactly once."""
        if len(self.jobs) + 1 < self.world_size:
            return None
        parts = {r: j.request.pieces or [] for r, j in self.jobs.items()}
        parts[job.request.rank] = job.request.pieces or []
        problem = sharded.tile_problem(parts, sharded.shard_sizes(job.layout))
        return None if problem is None else f"the ranks' slices do not tile the layout: {problem}"

    def missing(self) -> list[int]:
        return [r for r in range(self.world_size) if r not in self.jobs]


def failure_of(rank: int, where: str, e: BaseException) -> PartFailed:
    """A rank's own failure, as every rank of the step is told it."""
    if isinstance(e, PartFailed):
        return e
    if isinstance(e, shared.StepFailed):  # aborted by another daemon already: its reason
        o = e.outcome
        return PartFailed(o.message, o.code or "part_failed", o.errno)
    if isinstance(e, OSError) and e.errno is not None:
        name = errno_mod.errorcode.get(e.errno, str(e.errno))
        target = f" ({e.filename})" if e.filename else ""
        return PartFailed(
            f"{where}: rank {rank}'s part failed: [{name}] {e.strerror}{target}; nothing was "
            "committed, older checkpoints are intact",
            "io_error",
            e.errno,
            rank,
        )
    return PartFailed(
        f"{where}: rank {rank}'s part failed: {e}; nothing was committed", "part_failed", rank=rank
    )


def write_part(storage: Storage, staged: commit.StagedCheckpoint, part: PartManifest) -> FileRecord:
    """Seal one rank's part: its manifest, fsynced, and ``parts/`` fsynced (executor)."""
    parts_dir = staged.temp_dir / PARTS_DIR
    try:
        storage.mkdir(parts_dir)
    except FileExistsError:
        pass
    else:
        storage.fsync_dir(staged.temp_dir)
    record = commit.write_file(
        storage, parts_dir / part_filename(part.rank), part.model_dump_json(indent=1).encode()
    )
    storage.fsync_dir(parts_dir)
    return record


def part_files(records: dict[int, FileRecord]) -> list[PartFile]:
    return [
        PartFile(shard=i, file=r.file, bytes=r.bytes, xxh3_128=r.xxh3_128) for i, r in sorted(records.items())
    ]


def shard_records(parts: dict[int, PartManifest]) -> dict[int, FileRecord]:
    """Every shard's file record, joined from the parts (by global shard index)."""
    return {
        f.shard: FileRecord(file=f.file, bytes=f.bytes, xxh3_128=f.xxh3_128)
        for p in parts.values()
        for f in p.files
    }


def part_records(parts: dict[int, PartManifest], sealed: dict[int, FileRecord]) -> list[PartRecord]:
    return [
        PartRecord(
            rank=r,
            manifest=sealed[r],
            files=[f.file for f in p.files] + sorted({g.file for g in p.ranges}),
            bytes=p.bytes,
        )
        for r, p in sorted(parts.items())
    ]


def component_records(layout: PreparedLayout, records: dict[int, FileRecord]) -> list[ComponentRecord]:
    """The manifest's components, from every shard's record (by global index)."""
    out, g = [], 0
    for c in layout.components:
        shards = [records[g + i] for i in range(len(c.shards))]
        g += len(c.shards)
        out.append(
            ComponentRecord(
                name=c.name,
                dir=c.files.dir,
                index=c.files.index,
                shards=shards,
                tensors=sum(s.tensors for s in c.shards),
                total_size=sum(s.nbytes for s in c.shards),
                aliases=c.aliases,
                sharding="per-rank" if c.files.ranks else "consolidated",
            )
        )
    return out
