"""Per-rank files: how a component of non-contiguous DTensors is stored, and read back whole.

A DTensor whose local shard is not one contiguous byte range of the full tensor (``Shard(1)``,
a 2-D mesh) cannot be written into a consolidated file by one ``pwrite`` per rank. Its component
is then stored as DCP's Hugging Face storage writer stores a sharded checkpoint: one safetensors
file per writing rank (``ckptd.layout.rank_files``), holding that rank's blocks (local tensors)
under the tensors' names, its header's ``__metadata__`` carrying
``DCP_SHARDING_INFO = json({name: {"saved_offsets": [...]}})``, so that torch's
``HuggingFaceStorageReader`` reshards the directory into any world size. A block held by several
ranks (replicas) is written by one of them. The whole tensor's shape is the largest extent of its
blocks, as that reader computes it; the blocks must tile it exactly once (checked when read).

``ckptd.load`` and ``ckptd export`` read such a component back into whole tensors (``assemble``);
a rank restoring into a DTensor reads only the blocks, and of each only the rows, its own slice
overlaps (``read_box``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ckptd import checksum
from ckptd.dtypes import numel
from ckptd.manifest import ComponentRecord, CorruptCheckpoint
from ckptd.shardfile import METADATA, HeaderEntry, ShardFormatError, decode_header

if TYPE_CHECKING:
    import torch

#: The header keys torch's ``HuggingFaceStorageWriter`` writes and its reader reads.
SHARDING_INFO_KEY = "DCP_SHARDING_INFO"
SAVED_OFFSETS_KEY = "saved_offsets"
DCP_VERSION_KEY = "DCP_VERSION"
DCP_VERSION = "1.0"


def sharding_metadata(blocks: Iterable[tuple[str, Sequence[int]]]) -> dict[str, str]:
    """A per-rank file's ``__metadata__``: ``format`` and each block's ``saved_offsets``."""
    info = {name: {SAVED_OFFSETS_KEY: list(offset)} for name, offset in blocks}
    return {
        **METADATA,
        SHARDING_INFO_KEY: json.dumps(info, separators=(",", ":")),
        DCP_VERSION_KEY: DCP_VERSION,
    }


@dataclass(frozen=True)
class Block:
    """One rank's block of a tensor: where its bytes are and where it sits in the whole."""

    path: Path
    data_start: int
    entry: HeaderEntry
    offset: tuple[int, ...]


def blocks(step_dir: Path, component: ComponentRecord) -> dict[str, list[Block]]:
    """Every tensor's blocks in a per-rank component's files, from their headers."""
    from ckptd import reading

    out: dict[str, list[Block]] = {}
    for record in component.shards:
        path = step_dir / record.file
        fd = reading._open_shard(path)
        try:
            size = os.fstat(fd).st_size
            header = decode_header(reading._read_header(fd, size), size, str(path))
        except ShardFormatError as e:
            raise CorruptCheckpoint(str(e)) from e
        except OSError as e:
            raise CorruptCheckpoint(f"{path}: cannot read shard ({e.strerror})") from e
        finally:
            os.close(fd)
        info = _offsets(path, header.metadata)
        for entry in header.entries:
            offset = info.get(entry.name)
            if offset is None or len(offset) != len(entry.shape):
                raise CorruptCheckpoint(
                    f"{path}: tensor {entry.name!r} has no saved_offsets of its {len(entry.shape)} "
                    f"dimensions in its {SHARDING_INFO_KEY}; the per-rank file is damaged"
                )
            out.setdefault(entry.name, []).append(Block(path, header.data_start, entry, offset))
    for name, found in out.items():
        check_tiling(step_dir, component.name, name, found)
    return out


def _offsets(path: Path, metadata: dict[str, str]) -> dict[str, tuple[int, ...]]:
    try:
        info = json.loads(metadata[SHARDING_INFO_KEY])
        return {
            str(k): tuple(int(i) for i in v[SAVED_OFFSETS_KEY])
            for k, v in info.items()
            if all(isinstance(i, int) and i >= 0 for i in v[SAVED_OFFSETS_KEY])
        }
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CorruptCheckpoint(
            f"{path}: a per-rank file without a readable {SHARDING_INFO_KEY} in its header ({e!r}); "
            "the file is damaged or not ckptd's"
        ) from e


def shape_of(found: Sequence[Block]) -> tuple[int, ...]:
    """The whole tensor's shape: the largest extent of its blocks (as DCP's reader has it)."""
    dims = len(found[0].entry.shape)
    return tuple(max(b.offset[d] + b.entry.shape[d] for b in found) for d in range(dims))


def check_tiling(step_dir: Path, component: str, name: str, found: Sequence[Block]) -> None:
    """Raise unless ``found`` covers its whole tensor exactly once (one dtype, no overlap)."""
    where = f"{step_dir}: tensor {component}/{name}"
    if len({(b.entry.dtype, len(b.entry.shape)) for b in found}) != 1:
        raise CorruptCheckpoint(f"{where}: its per-rank blocks differ in dtype or rank")
    shape = shape_of(found)
    if sum(numel(b.entry.shape) for b in found) != numel(shape):
        raise CorruptCheckpoint(f"{where}: its per-rank blocks do not cover its shape {list(shape)} once")
    solid = [b for b in found if numel(b.entry.shape)]
    for i, a in enumerate(solid):
        for b in solid[i + 1 :]:
            if all(
                a.offset[d] < b.offset[d] + b.entry.shape[d] and b.offset[d] < a.offset[d] + a.entry.shape[d]
                for d in range(len(shape))
            ):
                raise CorruptCheckpoint(
                    f"{where}: two per-rank blocks overlap ({a.path.name}, {b.path.name})"
                )


def assemble(step_dir: Path, component: ComponentRecord, *, verify: bool) -> dict[str, torch.Tensor]:
    """A per-rank component's tensors, whole; with ``verify`` every file is checked against its
    manifest checksum (one streamed read each) before any block is read."""
    from ckptd import reading

    if verify:
        problems = [p for r in component.shards for p in reading._check_file(step_dir, r, shard_file=True)]
        if problems:
            raise CorruptCheckpoint("; ".join(problems))
    out = {}
    for name, found in blocks(step_dir, component).items():
        shape = shape_of(found)
        out[name] = read_box(found, (0,) * len(shape), shape)
    return out


def read_box(found: Sequence[Block], start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """The box ``[start, start + size)`` of a tensor from its blocks: of each block only the rows
    (its first dimension) the box overlaps are read."""
    import torch

    from ckptd.torch_dtypes import FROM_SAFETENSORS

    entry0 = found[0].entry
    out = torch.empty(tuple(size), dtype=FROM_SAFETENSORS[entry0.dtype])
    if not out.numel():
        return out
    if not size:  # a 0-dim tensor: one block holds it
        return _rows(found[0], 0, 1).reshape(())
    for b in found:
        lo = [max(s, o) for s, o in zip(start, b.offset, strict=True)]
        hi = [min(s + n, o + m) for s, n, o, m in zip(start, size, b.offset, b.entry.shape, strict=True)]
        if any(h <= low for low, h in zip(lo, hi, strict=True)):
            continue
        part = _rows(b, lo[0] - b.offset[0], hi[0] - lo[0])
        for d in range(1, len(size)):
            part = part.narrow(d, lo[d] - b.offset[d], hi[d] - lo[d])
        dst = out
        for d in range(len(size)):
            dst = dst.narrow(d, lo[d] - start[d], hi[d] - lo[d])
        dst.copy_(part)
    return out


def _rows(b: Block, first: int, rows: int) -> torch.Tensor:
    """Rows ``[first, first + rows)`` of a block, read from its file (one contiguous range)."""
    import torch

    from ckptd import reading
    from ckptd.torch_dtypes import FROM_SAFETENSORS

    shape = b.entry.shape
    t = torch.empty((rows, *shape[1:]) if shape else (), dtype=FROM_SAFETENSORS[b.entry.dtype])
    row_bytes = (b.entry.end - b.entry.start) // shape[0] if shape and shape[0] else 0
    if t.numel():
        fd = reading._open_shard(b.path)
        try:
            raw = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
            reading._read_into(
                fd, raw, b.data_start + b.entry.start + first * row_bytes, checksum.new(), b.path
            )
        except OSError as e:
            raise CorruptCheckpoint(f"{b.path}: cannot read shard ({e.strerror})") from e
        finally:
            os.close(fd)
    return t
