"""Which daemons the ranks of a job reach, and whether those daemons share one root.

``discover`` is a collective on the client's own group (at connect, never in ``snapshot()``).
Every rank sends a key of its daemon (host, the daemon's instance, its root) and the instance
alone; the ranks whose keys are equal are one node's. With several daemons, each rank then looks
for every daemon's node file in the root it sees (``ckptd/nodes.py``): the root is shared when
every rank finds every daemon there, node-local when none finds another node's. Anything in
between (some nodes share a root, others do not) is refused: nothing could tell which ranks'
parts end up together.

Nothing travels pickled: the keys and answers are int64 tensors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ckptd import nodes
from client.errors import CheckpointError
from client.ranks import Ranks


@dataclass(frozen=True)
class Topology:
    """The daemons of a job, as every rank of it agrees."""

    daemons: int  # distinct daemons the ranks reach (1: one node)
    shared_root: bool  # every daemon writes into the one root (trivially so for one daemon)
    node_ranks: tuple[int, ...]  # the ranks served by this rank's daemon, ascending
    node_index: int  # this rank's daemon among the job's, numbered by their lowest rank

    @property
    def single(self) -> bool:
        return self.daemons == 1


def _key(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("\0".join(parts).encode(), digest_size=7).digest(), "big")


def _gather(ranks: Ranks, values: list[int]) -> list[list[int]]:
    import torch.distributed as dist

    mine = torch.tensor(values, dtype=torch.int64)
    seen = [torch.zeros_like(mine) for _ in range(ranks.world_size)]
    dist.all_gather(seen, mine, group=ranks.group)
    return [[int(v) for v in t.tolist()] for t in seen]


def discover(ranks: Ranks, host: str, instance: str, root: str) -> Topology:
    """The job's topology (a collective on ``ranks.group``; every rank must call it)."""
    gathered = _gather(ranks, [_key(host, instance, root), _key(instance)])
    keys = [g[0] for g in gathered]
    order = list(dict.fromkeys(keys))  # each daemon once, by the lowest rank it serves
    mine = keys[ranks.rank]
    node_ranks = tuple(r for r, k in enumerate(keys) if k == mine)
    if len(order) == 1:
        return Topology(1, True, node_ranks, 0)
    instances = {g[1] for g in gathered}
    try:  # how many of the job's daemons this rank finds in its root (its own at most: apart)
        here = {_key(h.instance) for h in nodes.read_holders(Path(root))}
        seen = len(instances & here)
        sees_all = 1 if seen == len(instances) else 0 if seen <= 1 else 2
    except OSError:
        sees_all = -1  # cannot tell: refused below, on every rank
    answers = [a[0] for a in _gather(ranks, [sees_all])]
    if -1 in answers:
        raise CheckpointError(
            f"rank {answers.index(-1)} cannot list {nodes.NODES_DIR}/ in its daemon's root, so "
            "ckptd cannot tell whether the nodes of this job share a root; give every rank read "
            "access to the root",
            code="multi_node",
        )
    if len(set(answers)) > 1 or 2 in answers:  # 2: this rank sees some daemons, not all
        apart = [r for r, a in enumerate(answers) if a != 1]
        raise CheckpointError(
            f"some nodes of this job share a checkpoint root and others do not (ranks {apart[:8]} "
            "do not see every node's daemon in their root): give every node the same shared root, "
            "or every node a root of its own",
            code="multi_node",
        )
    return Topology(len(order), bool(answers[0]), node_ranks, order.index(mine))
