"""The layout planner: where every tensor of a snapshot lives in an arena slot and in which shard.

A pure function of (names, dtypes, shapes, max_shard_size). The arena *is* the file: each shard's
data section starts at a 4096-byte boundary of the slot and holds its tensors back to back,
ordered by descending element size so that every tensor view is aligned. The daemon writes a
shard as its safetensors header (padded to 4096 bytes) followed by that one contiguous range.

Shard split follows the Hugging Face rule (``split_torch_state_dict_into_shards``): greedy in
order, a new shard when ``max_shard_size`` would be passed, a tensor larger than the limit alone
in a shard of its own.

Every name a step directory holds is made here (``component_files``, ``small_file``): the top of
a step directory is what ``save_pretrained`` writes for the ``model`` component, and every other
component lives in a subdirectory of its own name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ckptd.dtypes import itemsize, numel

#: Alignment of every shard's data section in the arena and in the file.
ALIGN = 4096


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor to place: its name in the component, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True, slots=True)
class TensorPlacement:
    """A tensor's place in its shard: ``[start, end)`` relative to the shard's data section."""

    spec: TensorSpec
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class ShardLayout:
    """One shard file: its data section at ``offset`` of the arena slot, ``nbytes`` long."""

    offset: int
    nbytes: int
    tensors: tuple[TensorPlacement, ...]


@dataclass(frozen=True, slots=True)
class ComponentLayout:
    """The shards of one component (``model``, ``optimizer``, ...), in file order. A per-rank
    component (non-contiguous DTensors) has one shard per rank that writes: ``ranks[i]`` writes
    shard ``i`` and ``offsets[i]`` holds the global offset of each of its tensors (in its order)."""

    name: str
    shards: tuple[ShardLayout, ...]
    ranks: tuple[int, ...] = ()
    offsets: tuple[tuple[tuple[int, ...], ...], ...] = ()

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a whole snapshot lives in one arena slot of ``slot_bytes``."""

    components: tuple[ComponentLayout, ...]
    slot_bytes: int


#: The component whose files are the top of a step directory, as ``save_pretrained`` writes them.
MODEL = "model"
#: The file stem ``save_pretrained`` gives weights (``model.safetensors``, ``model-00001-of-...``).
PRETRAINED_STEM = "model"


@dataclass(frozen=True, slots=True)
class ComponentFiles:
    """Where one component's files are in a step directory. Every path is relative to the step
    directory: ``dir`` is ``""`` for the ``model`` component (the top) and the component's name
    for any other; ``name(i)`` is a shard's file name inside ``dir`` (what an index maps to)."""

    dir: str
    stem: str
    count: int
    ranks: tuple[int, ...] = ()  # of a per-rank component: the rank of each shard (``rank_files``)

    def name(self, index: int) -> str:
        """Shard ``index`` (0-based): ``<stem>.safetensors`` alone, else the Hugging Face
        ``<stem>-00001-of-00003.safetensors``; of a per-rank component ``rank-0000r.safetensors``."""
        if self.ranks:
            return f"{RANK_FILE_STEM}-{self.ranks[index]:05d}.safetensors"
        if self.count == 1:
            return f"{self.stem}.safetensors"
        return f"{self.stem}-{index + 1:05d}-of-{self.count:05d}.safetensors"

    def shard(self, index: int) -> str:
        return self.path(self.name(index))

    @property
    def index(self) -> str | None:
        """``<stem>.safetensors.index.json``, only for a component of several shards (as
        ``save_pretrained`` writes one); a per-rank component has none (its headers say it all)."""
        if self.ranks:
            return None
        return self.path(f"{self.stem}.safetensors.index.json") if self.count > 1 else None

    def path(self, name: str) -> str:
        return f"{self.dir}/{name}" if self.dir else name


def component_dir(component: str) -> str:
    """A component's directory in a step directory: ``""`` (the top) for ``model``."""
    return "" if component == MODEL else component


def component_files(component: str, count: int, *, pretrained: bool = False) -> ComponentFiles:
    """The files of ``component`` stored in ``count`` shards. The ``model`` component, and a
    ``pretrained`` one (a Hugging Face model with a config, laid out as ``save_pretrained`` does
    so that ``from_pretrained(step_dir / name)`` reads it), use the stem ``model``; any other
    its own name (``optimizer/optimizer.safetensors``)."""
    stem = PRETRAINED_STEM if component == MODEL or pretrained else component
    return ComponentFiles(component_dir(component), stem, count)


#: A per-rank file's stem: ``<dir>/rank-00003.safetensors``, a name no Hugging Face loader reads.
RANK_FILE_STEM = "rank"


def rank_files(component: str, ranks: Sequence[int]) -> ComponentFiles:
    """The per-rank files of a component of non-contiguous DTensors (one per rank that writes,
    each a safetensors file whose header carries ``DCP_SHARDING_INFO``). They live in a directory
    of their own, holding nothing else, so that torch's ``HuggingFaceStorageReader`` (which reads
    every ``*.safetensors`` there) reads exactly them and no ``from_pretrained`` takes them for a
    model: the component's directory, ``model/`` for the ``model`` component."""
    return ComponentFiles(component_dir(component) or MODEL, RANK_FILE_STEM, len(ranks), tuple(ranks))


def small_file(component: str, name: str) -> str:
    """Where a small file (``config.json``, ...) of ``component`` goes in a step directory; also
    the key a snapshot's ``files`` carries it under."""
    return component_files(component, 1).path(name)


def split_small_file(key: str) -> tuple[str, str]:
    """``(component, name)`` of a snapshot ``files`` key (``small_file`` the other way round)."""
    head, sep, tail = key.partition("/")
    return (head, tail) if sep else (MODEL, key)


def split_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Split tensors into shards by the Hugging Face rule, keeping their order."""
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_size = 0
    for spec in specs:
        size = spec.nbytes
        if size > max_shard_size:
            shards.append([spec])
            continue
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(spec)
        current_size += size
    if current:
        shards.append(current)
    return shards


def _place_shard(specs: Sequence[TensorSpec], offset: int) -> ShardLayout:
    # Descending element size keeps every start a multiple of its own element size.
    ordered = sorted(specs, key=lambda s: -itemsize(s.dtype))
    placements = []
    pos = 0
    for spec in ordered:
        placements.append(TensorPlacement(spec, pos, pos + spec.nbytes))
        pos += spec.nbytes
    return ShardLayout(offset=offset, nbytes=pos, tensors=tuple(placements))


#: Of a per-rank component: per writing rank, its tensors (local shapes) with their global offsets.
RankedSpecs = Sequence[tuple[int, Sequence[tuple[TensorSpec, tuple[int, ...]]]]]


def plan(
    components: Sequence[tuple[str, Sequence[TensorSpec]]],
    max_shard_size: int,
    ranked: Mapping[str, RankedSpecs] | None = None,
) -> Layout:
    """Place every component's tensors in one arena slot; a component in ``ranked`` gets one
    shard per writing rank instead. Pure; callers cache it by signature."""
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
    offset = 0
    placed = []
    for name, specs in components:
        if ranked is not None and name in ranked:
            comp, offset = _place_ranked(name, ranked[name], offset)
            placed.append(comp)
            continue
        if not specs:  # the daemon refuses a shard without tensors (and a component without shards)
            raise ValueError(f"component {name!r} has no tensors; leave it out of the snapshot")
        shards = []
        for group in split_shards(specs, max_shard_size):
            shard = _place_shard(group, offset)
            shards.append(shard)
            offset += round_up(shard.nbytes)
        placed.append(ComponentLayout(name=name, shards=tuple(shards)))
    return Layout(components=tuple(placed), slot_bytes=max(offset, ALIGN))


def _place_ranked(name: str, groups: RankedSpecs, offset: int) -> tuple[ComponentLayout, int]:
    shards, ranks, offsets = [], [], []
    for rank, group in groups:
        shard = _place_shard([spec for spec, _ in group], offset)
        at = {spec.name: off for spec, off in group}
        shards.append(shard)
        ranks.append(rank)
        offsets.append(tuple(at[p.spec.name] for p in shard.tensors))
        offset += round_up(shard.nbytes)
    if not shards:
        raise ValueError(f"component {name!r} has no tensors; leave it out of the snapshot")
    return ComponentLayout(name, tuple(shards), tuple(ranks), tuple(offsets)), offset
