"""A multi-rank step written by several daemons (one per node) into one shared root: what each
of them leaves in the step's temp directory, and how they agree on its outcome with no channel
but the filesystem.

The step's temp directory ``T = <run>/step-N.ckptd-tmp-<job>`` is made by whichever daemon comes
first; the others join it. The first writes ``T/parts/job.json`` (``JobInfo``: the job, its world
size and daemons, and a wall-clock deadline, for the sweeps of other daemons). Each daemon writes
its local ranks' parts and seals each with ``parts/rank-0000r.json``.

The rename of ``T`` is the decision, and exactly one rename of it can succeed:

- commit: the coordinator (the daemon holding rank 0's part), once it has read every part
  manifest, renames ``T`` to ``step-N``;
- abort: any daemon renames ``T`` to ``step-N.ckptd-tmp-<job>.failed.<rank>.<what>.<node>``
  (still a temp name; the name says why even where nothing more can be written: ENOSPC), then
  writes ``FAILED.json`` in it (code, message naming the rank and why) and removes the data.

A daemon that loses the race learns the outcome from what the rename left (``outcome``): a
``step-N`` whose parts are of this job is committed; a ``.failed`` one says why it failed; ``T``
gone with neither was abandoned by another node's daemon.

Everything here runs in executor threads (it blocks on the filesystem). On NFS a file another
node made may take the attribute-cache time (``acregmin``/``acdirmin``, a few seconds) to show.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from pydantic import BaseModel, ConfigDict, ValidationError

from ckptd import checksum, commit, nodes, paths, safeio
from ckptd.manifest import FileRecord, Manifest, ManifestError, read_manifest
from ckptd.ranks import PARTS_DIR, PartManifest, part_filename
from ckptd.storage import Storage

log = logging.getLogger(__name__)
JOB_FILE = "job.json"  # in ``parts/`` of the temp directory
FAILED_FILE = "FAILED.json"
FAILED_SUFFIX = ".failed"
#: A single-process temp directory names the node whose daemon writes it: ``node-<id>-<hex>``.
LOCAL_PREFIX = "node-"
#: How long past a job's deadline a sweep leaves its temp directory alone (clocks differ).
SWEEP_GRACE_S = 30.0
#: The coordinator touches ``job.json`` this often while it commits (its lease) ...
LEASE_S = 5.0
#: ... and a lease older than this is stale: no daemon is committing that step any more.
LEASE_STALE_S = 30.0
#: A daemon touches the marker of each part it is writing this often; a part whose marker has
#: not moved for ``WRITING_STALE_S`` (as the other daemons see it) is missing: its daemon died.
WRITING_TOUCH_S = 1.0
WRITING_STALE_S = 10.0
#: A ``.failed`` directory (only ``FAILED.json`` left in it) is removed this long after the abort,
#: once the other daemons of the job have had time to read why.
FAILED_DIR_KEPT_S = 60.0
#: Other temp entries (``LATEST`` being replaced, a directory just made) younger than this are
#: another node's work in progress, never swept.
IN_PROGRESS_S = 60.0
_JOB = re.compile(r"^[0-9a-f]{8,64}$")


class JobInfo(BaseModel):
    """``parts/job.json``: which job a temp directory is, for other daemons' sweeps."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    job: str
    run: str
    step: int
    world_size: int
    nodes: int  # daemons writing parts of the step
    node: str  # the daemon that made the directory
    deadline_unix: float  # its first part + commit_timeout_s


@dataclass(frozen=True)
class Outcome:
    """How a step ended, as the filesystem says: committed at ``path``, or failed."""

    path: Path | None = None
    manifest: Manifest | None = None
    message: str = ""
    code: str = ""
    errno: int | None = None


class StepFailed(RuntimeError):
    """The step was aborted (by this daemon or another); ``outcome`` says why."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.message)
        self.outcome = outcome


def local_nonce(node: str) -> str:
    """The nonce of a single-process temp directory written by ``node``'s daemon."""
    return f"{LOCAL_PREFIX}{node}-{secrets.token_hex(4)}"


def staged_of(root: Path, run: str, step: int, job: str) -> commit.StagedCheckpoint:
    run_dir = root / paths.check_name("run", run)
    return commit.StagedCheckpoint(run_dir, step, run_dir / paths.temp_dirname(step, job))


def failed_name(staged: commit.StagedCheckpoint, rank: int | None, what: str, node: str) -> str:
    """``<T>.failed.<rank>.<what>.<node>``: the abort's reason, in its name, for when not even
    ``FAILED.json`` can be written (ENOSPC); a rename needs no data blocks."""
    return f"{staged.temp_dir.name}{FAILED_SUFFIX}.{'x' if rank is None else rank}.{what}.{node or 'x'}"


def failed_dir(staged: commit.StagedCheckpoint) -> Path | None:
    """The step's ``.failed`` directory, if it was aborted."""
    prefix = staged.temp_dir.name + FAILED_SUFFIX + "."
    try:
        names = sorted(n for n in os.listdir(staged.run_dir) if n.startswith(prefix))
    except FileNotFoundError:
        return None
    found = [staged.run_dir / n for n in names if safeio.lstat_kind(staged.run_dir / n) == "a directory"]
    return found[0] if found else None


def stage(storage: Storage, root: Path, info: JobInfo) -> commit.StagedCheckpoint:
    """Make the step's temp directory, or join the one another daemon made (a real directory, not
    a link); the maker writes ``parts/job.json``. ``StepFailed`` when the step was aborted already."""
    staged = staged_of(root, info.run, info.step, info.job)
    failed = failed_dir(staged)
    if failed is not None:
        raise StepFailed(_read_failed(failed, info.step))
    try:
        staged = commit.stage(storage, root, info.run, info.step, nonce=info.job)
    except FileExistsError:
        if info.nodes <= 1 or safeio.lstat_kind(staged.temp_dir) != "a directory":
            raise
        return staged  # joined: another node's daemon made it
    parts_dir = staged.temp_dir / PARTS_DIR
    with contextlib.suppress(FileExistsError):  # a joiner's first part may have made it
        storage.mkdir(parts_dir)
    commit.write_file(storage, parts_dir / JOB_FILE, info.model_dump_json().encode())
    storage.fsync_dir(parts_dir)
    storage.fsync_dir(staged.temp_dir)
    return staged


def read_job(temp_dir: Path) -> JobInfo | None:
    try:
        fd = safeio.open_regular(temp_dir / PARTS_DIR / JOB_FILE, 64 * 1024)
    except OSError:
        return None
    try:
        return JobInfo.model_validate_json(os.read(fd, 64 * 1024))
    except (OSError, ValidationError):
        return None
    finally:
        os.close(fd)


def touch_lease(staged: commit.StagedCheckpoint) -> None:
    """The coordinator is committing: no sweep may abort the step for a while."""
    with contextlib.suppress(OSError):
        os.utime(staged.temp_dir / PARTS_DIR / JOB_FILE)


def activity_age_s(staged: commit.StagedCheckpoint) -> float | None:
    """Seconds since anything in ``T/parts`` last moved: the coordinator's lease, a part marker
    its daemon touches while writing, a part manifest sealed; None when there is nothing."""
    parts_dir = staged.temp_dir / PARTS_DIR
    try:
        entries = list(os.scandir(parts_dir))
    except OSError:
        return None
    mtimes = []
    for e in entries:
        with contextlib.suppress(OSError):
            mtimes.append(e.stat(follow_symlinks=False).st_mtime)
    return time.time() - max(mtimes) if mtimes else None


def read_parts(
    staged: commit.StagedCheckpoint, ranks: list[int]
) -> dict[int, tuple[PartManifest, FileRecord]] | None:
    """The sealed part manifests of ``ranks`` found in ``T/parts`` (one being written, not yet
    whole, is not found); None when ``T`` is gone (the step was decided)."""
    parts_dir = staged.temp_dir / PARTS_DIR
    try:
        names = set(os.listdir(parts_dir))
    except FileNotFoundError:
        return None if safeio.lstat_kind(staged.temp_dir) != "a directory" else {}
    found = {}
    for r in ranks:
        name = part_filename(r)
        if name not in names:
            continue
        try:
            fd = safeio.open_regular(parts_dir / name, 64 * 2**20)
        except FileNotFoundError:
            return None
        try:
            data = _read_all(fd)
        finally:
            os.close(fd)
        try:
            part = PartManifest.model_validate_json(data)
        except ValidationError:
            continue  # torn: still being written (the next poll reads it whole)
        found[r] = (part, FileRecord(file=name, bytes=len(data), xxh3_128=checksum.of_bytes(data)))
    return found


def writing_name(rank: int) -> str:
    """``rank-00003.writing``: the part of ``rank`` is in a daemon, being written (its daemon
    touches it every ``WRITING_TOUCH_S``; removed once the part is sealed)."""
    return part_filename(rank).removesuffix(".json") + ".writing"


def mark_writing(storage: Storage, staged: commit.StagedCheckpoint, rank: int) -> None:
    parts_dir = staged.temp_dir / PARTS_DIR
    with contextlib.suppress(FileExistsError):
        storage.mkdir(parts_dir)
    with contextlib.suppress(FileExistsError):
        storage.close(storage.create(parts_dir / writing_name(rank)))


def touch_writing(staged: commit.StagedCheckpoint, ranks: list[int]) -> None:
    for r in ranks:
        with contextlib.suppress(OSError):
            os.utime(staged.temp_dir / PARTS_DIR / writing_name(r))


def unmark_writing(storage: Storage, staged: commit.StagedCheckpoint, rank: int) -> None:
    with contextlib.suppress(OSError):
        storage.unlink(staged.temp_dir / PARTS_DIR / writing_name(rank))


@dataclass(frozen=True)
class PartsSeen:
    """What ``T/parts`` holds: the sealed ranks, and the mtimes of the parts being written."""

    sealed: frozenset[int]
    writing: dict[int, float]
    lease_mtime: float | None  # of job.json (the coordinator's lease while it commits)


def parts_seen(staged: commit.StagedCheckpoint, world_size: int) -> PartsSeen | None:
    """The parts of the step as ``T/parts`` shows them; None when ``T`` is gone."""
    parts_dir = staged.temp_dir / PARTS_DIR
    try:
        names = set(os.listdir(parts_dir))
    except FileNotFoundError:
        if safeio.lstat_kind(staged.temp_dir) != "a directory":
            return None
        names = set()
    writing = {}
    for r in range(world_size):  # the marker goes only once the manifest is durable: until then
        if writing_name(r) in names:  # a manifest beside it may be torn (its daemon died writing it)
            with contextlib.suppress(OSError):
                writing[r] = os.stat(parts_dir / writing_name(r)).st_mtime
    sealed = frozenset(r for r in range(world_size) if part_filename(r) in names and r not in writing)
    try:
        lease: float | None = os.stat(parts_dir / JOB_FILE).st_mtime
    except OSError:
        lease = None
    return PartsSeen(sealed, writing, lease)


def missing_parts(staged: commit.StagedCheckpoint, world_size: int) -> list[int] | None:
    """The ranks whose part manifest is not in ``T/parts``; None when ``T`` is gone."""
    seen = parts_seen(staged, world_size)
    return None if seen is None else [r for r in range(world_size) if r not in seen.sealed]


def outcome(staged: commit.StagedCheckpoint, job: str, rank: int) -> Outcome | None:
    """What became of the step of ``job`` (``rank`` is one of its parts); None while ``T`` is
    there (undecided)."""
    if safeio.lstat_kind(staged.temp_dir) == "a directory":
        return None
    final = staged.final_dir
    try:
        fd = safeio.open_regular(final / PARTS_DIR / part_filename(rank), 64 * 2**20)
        try:
            part = PartManifest.model_validate_json(_read_all(fd))
        finally:
            os.close(fd)
        if part.job == job:
            return Outcome(path=final, manifest=read_manifest(final))
    except (OSError, ValidationError, ManifestError):
        pass
    failed = failed_dir(staged)
    if failed is not None:
        found = _read_failed(failed, staged.step, complete=False)
        if found is not None:
            return found
        with contextlib.suppress(OSError):  # the aborter may be writing FAILED.json right now
            if time.time() - os.stat(failed).st_ctime < 2.0:
                return None
        return _read_failed(failed, staged.step)
    return _abandoned(staged.step)


def abort(
    storage: Storage,
    staged: commit.StagedCheckpoint,
    *,
    job: str,
    rank: int,
    message: str,
    code: str,
    err: int | None = None,
    node: str = "",
    failed_rank: int | None = None,
) -> Outcome:
    """Fail the step: rename ``T`` to its ``.failed`` name, say why in it, remove the data. When
    another daemon decided first, its outcome (a commit, or its failure) is returned instead."""
    what = errno_mod.errorcode.get(err, code) if err is not None else code
    failed = staged.run_dir / failed_name(staged, failed_rank, what, node)
    try:
        storage.rename(staged.temp_dir, failed)
    except FileNotFoundError:  # decided already: what did the rename leave?
        for _ in range(100):
            found = outcome(staged, job, rank)
            if found is not None:
                return found
            time.sleep(0.05)
        return _abandoned(staged.step)
    except OSError as e:
        if e.errno not in (errno_mod.ENOTEMPTY, errno_mod.EEXIST):
            raise
        # Aborted before, and this T was made again by a late part: it can never commit.
        with contextlib.suppress(OSError):
            storage.remove_tree(staged.temp_dir)
        return _read_failed(failed, staged.step)
    with contextlib.suppress(OSError):
        storage.fsync_dir(staged.run_dir)
    said = Outcome(message=message, code=code, errno=err)
    try:
        os.chmod(failed, 0o755)  # a sealed step being committed was read-only
        body = {"job": job, "step": staged.step, "code": code, "message": message, "errno": err, "node": node}
        commit.write_file(storage, failed / FAILED_FILE, json.dumps(body).encode())
        storage.fsync_dir(failed)
    except OSError as e:
        log.warning("could not say in %s why the step failed (%s)", failed, e)
    clean_failed(storage, failed)
    return said


def clean_failed(storage: Storage, failed: Path) -> None:
    """Remove a failed step's data, keeping ``FAILED.json``; never raises."""
    try:
        entries = list(os.scandir(failed))
    except OSError:
        return
    for e in entries:
        if e.name == FAILED_FILE:
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                storage.remove_tree(Path(e.path))
            else:
                storage.unlink(Path(e.path))
        except OSError as err:
            log.warning("could not remove %s (%s); a later sweep does", e.path, err)


def remove_failed(storage: Storage, failed: Path) -> None:
    """Remove a ``.failed`` directory whole (its job's daemons have read why); never raises."""
    with contextlib.suppress(OSError):
        if safeio.lstat_kind(failed) == "a directory":
            storage.remove_tree(failed)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


@overload
def _read_failed(failed: Path, step: int) -> Outcome: ...
@overload
def _read_failed(failed: Path, step: int, complete: bool) -> Outcome | None: ...
def _read_failed(failed: Path, step: int, complete: bool = True) -> Outcome | None:
    """Why the step failed: its ``FAILED.json``; without one (not written yet, or it could not
    be: no space), what the directory's name says (unless not ``complete``: then None)."""
    try:
        fd = safeio.open_regular(failed / FAILED_FILE, 1 << 20)
        try:
            raw = json.loads(_read_all(fd))
        finally:
            os.close(fd)
        return Outcome(
            message=str(raw["message"]),
            code=str(raw["code"]),
            errno=raw["errno"] if isinstance(raw.get("errno"), int) else None,
        )
    except (OSError, ValueError, KeyError, TypeError):
        if not complete:
            return None
    # The first ".failed.": the temp name before it never holds one, a node id after it may.
    rank, what, node = [*failed.name.partition(FAILED_SUFFIX + ".")[2].split(".", 2), "x", "x", "x"][:3]
    err = getattr(errno_mod, what, None) if what.startswith("E") else None
    who = f"rank {rank}'s part failed" if rank.isdigit() else "the step was aborted"
    return Outcome(
        message=f"step {step}: {who}: [{what}] on node {node!r} (its daemon could not say more in "
        f"{FAILED_FILE}: see its log); nothing was committed, older checkpoints are intact",
        code="io_error" if isinstance(err, int) else what,
        errno=err if isinstance(err, int) else None,
    )


def _abandoned(step: int) -> Outcome:
    return Outcome(
        message=f"step {step} was abandoned by another node's daemon (its temp directory is gone, "
        "neither committed nor failed); see that daemon's log; nothing was committed",
        code="abandoned",
    )


# --- start-up sweeps -------------------------------------------------------------------------------


def sweep(storage: Storage, root: Path, node: str) -> list[Path]:
    """Remove what interrupted writes left under ``root``. A root no other node's daemon serves
    is swept whole (``commit.sweep``). A shared one only of what can no longer be committed: this
    node's single-process temp directories, ``.failed`` and pruned leftovers, and a multi-rank
    temp directory once its job's deadline (and the grace) passed with no lease held; another
    node's work in progress is never touched."""
    try:  # by the lock files' names: one whose content cannot be read (torn, garbage) counts too
        others = {n.removesuffix(".lock") for n in os.listdir(root / nodes.NODES_DIR) if n.endswith(".lock")}
    except FileNotFoundError:
        others = set()
    others -= {node}
    if not others:
        return commit.sweep(storage, root)
    swept: list[Path] = []
    now = time.time()
    for run_dir in root.iterdir() if root.is_dir() else []:
        if not run_dir.is_dir() or run_dir.is_symlink():
            continue
        for p in run_dir.iterdir():
            if paths.TEMP_MARKER not in p.name:
                continue
            try:
                if _sweep_one(storage, run_dir, p, node, now):
                    swept.append(p)
            except OSError as e:
                log.warning("could not sweep %s (%s)", p, e)
    return swept


def _sweep_one(storage: Storage, run_dir: Path, p: Path, node: str, now: float) -> bool:
    prefix, _, nonce = p.name.partition(paths.TEMP_MARKER)
    kind = safeio.lstat_kind(p)
    if kind != "a directory":  # LATEST being replaced, a link: another node's, unless old
        if now - os.lstat(p).st_mtime < IN_PROGRESS_S:
            return False
        storage.unlink(p)
        return True
    step = paths.parse_step_dirname(prefix)
    if nonce.startswith(LOCAL_PREFIX):
        if nonce.rpartition("-")[0] != f"{LOCAL_PREFIX}{node}":  # node ids gpu, gpu-1: not a prefix
            return False  # another node's single-process snapshot (its daemon sweeps it)
    elif FAILED_SUFFIX + "." in nonce or nonce.startswith("pruned-"):
        pass
    elif _JOB.match(nonce) and step is not None:
        info = read_job(p)
        if info is None:
            if now - os.stat(p).st_ctime < IN_PROGRESS_S:
                return False  # just made: its job.json is on its way
        elif info.nodes <= 1:
            if info.node != node:
                return False  # another node's one-daemon job
        else:
            staged = commit.StagedCheckpoint(run_dir, step, p)
            # A part may be written long past the deadline (which bounds its arrival): whatever
            # moved in parts/ lately (a lease, a marker, a seal) says a daemon still works on it.
            lease = activity_age_s(staged)
            if now < info.deadline_unix + SWEEP_GRACE_S or (lease is not None and lease < LEASE_STALE_S):
                return False
            missing = missing_parts(staged, info.world_size) or []
            abort(
                storage,
                staged,
                job=info.job,
                rank=0,
                message=f"step {step} of run {info.run!r} (job {info.job}, {info.world_size} ranks): "
                f"swept by node {node!r}'s daemon at start-up, past its deadline with rank(s) {missing[:8]} "
                "missing and no daemon committing it; nothing was committed",
                code="parts_missing",
                node=node,
            )
            failed = failed_dir(staged)
            if failed is not None:
                remove_failed(storage, failed)
            return True
    elif now - os.stat(p).st_ctime < IN_PROGRESS_S:
        return False
    storage.remove_tree(p)
    return True
