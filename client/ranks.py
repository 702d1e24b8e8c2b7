"""Coordination of the ranks of a ``torchrun`` job: the client's own gloo group, the job uid, and
which shards this rank copies.

``Client.connect()`` under an initialised process group is a collective: every rank calls it
(on its main thread), and it creates a dedicated gloo group for ckptd (``dist.new_group``: a
background collective on the training group would interleave with training's), on which rank 0
broadcasts the job's uid. Collectives run on that group at connect and in ``restore()``, never
in ``snapshot()``: a rank's ``snapshot()`` copies only the shards it owns (``ckptd.ranks``: the
same assignment on every rank, computed locally) and hands them to the node's daemon, which
commits the step once every rank's part is durable.

Nothing travels pickled: the uid, the daemon check and the restored step are tensors.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from ckptd import ranks as ranks_mod
from ckptd.layout import Layout
from client.errors import CheckpointError


@dataclass(frozen=True)
class Ranks:
    """This process's place in its job, and the group ckptd's collectives run on."""

    rank: int
    world_size: int
    job: str  # drawn by rank 0 at connect, the same on every rank
    group: Any  # torch.distributed.ProcessGroup (gloo)

    def owned(self, layout: Layout) -> list[int]:
        sizes = [s.nbytes for c in layout.components for s in c.shards]
        return ranks_mod.owned_shards(sizes, self.world_size, self.rank)


def join(process_group: object, timeout_s: float) -> Ranks | None:
    """The ranks of ``process_group`` (None: the default group, if one is initialised; False:
    none), or None when there is only this process. A collective over that group."""
    if process_group is False:
        return None
    import torch.distributed as dist

    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return None
    parent = None if process_group is None else process_group
    world = dist.get_world_size(parent)  # type: ignore[arg-type]
    if world <= 1:
        return None
    members = dist.get_process_group_ranks(parent) if parent is not None else None  # type: ignore[arg-type]
    group = dist.new_group(ranks=members, backend="gloo", timeout=timedelta(seconds=timeout_s))
    rank = dist.get_rank(group)
    job = broadcast_text(secrets.token_hex(8) if rank == 0 else None, group)
    return Ranks(rank, world, job, group)


def broadcast_text(text: str | None, group: Any) -> str:
    """Rank 0's ``text`` on every rank of ``group`` (UTF-8 bytes in two tensor broadcasts)."""
    import torch.distributed as dist

    src = dist.get_global_rank(group, 0)
    data = (text or "").encode()
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src, group=group)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    if dist.get_rank(group) != 0:
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
    if int(size.item()):
        dist.broadcast(buf, src, group=group)
    return bytes(buf.tolist()).decode()


def agree_restore(
    ranks: Ranks, load: Callable[[int | None, bool], int], step: int | None, fallback: bool
) -> int:
    """Rank 0 picks and loads the step (the newest that verifies, unless ``step``); every other
    rank then loads that same step. Returns it on every rank; rank 0's failure fails every rank."""
    outcome: dict[str, Any] = {}
    if ranks.rank == 0:
        try:
            outcome = {"step": load(step, fallback)}
        except CheckpointError as e:
            outcome = {"error": str(e), "code": e.code}
            broadcast_text(json.dumps(outcome), ranks.group)
            raise
        broadcast_text(json.dumps(outcome), ranks.group)
        return int(outcome["step"])
    outcome = json.loads(broadcast_text(None, ranks.group))
    if "error" in outcome:
        raise CheckpointError(f"rank 0 could not restore: {outcome['error']}", code=str(outcome["code"]))
    return load(int(outcome["step"]), False)
