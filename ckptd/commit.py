"""The commit protocol: how a checkpoint becomes visible, in one module. The order matters.

1. Everything is written into ``<root>/<run>/step-<N>.ckptd-tmp-<nonce>/`` (the ``model``
   component at its top, every other in its subdirectory: ``ckptd.layout``).
2. Every file is fsynced as it is finished; the component directories are fsynced; the manifest
   is written last; the step directory is fsynced.
3. The directory is renamed to ``<root>/<run>/step-<N>/`` and ``<root>/<run>/`` is fsynced.
4. ``LATEST`` is replaced (temp file, fsync, rename, fsync of the run directory).
5. Only then retention removes old steps, never the newest committed one nor ``LATEST``'s.

A failed fsync is never retried on the same file: the attempt fails and its temp directory is
removed. ``commit()`` is the single step a multi-rank coordinator calls once all parts are durable.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ckptd import checksum, paths, safeio
from ckptd.manifest import MANIFEST_NAME, FileRecord, Manifest
from ckptd.storage import DIRECT_ALIGN, Storage

log = logging.getLogger(__name__)
# Copy, hash and write in chunks small enough to stay in cache between the three and to hold the
# GIL (the copy into the buffer keeps it) only briefly; a direct write needs larger ones to keep
# several requests in flight. One page-aligned buffer per writer thread (`python -m
# bench.write_path` compares the modes).
_CHUNK_BYTES = 4 * 2**20
_DIRECT_CHUNK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class StagedCheckpoint:
    """A checkpoint being written: its temp directory and where it will be committed."""

    run_dir: Path
    step: int
    temp_dir: Path

    @property
    def final_dir(self) -> Path:
        return self.run_dir / paths.step_dirname(self.step)


class CommitError(RuntimeError):
    """The checkpoint could not be made visible; nothing partial was."""


class AlreadyCommitted(CommitError):
    """The step is already committed: refused before anything was written."""


def stage(storage: Storage, root: Path, run: str, step: int, *, nonce: str | None = None) -> StagedCheckpoint:
    """Make the temp directory of a step (``nonce`` names it: a multi-rank job's uid, or random)."""
    run_dir = root / paths.check_name("run", run)
    if run_dir.is_symlink():
        raise CommitError(f"{run_dir} is a symlink; ckptd writes only to real directories under its root")
    if not run_dir.is_dir():
        try:
            storage.mkdir(run_dir)
        except FileExistsError:
            pass
        storage.fsync_dir(root)
    nonce = secrets.token_hex(4) if nonce is None else nonce
    staged = StagedCheckpoint(run_dir, step, run_dir / paths.temp_dirname(step, nonce))
    found = safeio.lstat_kind(staged.final_dir)  # a link is not followed: it is what is there
    if found == "a directory":
        raise AlreadyCommitted(
            f"step {step} of run {run!r} is already committed at {staged.final_dir}; "
            "snapshot a new step or delete that directory"
        )
    if found is not None:
        raise CommitError(
            f"{staged.final_dir} exists and is not a checkpoint directory ({found}); remove it "
            f"to snapshot step {step} of run {run!r}"
        )
    storage.mkdir(staged.temp_dir)
    return staged


def make_dirs(storage: Storage, staged: StagedCheckpoint, dirs: list[str]) -> None:
    """Make the component directories (``layout.component_files(...).dir``) of a step being
    written (a multi-rank step's parts share them); ``seal`` fsyncs them once their files are
    durable."""
    for d in dirs:
        try:
            storage.mkdir(staged.temp_dir / d)
        except FileExistsError:  # another rank's part of the same step made it
            if safeio.lstat_kind(staged.temp_dir / d) != "a directory":
                raise


def write_file(storage: Storage, path: Path, data: bytes, base: Path | None = None) -> FileRecord:
    """Write a small file whole and fsync it; its record names it relative to ``base`` (the step
    directory; by default the file's own directory)."""
    fd = storage.create(path)
    try:
        storage.write_all(fd, data, 0)
        storage.fsync(fd)
    finally:
        storage.close(fd)
    name = path.relative_to(base).as_posix() if base is not None else path.name
    return FileRecord(file=name, bytes=len(data), xxh3_128=checksum.of_bytes(data))


def write_shard(
    storage: Storage,
    path: Path,
    header: bytes,
    data: memoryview,
    *,
    direct: bool = False,
    ready: Callable[[int], None] | None = None,
    written: Callable[[int], None] | None = None,
    base: Path | None = None,
) -> FileRecord:
    """Write header then data through this thread's chunk buffer and fsync.

    Each chunk is copied out of the shared arena and then hashed and written from that copy: a
    client that scribbles on its arena during the write can make the snapshot wrong, but never
    make its checksum disagree with its bytes. By default chunks go through the page cache and
    the kernel is asked to start writing each one back at once (write-behind), so the device is
    busy from the first chunk and the closing ``fsync`` has little left to do. With ``direct`` the
    file is written with ``O_DIRECT`` instead (the buffer is page-aligned and every chunk but the
    tail a multiple of ``DIRECT_ALIGN``): about half the CPU, no page cache, and on the
    development VM a slower device; where the filesystem refuses ``O_DIRECT`` the same loop
    writes buffered. ``ready(end)``, when given, is called before ``data[:end]`` is first read
    and blocks until the client has copied that far (a streamed snapshot). ``written(n)``, when
    given, is called after each chunk is written with the bytes of ``data`` written so far (the
    progress ``ckptd status`` shows moves with every chunk, not only per shard).
    The record names the file relative to ``base`` (the step directory; by default the file's
    own directory).
    """
    h = checksum.new()
    fd = storage.create(path)
    try:
        writer = _ChunkWriter(storage, fd, direct and storage.set_direct(fd, True))
        size = _DIRECT_CHUNK_BYTES if writer.direct else _CHUNK_BYTES
        buf = _chunk_buffer()[:size]
        fill = 0
        for src, wait in ((memoryview(header), None), (data, ready)):
            start = 0
            while start < len(src):
                n = min(len(src) - start, size - fill)
                if wait is not None:
                    wait(start + n)
                buf[fill : fill + n] = src[start : start + n]
                fill += n
                start += n
                if fill == size:
                    h.update(buf)
                    writer.write(buf)
                    fill = 0
                    if written is not None:
                        written(max(0, writer.offset - len(header)))
        tail = buf[:fill]
        h.update(tail)
        writer.write_last(tail)
        if written is not None:
            written(len(data))
        storage.fsync(fd)
        with contextlib.suppress(OSError):  # a hint: the shard is durable either way
            storage.drop_cache(fd)
    finally:
        storage.close(fd)
    name = path.relative_to(base).as_posix() if base is not None else path.name
    return FileRecord(file=name, bytes=writer.offset, xxh3_128=h.hexdigest())


class _ChunkWriter:
    """Appends chunks to a file: with ``O_DIRECT`` while it is on and the chunk is aligned,
    otherwise through the page cache with write-behind."""

    def __init__(self, storage: Storage, fd: int, direct: bool) -> None:
        self.storage, self.fd, self.direct, self.offset = storage, fd, direct, 0

    def write(self, chunk: memoryview) -> None:
        if self.direct:
            try:
                self.offset = self.storage.write_all(self.fd, chunk, self.offset)
                return
            except OSError as e:
                # A filesystem that accepted the flag but not this transfer: carry on buffered.
                if e.errno != errno.EINVAL:
                    raise
                self._buffered()
        start = self.offset
        self.offset = self.storage.write_all(self.fd, chunk, start)
        self.storage.start_writeback(self.fd, start, len(chunk))

    def write_last(self, chunk: memoryview) -> None:
        """The final chunk: its aligned part direct, the remainder through the page cache."""
        aligned = len(chunk) - len(chunk) % DIRECT_ALIGN
        if aligned:
            self.write(chunk[:aligned])
        if aligned < len(chunk):
            self._buffered()
            self.write(chunk[aligned:])

    def _buffered(self) -> None:
        if self.direct:
            if not self.storage.set_direct(self.fd, False):
                raise OSError(errno.EINVAL, "could not turn O_DIRECT off to write the file's unaligned tail")
            self.direct = False


_local = threading.local()


def _chunk_buffer() -> memoryview:
    """This writer thread's chunk buffer, made once; page-aligned, as ``O_DIRECT`` needs."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(mmap.mmap(-1, _DIRECT_CHUNK_BYTES, flags=mmap.MAP_PRIVATE))
    return buf


def seal(storage: Storage, staged: StagedCheckpoint, manifest: Manifest) -> None:
    """Fsync the component directories (their files are durable), write the manifest last and
    fsync the step directory. Every directory is made read-only first (its files are already,
    ``Storage.create``): a committed step is never written again; deleting one
    (``remove_steps``, ``discard``, ``sweep``) gives the owner write permission back."""
    for d in sorted({c.dir for c in manifest.components if c.dir}, reverse=True):
        storage.seal_dir(staged.temp_dir / d)
        storage.fsync_dir(staged.temp_dir / d)
    write_file(storage, staged.temp_dir / MANIFEST_NAME, manifest.to_bytes())
    storage.seal_dir(staged.temp_dir)
    storage.fsync_dir(staged.temp_dir)


def commit(storage: Storage, staged: StagedCheckpoint) -> Path:
    """Make a sealed checkpoint visible: rename, fsync the run directory, move ``LATEST``.

    Once the rename is durable the checkpoint is committed: ``LATEST`` is only a pointer (readers
    fall back to the highest intact step), so failing to move it is logged, not reported as a
    failed snapshot. ``LATEST`` only moves forward, to a higher step.
    """
    final = staged.final_dir
    if os.path.lexists(final):
        raise CommitError(f"{final} appeared while step {staged.step} was being written")
    storage.rename(staged.temp_dir, final)
    try:
        storage.fsync_dir(staged.run_dir)
    except OSError:
        # Not known to be durable: unpublish it (best effort), so the failed attempt is removed.
        with contextlib.suppress(OSError):
            storage.rename(final, staged.temp_dir)
            storage.fsync_dir(staged.run_dir)
        raise
    current = paths.read_latest(staged.run_dir)  # never follows a link nor blocks; None if not valid
    current_step = paths.parse_step_dirname(current) if current else None
    if current_step is not None and current_step > staged.step:
        log.warning("%s committed; LATEST stays at the higher %s", final, current)
        return final
    try:
        write_latest(storage, staged.run_dir, final.name)
    except OSError as e:
        log.error("%s is committed but LATEST could not be moved to it (%s)", final, e)
    return final


def write_latest(storage: Storage, run_dir: Path, name: str) -> None:
    tmp = run_dir / f"{paths.LATEST}{paths.TEMP_MARKER}{secrets.token_hex(4)}"
    try:
        write_file(storage, tmp, (name + "\n").encode())
        storage.rename(tmp, run_dir / paths.LATEST)
    except OSError:
        with contextlib.suppress(OSError):
            storage.unlink(tmp)
        raise
    storage.fsync_dir(run_dir)


def discard(storage: Storage, staged: StagedCheckpoint) -> None:
    """Remove a failed attempt's temp directory; never raises."""
    try:
        if staged.temp_dir.exists():
            storage.remove_tree(staged.temp_dir)
    except OSError as e:
        log.warning("could not remove %s (%s); the next daemon start sweeps it", staged.temp_dir, e)


def retained(requested: int | None, daemon: int) -> int:
    """How many steps retention keeps: the snapshot's ``keep_last`` (``save_total_limit``, ...)
    and the daemon's ``--keep-last`` (0: keep all), the fewer of both when both are set."""
    if requested is None or requested <= 0:
        return daemon
    return min(requested, daemon) if daemon > 0 else requested


def apply_retention(
    storage: Storage, run_dir: Path, keep_last: int, newest: Path, keep_steps: Iterable[int] = ()
) -> list[Path]:
    """Remove all but the ``keep_last`` highest steps; ``newest``, ``LATEST``'s and the steps of
    ``keep_steps`` (a Trainer's best) always survive.

    A step is renamed to a temp name before it is deleted, so a half-deleted directory never
    looks like a checkpoint.
    """
    if keep_last <= 0:
        return []
    steps = [p for _, p in paths.committed_steps(run_dir)]
    latest = paths.read_latest(run_dir)
    keep = set(steps[-keep_last:]) | {newest} | ({run_dir / latest} if latest else set())
    keep |= {run_dir / paths.step_dirname(s) for s in keep_steps}
    return remove_steps(storage, run_dir, [p for p in steps if p not in keep])


def remove_steps(storage: Storage, run_dir: Path, steps: list[Path]) -> list[Path]:
    """Delete these step directories of ``run_dir``; the ones removed (one already gone, by a
    concurrent prune, is skipped). Each is renamed to a temp name before it is deleted, so a
    half-deleted directory never looks like a checkpoint (the daemon's ``--keep-last``, ``ckptd
    prune`` and ``ckptd rm`` all delete through here)."""
    removed, doomed = [], []
    for p in steps:
        doomed.append(run_dir / f"{p.name}{paths.TEMP_MARKER}pruned-{secrets.token_hex(4)}")
        try:
            storage.rename(p, doomed[-1])
        except FileNotFoundError:
            doomed.pop()
            continue
        removed.append(p)
    if not removed:
        return []
    # The renames must be durable before any content goes, or a power cut could bring back a
    # half-emptied step under its committed name.
    storage.fsync_dir(run_dir)
    for d in doomed:
        storage.remove_tree(d)
    storage.fsync_dir(run_dir)
    return removed


def sweep(storage: Storage, root: Path) -> list[Path]:
    """Remove leftovers of interrupted writes (``*.ckptd-tmp-*``) under every run of ``root``."""
    swept = []
    for run_dir in root.iterdir() if root.is_dir() else []:
        if not run_dir.is_dir() or run_dir.is_symlink():
            continue
        for p in run_dir.iterdir():
            if paths.TEMP_MARKER in p.name:
                if p.is_dir() and not p.is_symlink():
                    storage.remove_tree(p)
                else:
                    storage.unlink(p)
                swept.append(p)
    return swept
