"""A layout's entries as plain tuples, the form the daemon holds and checks them in.

A decoded ``ComponentEntry`` is a tree of pydantic models: several objects per tensor that the
cyclic garbage collector tracks, so that a full collection over a held 700,000-tensor layout
stalled the event loop for a second. A tuple of strings and ints is untracked by the collector
(from its first young collection on): a layout held as rows costs a full collection nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from ckptd.layout import ComponentFiles
from ckptd.protocol import ComponentEntry, TensorEntry

#: A tensor: name, dtype, shape, start and end (relative to its shard's data section). A plain
#: tuple: the collector untracks only exact tuples, not ``NamedTuple`` instances.
TensorRow = tuple[str, str, tuple[int, ...], int, int]


class ShardRows(NamedTuple):
    offset: int
    nbytes: int
    tensors: list[TensorRow]
    rank: int | None = None  # of a per-rank file: its rank, and each tensor's global offset
    offsets: list[tuple[int, ...] | None] | None = None


class ComponentRows(NamedTuple):
    name: str
    shards: list[ShardRows]
    aliases: dict[str, str]
    pretrained: bool = False
    parameters: int | None = None


def shard_rows(
    offset: int, nbytes: int, tensors: Sequence[TensorEntry], rank: int | None = None
) -> ShardRows:
    """``ShardRows`` of a decoded shard's ``TensorEntry`` list."""
    return ShardRows(
        offset,
        nbytes,
        [(t.name, t.dtype, tuple(t.shape), t.start, t.end) for t in tensors],
        rank,
        None if rank is None else [None if t.offset is None else tuple(t.offset) for t in tensors],
    )


def component_rows(components: Sequence[ComponentEntry]) -> list[ComponentRows]:
    return [
        ComponentRows(
            c.name,
            [shard_rows(s.offset, s.nbytes, s.tensors, s.rank) for s in c.shards],
            dict(c.aliases),
            c.pretrained,
            c.parameters,
        )
        for c in components
    ]


class ShardSpan(NamedTuple):
    """What a snapshot's writer needs of a prepared shard: its bytes in the slot."""

    offset: int
    nbytes: int
    tensors: int


class PreparedComponent(NamedTuple):
    name: str
    shards: tuple[ShardSpan, ...]
    aliases: dict[str, str]
    files: ComponentFiles  # where its shards and index go in the step directory
