"""Non-contiguous DTensors (``Shard(1)``, 2-D meshes, HSDP): every rank's block, without a collective.

A DTensor whose local shard is a contiguous byte range of the full tensor (``Shard(0)`` on a 1-D
mesh) is written into consolidated files (``client.plan``). Any other placement of ``Shard`` and
``Replicate`` cuts the tensor into boxes (blocks); its component is stored as per-rank files
(``ckptd.perrank``). Every rank plans the same layout, so every rank computes every rank's block
from the mesh and the placements alone (``_compute_local_shape_and_global_offset`` per mesh
coordinate), never by asking the others. A block several ranks hold (replicas: a ``Replicate``
mesh dimension) is written by one of them (DCP's dedup rule), chosen so that the writes spread.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptd import layout as layout_mod
from ckptd import ranks as ranks_mod
from ckptd.torch_dtypes import safetensors_dtype

if TYPE_CHECKING:
    import torch

    from client.tree import Component

#: One distinct block: the ranks holding it (mesh order), its local shape, its global offset.
BlockSpec = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class Blocks:
    """A non-contiguous DTensor's global shape and its distinct blocks (hashable: planned once)."""

    shape: tuple[int, ...]
    blocks: tuple[BlockSpec, ...]

    def writer(self, j: int, salt: int) -> int:
        """The rank that writes block ``j``: one of its holders, ``salt`` spreading the choice."""
        holders = self.blocks[j][0]
        return holders[(j + salt) % len(holders)]


def is_contiguous(t: Any) -> bool:
    """Whether a DTensor's local shard is one contiguous byte range of the full tensor as ckptd
    writes it: ``Shard(0)`` on a 1-D mesh (FSDP2's default)."""
    from torch.distributed.tensor import Shard

    placements = tuple(t.placements)
    return (
        t.device_mesh.ndim == 1
        and len(placements) == 1
        and type(placements[0]) is Shard
        and placements[0].dim == 0
    )


def blocks_of(where: str, t: Any) -> Blocks:
    """Every rank's block of the DTensor ``t``; raises for a placement that is not a box per rank
    (``Partial``, ``_StridedShard``)."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(t.placements)
    if not all(type(p) is Shard or type(p) is Replicate for p in placements):
        raise ValueError(
            f"tensor {where} is a DTensor with placements {placements}: ckptd stores Shard and "
            "Replicate placements only (a Partial one holds partial sums, a strided shard is not one "
            "block per rank); redistribute it first (t.redistribute(mesh, [Replicate()]) or "
            "[Shard(d)]), or snapshot t.full_tensor()"
        )
    mesh = t.device_mesh
    ranks = tuple(int(r) for r in mesh.mesh.flatten().tolist())
    return _blocks(tuple(int(n) for n in t.shape), tuple(mesh.mesh.shape), ranks, placements)


@functools.lru_cache(maxsize=4096)
def _blocks(
    shape: tuple[int, ...], mesh_shape: tuple[int, ...], ranks: tuple[int, ...], placements: tuple[Any, ...]
) -> Blocks:
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    held: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for rank, coord in zip(ranks, itertools.product(*(range(n) for n in mesh_shape)), strict=True):
        local, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), placements)
        held.setdefault((tuple(int(n) for n in offset), tuple(int(n) for n in local)), []).append(rank)
    found = [(tuple(r), local, offset) for (offset, local), r in held.items()]
    # An empty block adds nothing (and its offset may repeat another's): kept only where the
    # whole tensor is empty, so that it is still stored (once): the one reaching to the tensor's
    # end in every dimension, as readers take the shape from the blocks' largest extent.
    whole = [b for b in found if tuple(o + n for o, n in zip(b[2], b[1], strict=True)) == shape]
    solid = [b for b in found if all(b[1])] or (whole or found)[:1]
    return Blocks(shape, tuple(solid))


def is_replicated(t: Any) -> bool:
    return all(type(p).__name__ == "Replicate" for p in t.placements)


def local_block(where: str, t: Any) -> tuple[torch.Tensor, Blocks]:
    """``t``'s local tensor and every rank's block; checks the local tensor is its block."""
    found = blocks_of(where, t)
    local: torch.Tensor = t.to_local()
    rank = t.device_mesh.get_rank()
    mine = [b for b in found.blocks if rank in b[0]]
    if mine and tuple(local.shape) != mine[0][1]:
        raise ValueError(
            f"tensor {where}: a DTensor whose local tensor has shape {tuple(local.shape)}, not the "
            f"{mine[0][1]} its placements {tuple(t.placements)} give; snapshot the model's own state dict"
        )
    return local, found


def ranked_specs(comp: Component, world: int) -> layout_mod.RankedSpecs:
    """A per-rank component's layout input (the same on every rank): per writing rank, its
    blocks of the component's DTensors and the whole tensors it owns (``assign_shards`` over the
    plain ones), each with its global offset."""
    groups: dict[int, list[tuple[layout_mod.TensorSpec, tuple[int, ...]]]] = {}
    plain = [(n, t) for n, t in comp.tensors if n not in comp.blocks]
    owners = ranks_mod.assign_shards([t.numel() * t.element_size() for _, t in plain], world)
    for (name, t), owner in zip(plain, owners, strict=True):
        spec = layout_mod.TensorSpec(name, safetensors_dtype(t.dtype, name), tuple(t.shape))
        groups.setdefault(owner, []).append((spec, (0,) * t.dim()))
    for k, (name, t) in enumerate(comp.tensors):
        found = comp.blocks.get(name)
        if found is None:
            continue
        dtype = safetensors_dtype(t.dtype, name)
        for j, (_, local, offset) in enumerate(found.blocks):
            writer = found.writer(j, k)
            if not 0 <= writer < world:
                raise ValueError(
                    f"tensor {comp.name}/{name}: its device mesh holds rank {writer}, outside this "
                    f"job's {world} ranks; snapshot from every rank of the mesh's job"
                )
            groups.setdefault(writer, []).append((layout_mod.TensorSpec(name, dtype, local), offset))
    return sorted(groups.items())
