"""A sharded multi-rank step (FSDP2 ``Shard(0)`` DTensors): every rank's part writes its slices
straight into the step's consolidated files.

A ``Shard(0)`` slice of a tensor is one contiguous byte range of the full tensor, and so of the
shard file the layout (planned from the global shapes, the same on every rank) puts it in. So:

1. When the step's temp directory is staged (once, by the first part), every shard file of the
   layout is created with its header (fsynced with its directory): one writer of each header.
2. Each part ``pwrite``s its pieces (its slices, and the whole tensors it owns) at their offsets
   and fsyncs each file it wrote; its part manifest lists the ranges (``PartRange``).
3. Before any byte is written, the last part to arrive checks that the ranks' pieces tile every
   shard's data exactly once (``tile_problem``); a step that fails it fails on every rank.
4. At the commit, once every part is durable, each file is hashed once (read back, one file per
   writer thread): the manifest keeps whole-file checksums, so ``ckptd verify``, ``ckptd.load``
   and every reader check a sharded step exactly as any other.

The step directory is then a plain ``from_pretrained`` checkpoint, written in one parallel pass.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ckptd import checksum, commit
from ckptd.daemon.arenas import Arena
from ckptd.daemon.layouts import PreparedLayout
from ckptd.manifest import FileRecord
from ckptd.ranks import PartRange
from ckptd.safeio import open_regular
from ckptd.storage import Storage

Piece = tuple[int, int, int, int]  # global shard, start in its data, bytes, slot offset


def shard_sizes(layout: PreparedLayout) -> list[int]:
    return [s.nbytes for c in layout.components for s in c.shards]


def shard_paths(layout: PreparedLayout) -> list[tuple[str, bytes]]:
    """(path in the step directory, header) of every shard, by global index."""
    return [
        (c.files.shard(i), header)
        for c, headers in zip(layout.components, layout.headers, strict=True)
        for i, header in enumerate(headers)
    ]


def tile_problem(parts: Mapping[int, Sequence[Piece]], sizes: Sequence[int]) -> str | None:
    """Why the ranks' pieces do not cover every shard's data exactly once, or None."""
    by_shard: dict[int, list[tuple[int, int, int]]] = {}
    for rank, pieces in parts.items():
        for g, start, nbytes, _ in pieces:
            by_shard.setdefault(g, []).append((start, nbytes, rank))
    for g, size in enumerate(sizes):
        pos = 0
        for start, nbytes, rank in sorted(by_shard.get(g, [])):
            if start != pos:
                what = "overlaps" if start < pos else "leaves a gap before"
                return f"rank {rank}'s piece at byte {start} of shard {g} {what} byte {pos}"
            pos += nbytes
        if pos != size:
            return f"the ranks' pieces cover {pos} of shard {g}'s {size} bytes"
    return None


def create_files(
    storage: Storage, staged: commit.StagedCheckpoint, layout: PreparedLayout, *, shared: bool = False
) -> None:
    """Every shard file of the step with its header, durable (executor; once per step). With
    ``shared`` (several daemons write the step) each is create-or-open: a file another daemon
    made is left as it is (its header bytes are the same on every rank; never truncated)."""
    dirs = [c.files.dir for c in layout.components if c.files.dir]
    commit.make_dirs(storage, staged, dirs)
    for path, header in shard_paths(layout):
        try:
            fd = storage.create_shared(staged.temp_dir / path)
        except FileExistsError:
            if not shared:
                raise
            continue  # another node's daemon made it, and writes its header
        try:
            storage.write_all(fd, header, 0)
            storage.fsync(fd)
        finally:
            storage.close(fd)
    for d in {staged.temp_dir, *(staged.temp_dir / d for d in dirs)}:
        storage.fsync_dir(d)


def write_pieces(  # noqa: PLR0917 - one file's ranges of one part, in a writer thread
    storage: Storage,
    base: Path,
    path: str,
    header_bytes: int,
    shard: int,
    pieces: Sequence[Piece],
    arena: Arena,
    written: Callable[[int], None],
) -> list[PartRange]:
    """Write this part's ``pieces`` of one shard file at their offsets and fsync it."""
    fd = storage.open_write(base / path)
    ranges = []
    try:
        for _, start, nbytes, at in pieces:
            with arena.view(at, nbytes) as data:
                storage.write_all(fd, data, header_bytes + start)
            ranges.append(PartRange(shard=shard, file=path, offset=header_bytes + start, bytes=nbytes))
            written(nbytes)
        storage.fsync(fd)
    finally:
        storage.close(fd)
    return ranges


def seal_and_hash(storage: Storage, base: Path, path: str) -> FileRecord:
    """The record of one finished shard file (every part durable): made read-only, then read
    back and hashed once (executor)."""
    storage.seal_file(base / path)
    fd = open_regular(base / path)
    try:
        digest, size = checksum.of_fd(fd)
        with contextlib.suppress(OSError):  # a hint: it is durable, and not read again soon
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return FileRecord(file=path, bytes=size, xxh3_128=digest)
