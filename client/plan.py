"""The per-signature work of a snapshot, done once and cached: layout, request parts, views.

While the tree's signature (component and tensor names, dtypes, shapes, aliases, shard size) is
unchanged, a snapshot reuses the layout (registered once per connection with the daemon, which
prepares its headers and index once) and, per arena, the tensor views it copies into.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from pydantic import TypeAdapter

from ckptd import layout as layout_mod
from ckptd.protocol import ComponentEntry, ShardEntry, TensorEntry
from ckptd.torch_dtypes import FROM_SAFETENSORS, safetensors_dtype
from client.arena import Arena
from client.tree import Flat

_entries_json: TypeAdapter[list[ComponentEntry]] = TypeAdapter(list[ComponentEntry])


_layout_ids = itertools.count(1)


@dataclass(frozen=True)
class Plan:
    layout: layout_mod.Layout
    components_json: bytes  # the layout's "components", serialized once
    order: tuple[tuple[int, int], ...]  # (component, tensor) index of each placement, layout order
    layout_id: int  # unique in this process: the id it is registered under with a daemon


def signature(flat: Flat, max_shard_size: int) -> tuple[object, ...]:
    # torch.Size is a tuple: hashed and compared as one, no copy needed.
    return (
        max_shard_size,
        tuple(
            (c.name, [(n, t.dtype, t.shape) for n, t in c.tensors], tuple(c.aliases.items()))
            for c in flat.components
        ),
    )


def make_plan(flat: Flat, max_shard_size: int) -> Plan:
    specs = [
        (
            c.name,
            [layout_mod.TensorSpec(n, safetensors_dtype(t.dtype, n), tuple(t.shape)) for n, t in c.tensors],
        )
        for c in flat.components
    ]
    lay = layout_mod.plan(specs, max_shard_size)
    positions = [{n: i for i, (n, _) in enumerate(c.tensors)} for c in flat.components]
    order = tuple(
        (ci, positions[ci][p.spec.name])
        for ci, comp in enumerate(lay.components)
        for shard in comp.shards
        for p in shard.tensors
    )
    entries = [
        ComponentEntry(
            name=comp.name,
            shards=[
                ShardEntry(
                    offset=shard.offset,
                    nbytes=shard.nbytes,
                    tensors=[
                        TensorEntry(
                            name=p.spec.name,
                            dtype=p.spec.dtype,
                            shape=list(p.spec.shape),
                            start=p.start,
                            end=p.end,
                        )
                        for p in shard.tensors
                    ],
                )
                for shard in comp.shards
            ],
            aliases=flat.components[ci].aliases,
        )
        for ci, comp in enumerate(lay.components)
    ]
    return Plan(lay, _entries_json.dump_json(entries), order, next(_layout_ids))


def copy_pairs(arena: Arena, plan: Plan, flat: Flat) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination view in the arena, source tensor) for every stored tensor."""
    if arena.views_key is not plan:
        arena.views = [
            arena.bytes[shard.offset + p.start : shard.offset + p.end]
            .view(FROM_SAFETENSORS[p.spec.dtype])
            .view(p.spec.shape)
            for comp in plan.layout.components
            for shard in comp.shards
            for p in shard.tensors
        ]
        arena.views_key = plan
    tensors = [c.tensors for c in flat.components]
    return [(dst, tensors[ci][ti][1]) for dst, (ci, ti) in zip(arena.views, plan.order, strict=True)]
