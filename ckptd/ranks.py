"""Several ranks, one checkpoint: who writes which shard, and the record each rank's part leaves.

Every rank of a job plans the same layout (``ckptd.layout.plan`` is pure), so every rank computes
the same assignment of whole shards to ranks here, with no communication: the shards, largest
first, each go to the rank with the fewest bytes so far (lowest rank on a tie). That is DCP's
dedup rule (each replicated item saved once, by the rank with the smallest plan), spread by
bytes, so each rank copies and writes about 1/W of the checkpoint and every byte is written once.

A rank's part is sealed by its part manifest, ``parts/rank-0000r.json`` in the step's temp
directory, written (and fsynced, with ``parts/``) once the rank's files are durable. The commit
(global indexes, ``ckptd.json``, rename, ``LATEST``) happens once every rank's part is.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

#: The directory of a multi-rank step that holds its part manifests.
PARTS_DIR = "parts"
PART_FORMAT = "ckptd-part/1"


def part_filename(rank: int) -> str:
    """``rank-00003.json``: the part manifest of ``rank``, inside ``PARTS_DIR``."""
    return f"rank-{rank:05d}.json"


def assign_shards(sizes: Sequence[int], world_size: int) -> list[int]:
    """The rank that writes each shard (``sizes`` in layout order, every component's shards one
    after the other). Pure and deterministic: every rank computes the same list."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owner = [0] * len(sizes)
    loads = [(0, r) for r in range(world_size)]  # (bytes so far, rank): a heap
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        nbytes, rank = heapq.heappop(loads)
        owner[i] = rank
        heapq.heappush(loads, (nbytes + sizes[i], rank))
    return owner


def owned_shards(sizes: Sequence[int], world_size: int, rank: int) -> list[int]:
    """The shards (global indexes, ascending) that ``rank`` writes."""
    return [i for i, r in enumerate(assign_shards(sizes, world_size)) if r == rank]


class PartFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    shard: int  # global index of the shard in the layout
    file: str  # its name in the step directory (``ckptd.layout`` names it)
    bytes: int
    xxh3_128: str


class PartRange(BaseModel):
    """A byte range one rank wrote into a consolidated file of a sharded step."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    shard: int  # global index of the shard in the layout
    file: str
    offset: int  # in the file (its header included)
    bytes: int


class PartManifest(BaseModel):
    """What one rank's daemon wrote for a multi-rank step, durable before the commit."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    format: str = PART_FORMAT
    run: str
    step: int
    job: str
    rank: int
    world_size: int
    layout: str  # xxh3-128 of the layout's shard headers and indexes: equal on every rank
    files: list[PartFile]
    #: Of a sharded step (FSDP2): the ranges this rank wrote into the step's consolidated files
    #: (whose checksums the commit takes once every part is durable); ``files`` is then empty.
    ranges: list[PartRange] = []

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files) + sum(r.bytes for r in self.ranges)
