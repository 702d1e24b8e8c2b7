"""The per-signature work of a snapshot, done once and cached: layout, request parts, offsets.

While the tree's signature (component and tensor names, dtypes, shapes, aliases, shard size) is
unchanged, a snapshot reuses the layout (registered once per connection with the daemon, which
prepares its headers and index once), each tensor's offset and size in the arena and, for
device copies, per arena the tensor views it copies into.
"""

from __future__ import annotations

import dataclasses
import itertools
from array import array
from dataclasses import dataclass
from typing import Any, cast

import torch

from ckptd import layout as layout_mod
from ckptd import ranks as ranks_mod
from ckptd.protocol import encode_layout
from ckptd.torch_dtypes import FROM_SAFETENSORS, safetensors_dtype
from client import blocks as blocks_mod
from client.arena import Arena
from client.tree import Flat

_layout_ids = itertools.count(1)


#: Host tensors up to this size are copied with one ``memmove`` each (the GIL held: a few
#: microseconds); larger ones by torch, which may split a copy across threads.
RAW_COPY_MAX = 1 << 20
#: Dtypes whose tensors may carry a lazy conjugate bit: always copied by torch.
_LAZY_BITS = frozenset({"C64"})
#: A host snapshot of more than one batch is streamed: the daemon is told after each batch of
#: tensors (in slot order) how far the copy has got, and writes what is copied meanwhile.
STREAM_BATCH_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Plan:
    layout: layout_mod.Layout
    register_frames: bytes  # its RegisterLayout frame(s), encoded once
    # Per placement, in slot order (compact arrays: 20,000 tensors cost 0.5 MB, not 4):
    comps: array[int]  # its component's index in the Flat
    tensors: array[int]  # its tensor's index in that component
    layout_id: int  # unique in this process: the id it is registered under with a daemon
    offsets: array[int]  # arena offset of each placement
    sizes: array[int]  # bytes of each placement
    raw: tuple[bool, ...]  # whether a contiguous host source may be copied with a plain memmove
    specs: tuple[layout_mod.TensorSpec, ...]  # of each placement
    #: (first placement, placement after the last, slot bytes copied after it), in slot order
    batches: tuple[tuple[int, int, int], ...]
    #: Of a rank's part of a sharded snapshot (``Shard(0)`` DTensors): the byte ranges it copies
    #: and its daemon writes, ``(global shard index, start in the shard's data, bytes, slot
    #: offset)``, and its placements as ``(first, after last)`` ranges. The slot then holds only
    #: these bytes, back to back (``layout.slot_bytes`` is their total, not the layout's).
    pieces: tuple[tuple[int, int, int, int], ...] | None = None
    mine: tuple[tuple[int, int], ...] = ()


def signature(flat: Flat, max_shard_size: int) -> tuple[object, ...]:
    # torch.Size is a tuple: hashed and compared as one, no copy needed.
    return (
        max_shard_size,
        tuple(
            (
                c.name,
                [(n, t.dtype, t.shape) for n, t in c.tensors],
                tuple(c.aliases.items()),
                tuple(c.shards.items()),
                tuple(c.blocks.items()),
            )
            for c in flat.components
        ),
    )


def make_plan(flat: Flat, max_shard_size: int, part: tuple[int, int] | None = None) -> Plan:
    """The plan of ``flat``; ``part`` (rank, world size) for a rank of a sharded snapshot: the
    layout is planned from the global shapes (the same on every rank), the slot from its slices."""
    specs = [
        (
            c.name,
            [
                layout_mod.TensorSpec(
                    n, safetensors_dtype(t.dtype, n), c.shards[n][0] if n in c.shards else tuple(t.shape)
                )
                for n, t in c.tensors
            ],
        )
        for c in flat.components
    ]
    ranked = None
    if any(c.blocks for c in flat.components):  # non-contiguous DTensors: stored per rank
        ranked = {
            c.name: blocks_mod.ranked_specs(c, part[1] if part else 1) for c in flat.components if c.blocks
        }
    lay = layout_mod.plan(specs, max_shard_size, ranked)
    positions = [{n: i for i, (n, _) in enumerate(c.tensors)} for c in flat.components]
    comps = array("q", (ci for ci, comp in enumerate(lay.components) for s in comp.shards for _ in s.tensors))
    indices = array(
        "q",
        (
            positions[ci][p.spec.name]
            for ci, comp in enumerate(lay.components)
            for s in comp.shards
            for p in s.tensors
        ),
    )
    # The wire form of ``list[ComponentEntry]``, built as plain JSON: 20,000 pydantic models
    # would cost the trainer tens of MB at their peak (the daemon validates the frame strictly).
    entries = [
        {
            "name": comp.name,
            "shards": [
                {
                    "offset": shard.offset,
                    "nbytes": shard.nbytes,
                    "tensors": [
                        {
                            "name": p.spec.name,
                            "dtype": p.spec.dtype,
                            "shape": p.spec.shape,
                            "start": p.start,
                            "end": p.end,
                        }
                        for p in shard.tensors
                    ],
                }
                for shard in comp.shards
            ],
            "aliases": flat.components[ci].aliases,
            "pretrained": flat.components[ci].pretrained,
            "parameters": flat.components[ci].parameters,
        }
        for ci, comp in enumerate(lay.components)
    ]
    for entry, comp in zip(entries, lay.components, strict=True):
        wire = cast("list[dict[str, Any]]", entry["shards"])
        for shard, rank, offsets in zip(wire, comp.ranks, comp.offsets, strict=False):
            shard["rank"] = rank  # a per-rank file: its rank and each block's global offset
            for t, offset in zip(shard["tensors"], offsets, strict=True):
                t["offset"] = list(offset)
    placements = [(s.offset, p) for comp in lay.components for s in comp.shards for p in s.tensors]
    layout_id = next(_layout_ids)
    if flat.sharded and (part is not None or not _whole(flat)):
        if part is None:
            raise ValueError(
                "this snapshot holds sharded DTensors (FSDP2): connect the client under torchrun "
                "(every rank calls ckptd.connect() after init_process_group), not with "
                "process_group=False"
            )
        return _sharded_plan(flat, lay, encode_layout(layout_id, entries), comps, indices, layout_id, part)
    return Plan(
        lay,
        encode_layout(layout_id, entries),  # ProtocolError if too large for the wire
        comps,
        indices,
        layout_id,
        offsets=array("q", (base + p.start for base, p in placements)),
        sizes=array("q", (p.end - p.start for _, p in placements)),
        raw=tuple(
            0 < p.end - p.start <= RAW_COPY_MAX and p.spec.dtype not in _LAZY_BITS for _, p in placements
        ),
        specs=tuple(p.spec for _, p in placements),
        batches=_batches([base + p.end for base, p in placements], [p.end - p.start for _, p in placements]),
    )


def _sharded_plan(  # noqa: PLR0917 - the parts of a plan, made once per signature
    flat: Flat,
    lay: layout_mod.Layout,
    frames: bytes,
    comps: array[int],
    indices: array[int],
    layout_id: int,
    part: tuple[int, int],
) -> Plan:
    """A rank's plan of a sharded snapshot: each ``Shard(0)`` slice is the byte range
    ``[offset[0] * row bytes, + local bytes)`` of its tensor; a tensor every rank holds whole is
    written by one owner (``ckptd.ranks.assign_shards`` over those tensors: the same on every
    rank); the slot holds this rank's ranges back to back, each 64-byte aligned."""
    rank, world = part
    whole: list[int] = []  # placements every rank holds whole
    placed: list[tuple[int, layout_mod.TensorPlacement, tuple[tuple[int, ...], tuple[int, ...]] | None]] = []
    g = -1
    ranked: dict[int, bool] = {}  # placements of per-rank files: whether this rank's
    for ci, comp in enumerate(lay.components):
        for si, shard in enumerate(comp.shards):
            g += 1
            for p in shard.tensors:
                sharded = flat.components[ci].shards.get(p.spec.name)
                if comp.ranks:
                    ranked[len(placed)] = comp.ranks[si] == rank
                elif sharded is None:
                    whole.append(len(placed))
                placed.append((g, p, sharded))
    owners = ranks_mod.assign_shards([placed[i][1].end - placed[i][1].start for i in whole], world)
    mine_whole = {i for i, r in zip(whole, owners, strict=True) if r == rank}
    pieces, specs, offsets, sizes = [], [], array("q"), array("q")
    mine: list[tuple[int, int]] = []
    pos = 0
    for i, (g, p, sharded) in enumerate(placed):
        t = flat.components[comps[i]].tensors[indices[i]][1]
        nbytes = t.numel() * t.element_size()
        start = p.start
        if sharded is not None:
            shape, offset = sharded
            row = (p.end - p.start) // shape[0] if shape and shape[0] else 0
            start += offset[0] * row if offset else 0
            take = nbytes > 0
        elif i in ranked:
            take = ranked[i] and nbytes > 0
            if ranked[i] and tuple(t.shape) != p.spec.shape:
                raise ValueError(
                    f"tensor {p.spec.name}: this rank's block has shape {tuple(t.shape)}, its plan "
                    f"{p.spec.shape}; every rank must snapshot the same model"
                )
        else:
            take = i in mine_whole and nbytes > 0
        # A placement another rank writes is an empty view here (the device copy makes them all).
        specs.append(layout_mod.TensorSpec(p.spec.name, p.spec.dtype, tuple(t.shape) if take else (0,)))
        if not take:
            offsets.append(0)
            sizes.append(0)
            continue
        pieces.append((g, start, nbytes, pos))
        offsets.append(pos)
        sizes.append(nbytes)
        if mine and mine[-1][1] == i:  # one range per run of placements: one copy call each
            mine[-1] = (mine[-1][0], i + 1)
        else:
            mine.append((i, i + 1))
        pos = (pos + nbytes + 63) // 64 * 64
    return Plan(
        dataclasses.replace(lay, slot_bytes=layout_mod.round_up(max(pos, 1))),
        frames,
        comps,
        indices,
        layout_id,
        offsets=offsets,
        sizes=sizes,
        raw=tuple(
            0 < n <= RAW_COPY_MAX and s.dtype not in _LAZY_BITS for n, s in zip(sizes, specs, strict=True)
        ),
        specs=tuple(specs),
        batches=((0, len(specs), pos),),
        pieces=tuple(pieces),
        mine=tuple(mine),
    )


def _whole(flat: Flat) -> bool:
    """Whether every DTensor slice of ``flat`` is its whole tensor (a mesh of one device, in a
    world of one process): planned and copied as plain tensors."""
    for c in flat.components:
        if c.shards:
            shapes = {n: tuple(t.shape) for n, t in c.tensors}
            for n, (shape, offset) in c.shards.items():
                if any(offset) or shapes.get(n, shape) != shape:
                    return False
    return True


def _batches(ends: list[int], sizes: list[int]) -> tuple[tuple[int, int, int], ...]:
    """Consecutive placements of about ``STREAM_BATCH_BYTES`` each (a larger tensor alone)."""
    out, start, nbytes = [], 0, 0
    for i, size in enumerate(sizes):
        nbytes += size
        if nbytes >= STREAM_BATCH_BYTES or i == len(sizes) - 1:
            out.append((start, i + 1, ends[i]))
            start, nbytes = i + 1, 0
    return tuple(out)


def view(arena: Arena, plan: Plan, i: int) -> torch.Tensor:
    """Placement ``i`` of ``plan`` (layout order) as a tensor into ``arena``."""
    spec, start = plan.specs[i], plan.offsets[i]
    return arena.bytes[start : start + plan.sizes[i]].view(FROM_SAFETENSORS[spec.dtype]).view(spec.shape)


def copy_pairs(arena: Arena, plan: Plan, flat: Flat) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination view in the arena, source tensor) for every stored tensor, for device copies;
    the views are made once per arena and plan."""
    if arena.views_key is not plan:
        arena.views = [view(arena, plan, i) for i in range(len(plan.comps))]
        arena.views_key = plan
    tensors = [c.tensors for c in flat.components]
    return [
        (dst, tensors[ci][ti][1]) for dst, ci, ti in zip(arena.views, plan.comps, plan.tensors, strict=True)
    ]
