"""Node-local roots: every node of a job has a root of its own (no shared filesystem).

Each node's daemon then commits every step on its own, as a complete checkpoint of the
replicated state: the ranks of a node split the shards among themselves, as the ranks of a
one-node job do (their part group: rank = index among the node's ranks, world = the node's
ranks, job = the job's uid and the node's index), so each node's step directory is a complete
``from_pretrained`` checkpoint, written once per node. A node holds only its own ranks' slices
of sharded state (DTensors), so that is refused at ``snapshot()``.

``agree_restore`` is a collective on the client's group: each node's first rank lists the
committed steps of its root, the lists are all-gathered, and the newest step that every node
holds and whose every copy verifies (each node's first rank checks its own) is the one every
rank then loads from its own root. Nothing travels pickled: steps, answers and node ids are
int64 tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ckptd import paths, reading
from client.errors import CheckpointError
from client.ranks import Ranks
from client.topology import Topology

log = logging.getLogger(__name__)
_UNLISTABLE = -1  # a node's first rank could not list its run directory


@dataclass(frozen=True)
class NodeLocal:
    """This rank's node among the job's, as every rank agrees (made at connect)."""

    node_index: int
    leader: bool  # this rank is its node's first: it lists and verifies the node's root
    leaders: tuple[int, ...]  # each node's first rank, by node index
    names: tuple[str, ...]  # each node's daemon's node id, by node index
    node_ranks: tuple[tuple[int, ...], ...]  # each node's ranks, by node index

    def named(self, nodes: list[int]) -> str:
        return ", ".join(f"node {self.names[i]} (ranks {list(self.node_ranks[i])})" for i in nodes)


def part_group(ranks: Ranks, topo: Topology) -> Ranks | None:
    """The ranks whose parts make this node's step directory: the node's, numbered by their order
    in it, under a job uid of the node's own; None when the node has only this rank (its
    snapshot is then a plain single-process one). The group stays the job's: no collective
    runs in ``snapshot()``."""
    if len(topo.node_ranks) == 1:
        return None
    job = f"{ranks.job}{topo.node_index:04x}"  # still hex: the daemon's job pattern
    return Ranks(topo.node_ranks.index(ranks.rank), len(topo.node_ranks), job, ranks.group)


def gather_ints(ranks: Ranks, values: list[int]) -> list[list[int]]:
    """Every rank's ``values`` (any length), by rank: two all-gathers of int64 tensors."""
    import torch.distributed as dist

    count = torch.tensor([len(values)], dtype=torch.int64)
    counts = [torch.zeros_like(count) for _ in range(ranks.world_size)]
    dist.all_gather(counts, count, group=ranks.group)
    width = max(1, *(int(c.item()) for c in counts))
    mine = torch.zeros(width, dtype=torch.int64)
    mine[: len(values)] = torch.tensor(values, dtype=torch.int64)
    seen = [torch.zeros_like(mine) for _ in range(ranks.world_size)]
    dist.all_gather(seen, mine, group=ranks.group)
    return [t[: int(c.item())].tolist() for t, c in zip(seen, counts, strict=True)]


def nodes_of(ranks: Ranks, topo: Topology, node_id: str) -> NodeLocal:
    """Which rank leads each node and each node's id (a collective on ``ranks.group``)."""
    gathered = gather_ints(ranks, [topo.node_index, *node_id.encode()])
    nodes = max(g[0] for g in gathered) + 1
    leaders, names = [-1] * nodes, [""] * nodes
    members: list[list[int]] = [[] for _ in range(nodes)]
    for rank, g in enumerate(gathered):
        members[g[0]].append(rank)
        if leaders[g[0]] < 0:
            leaders[g[0]], names[g[0]] = rank, bytes(g[1:]).decode(errors="replace") or f"#{g[0]}"
    return NodeLocal(
        topo.node_index,
        leaders[topo.node_index] == ranks.rank,
        tuple(leaders),
        tuple(names),
        tuple(tuple(m) for m in members),
    )


def agree_restore(
    ranks: Ranks,
    local: NodeLocal,
    run_dir: Path,
    load: Callable[[int], int],
    *,
    step: int | None,
    fallback: bool,
) -> int:
    """The step every rank restores (a collective): ``step``, or the newest that every node
    holds and whose every copy verifies (only the newest common one unless ``fallback``); each
    rank then loads it from its own root with ``load``. A failure is raised on every rank."""
    held = _held_steps(ranks, local, run_dir)
    if step is not None:
        lacking = [i for i, s in enumerate(held) if step not in s]
        if lacking:
            raise CheckpointError(
                f"cannot restore step {step} of run {run_dir.name!r}: {local.named(lacking)} has not "
                f"committed it; with node-local roots every node must hold the step (steps every "
                f"node has: {_common(held)[:8]})",
                code="not_found",
            )
        candidates = [step]
    else:
        candidates = _common(held)[: None if fallback else 1]
    chosen = _verified(ranks, local, run_dir, candidates, explicit=step is not None or not fallback)
    if chosen is None:
        each = "; ".join(
            f"node {n}: {sorted(s, reverse=True)[:8]}" for n, s in zip(local.names, held, strict=True)
        )
        raise CheckpointError(
            f"no committed step of run {run_dir.name!r} that every node holds verifies ({each})"
            + _lacking_hint(local, held, run_dir),
            code="not_found",
        )
    error: Exception | None = None
    try:
        load(chosen)
    except Exception as e:  # raised below, after the gather every rank joins
        error = e
    failed = [r for r, ok in enumerate(gather_ints(ranks, [int(error is None)])) if not ok[0]]
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(
            f"rank(s) {failed[:8]} could not load step {chosen} of run {run_dir.name!r} from their "
            "node's root (see their error); this rank loaded it, the job did not",
            code="restore_failed",
        )
    return chosen


def _lacking_hint(local: NodeLocal, held: list[set[int]], run_dir: Path) -> str:
    """What to do where some node holds steps no other node has (a node replaced by a fresh
    one: its node-local root is empty): each node restores from its own root only."""
    lacking = [i for i, s in enumerate(held) if not s]
    newest = max((max(s) for s in held if s), default=None)
    if newest is None:
        return ""
    lacks = f"; {local.named(lacking)} holds none of them" if lacking else ""
    return (
        f"{lacks}. Each node restores from its own root: copy a step directory that another node "
        f"holds (e.g. {run_dir.name}/{paths.step_dirname(newest)}) into {run_dir} on every node "
        "that lacks it"
    )


def _held_steps(ranks: Ranks, local: NodeLocal, run_dir: Path) -> list[set[int]]:
    """The committed steps of each node's root, by node index (its first rank lists them)."""
    mine: list[int] = []
    if local.leader:
        try:
            mine = [s for s, _ in paths.committed_steps(run_dir)]
        except OSError as e:
            log.warning("cannot list %s: %s", run_dir, e)
            mine = [_UNLISTABLE]
    gathered = gather_ints(ranks, mine)
    held = [set(gathered[r]) for r in local.leaders]
    unlistable = [i for i, s in enumerate(held) if _UNLISTABLE in s]
    if unlistable:
        raise CheckpointError(
            f"{local.named(unlistable)} cannot list its run directory {run_dir.name!r} (see that "
            "rank's log); give it read access to its root",
            code="io_error",
        )
    return held


def _common(held: list[set[int]]) -> list[int]:
    """The steps every node holds, newest first."""
    return sorted(set.intersection(*held), reverse=True) if held else []


def _verified(
    ranks: Ranks, local: NodeLocal, run_dir: Path, candidates: list[int], *, explicit: bool
) -> int | None:
    """The first of ``candidates`` whose copy on every node verifies (one collective each)."""
    for i, step in enumerate(candidates):
        ok = 1
        if local.leader:
            step_dir = run_dir / paths.step_dirname(step)
            try:
                problems = reading.verify(step_dir)
            except (OSError, reading.CorruptCheckpoint) as e:  # the others wait in the gather
                problems = [f"{step_dir}: {e}"]
            if problems:
                log.warning("%s does not verify: %s", step_dir, "; ".join(problems[:4]))
                ok = 0
        answers = gather_ints(ranks, [ok])
        bad = [n for n, r in enumerate(local.leaders) if not answers[r][0]]
        if not bad:
            return step
        if explicit:
            raise CheckpointError(
                f"cannot restore step {step} of run {run_dir.name!r}: its copy on "
                f"{local.named(bad)} does not verify (see that node's first rank's log)",
                code="corrupt",
            )
        later = "; trying an older step every node has" if i + 1 < len(candidates) else ""
        log.warning(
            "step %s of run %r: its copy on %s does not verify%s", step, run_dir.name, local.named(bad), later
        )
    return None
