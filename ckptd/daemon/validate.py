"""Checks on a snapshot request before the daemon reads a byte of the arena it names.

A client must never make the daemon read outside an arena, write outside its root, or produce a
file that is not valid safetensors. Every check here says what was wrong.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ckptd.daemon.rows import ComponentRows, PreparedComponent, ShardRows
from ckptd.dtypes import ITEMSIZE, numel
from ckptd.layout import MODEL, small_file, split_small_file
from ckptd.manifest import MANIFEST_NAME
from ckptd.paths import TEMP_MARKER, InvalidName, check_name
from ckptd.protocol import Snapshot

#: Small files a snapshot may carry besides its shards (config.json, tokenizer and processor files,
#: trainer_state.json): a plain name with an extension, at the top of the step directory.
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\.[A-Za-z0-9]{1,16}")
#: Names no small file may have: ckptd's own, weights a loader would read as the model's (ckptd
#: writes those itself, from the arena), and pickles (never written by ckptd).
_FORBIDDEN_SUFFIXES = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: Small files of one snapshot: how many, and their bytes together (a Gemma 3 tokenizer is 38 MB;
#: as base64 the bytes must fit one frame, with the tree).
MAX_FILES = 64
MAX_KEEP_STEPS = 64  # steps a snapshot asks retention to keep (keep_steps)
MAX_FILES_BYTES = 40 * 2**20
_RESERVED_COMPONENTS = frozenset({"ckptd"})
MAX_DIMS = 64


class InvalidRequest(ValueError):
    """A snapshot request that the daemon refuses; nothing was written."""


def check_components(components: Sequence[ComponentRows]) -> int:
    """Validate a layout on its own (names, dtypes, shapes, offsets, aliases); returns its bytes."""
    try:
        for c in components:
            check_name("component", c.name)
    except InvalidName as e:
        raise InvalidRequest(str(e)) from e
    names = [c.name for c in components]
    if len(set(names)) != len(names) or _RESERVED_COMPONENTS & set(names):
        raise InvalidRequest(f"component names must be unique and not 'ckptd': {names}")
    for name in names:
        if name != MODEL and name.endswith((*_FORBIDDEN_SUFFIXES, ".json")):
            # Its directory would sit at the top of the step where loaders look for files of
            # these names (`*.safetensors`, `*.index.json`, `config.json`, ...).
            raise InvalidRequest(
                f"component name {name!r} is the name of a file a loader reads at the top of a step "
                f"directory (it ends in {name[name.rfind('.') :]!r}); name the component without "
                "such an extension"
            )
    return sum(_check_component(c) for c in components)


def check_snapshot(req: Snapshot, components: Sequence[PreparedComponent], arena_size: int) -> None:
    """Validate what a snapshot adds to its (already checked) layout: names, the step, files and
    that every shard lies inside its arena of ``arena_size`` bytes."""
    try:
        check_name("run", req.run)
    except InvalidName as e:
        raise InvalidRequest(str(e)) from e
    if req.step < 0:
        raise InvalidRequest(f"step must be >= 0, got {req.step}")
    if not 0 <= req.rank < req.world_size:
        raise InvalidRequest(f"rank {req.rank} is not within world_size {req.world_size}")
    check_files(req, components)
    if req.keep_last is not None and req.keep_last < 1:
        raise InvalidRequest(
            f"keep_last must be >= 1 (or None: the daemon's --keep-last), got {req.keep_last}"
        )
    if len(req.keep_steps) > MAX_KEEP_STEPS or any(s < 0 for s in req.keep_steps):
        raise InvalidRequest(
            f"keep_steps must be at most {MAX_KEEP_STEPS} steps >= 0, got {req.keep_steps[:8]}"
        )
    if req.pieces is not None:
        _check_pieces(req.pieces, [s.nbytes for c in components for s in c.shards], arena_size)
        writers = [
            c.files.ranks[i] if c.files.ranks else None for c in components for i in range(len(c.shards))
        ]
        for g, *_ in req.pieces:  # a per-rank file is its own rank's alone
            if writers[g] is not None and writers[g] != req.rank:
                raise InvalidRequest(
                    f"rank {req.rank} sent a piece of rank {writers[g]}'s per-rank file (shard {g})"
                )
        return
    for c in components:
        for i, shard in enumerate(c.shards):
            if shard.offset < 0 or shard.nbytes < 0 or shard.offset + shard.nbytes > arena_size:
                raise InvalidRequest(
                    f"component {c.name!r} shard {i}: bytes [{shard.offset}, "
                    f"{shard.offset + shard.nbytes}) are outside the {arena_size}-byte arena"
                )


def _check_pieces(
    pieces: Sequence[tuple[int, int, int, int]], shards: Sequence[int], arena_size: int
) -> None:
    """Each piece of a sharded part lies inside its shard's data and inside the arena."""
    for g, start, nbytes, at in pieces:
        if not 0 <= g < len(shards):
            raise InvalidRequest(f"piece of shard {g}: the layout has {len(shards)} shards")
        if start < 0 or nbytes <= 0 or start + nbytes > shards[g]:
            raise InvalidRequest(
                f"piece [{start}, {start + nbytes}) of shard {g} is outside its {shards[g]} bytes"
            )
        if at < 0 or at + nbytes > arena_size:
            raise InvalidRequest(
                f"piece of shard {g}: slot bytes [{at}, {at + nbytes}) are outside the "
                f"{arena_size}-byte arena"
            )


def files_bytes(req: Snapshot) -> int:
    """Bytes of a snapshot's small files (``files`` as UTF-8, and ``blobs``)."""
    return sum(len(t.encode()) for t in req.files.values()) + sum(len(b) for b in req.blobs.values())


def plain_file_name(name: str) -> bool:
    """Whether ``name`` may be a small file's name (without its ``<component>/``): a plain name
    with an extension, of ckptd's charset, not the manifest nor a weights or pickle file."""
    return bool(
        _FILE_NAME.fullmatch(name)
        and ".." not in name
        and TEMP_MARKER not in name
        and name != MANIFEST_NAME
        and not name.endswith(_FORBIDDEN_SUFFIXES)
    )


def check_files(req: Snapshot, components: Sequence[PreparedComponent]) -> None:
    """The small files of a snapshot: the model's (a plain name) or another component's of this
    snapshot (``<component>/<name>``), each name plain with an extension and colliding with
    nothing ckptd writes, within ``MAX_FILES`` and ``MAX_FILES_BYTES``; and no component's
    directory takes a name a model file has."""
    both = set(req.files) & set(req.blobs)
    if both:
        raise InvalidRequest(f"files {sorted(both)} are given twice (as text and as bytes)")
    keys = [*req.files, *req.blobs]
    if len(keys) > MAX_FILES:
        raise InvalidRequest(f"{len(keys)} small files; a snapshot carries at most {MAX_FILES}")
    names = {c.name for c in components}
    for key in keys:
        component, name = split_small_file(key)
        if not plain_file_name(name) or name in names or small_file(component, name) != key:
            raise InvalidRequest(
                f"small file name {key!r} is not allowed: use a plain name with an extension "
                f"(letters, digits, '_', '-', '.'; no '..'), as the model's or as '<component>/<name>', "
                f"not {MANIFEST_NAME}, a component's name, nor one ending in "
                f"{', '.join(_FORBIDDEN_SUFFIXES)} (weights go in tensors)"
            )
        if component != MODEL and component not in names:
            raise InvalidRequest(
                f"small file {key!r} is not allowed: '<component>/<name>' must name a component of "
                f"the snapshot {sorted(names)}"
            )
    nbytes = files_bytes(req)
    if nbytes > MAX_FILES_BYTES:
        raise InvalidRequest(
            f"the snapshot's small files hold {nbytes} bytes, over the limit of {MAX_FILES_BYTES}; "
            "snapshot large data as tensors"
        )
    top = {MANIFEST_NAME, *keys}
    for c in components:
        if not c.files.dir:
            top.update(c.files.shard(i) for i in range(len(c.shards)))
            top.add(c.files.index or "")
    taken = {c.files.dir for c in components if c.files.dir} & top
    if taken:
        raise InvalidRequest(
            f"component name(s) {sorted(taken)} are also names of the model's files in the step "
            "directory; rename the component(s)"
        )


def _check_ranked(where: str, shard: ShardRows, i: int, c: ComponentRows) -> None:
    """A per-rank file: its rank once in the component, unique names, an offset per tensor of
    its tensor's rank (DCP's ``saved_offsets``), all >= 0."""
    if shard.rank is None or shard.rank < 0 or any(s.rank == shard.rank for s in c.shards[:i]):
        raise InvalidRequest(
            f"{where}: every shard of a per-rank component names its rank (>= 0), each once; got "
            f"{[s.rank for s in c.shards[: i + 1]]}"
        )
    names = [t[0] for t in shard.tensors]
    offsets = shard.offsets or []
    if len(set(names)) != len(names) or len(offsets) != len(names):
        raise InvalidRequest(f"{where}: a per-rank file holds each tensor once, each with its offset")
    for (name, _, shape, _, _), off in zip(shard.tensors, offsets, strict=True):
        if off is None or len(off) != len(shape) or min(off, default=0) < 0 or max(off, default=0) >= 2**62:
            raise InvalidRequest(
                f"{where}: tensor {name!r} of shape {list(shape)} has offset {off}; a block's offset "
                "has one index >= 0 per dimension"
            )


def _check_component(c: ComponentRows) -> int:
    if c.parameters is not None and c.parameters < 0:
        raise InvalidRequest(f"component {c.name!r}: parameters must be >= 0, got {c.parameters}")
    if not c.shards:
        raise InvalidRequest(f"component {c.name!r} has no shards")
    seen: set[str] = set()
    total = 0
    per_rank = c.shards[0].rank is not None
    for i, shard in enumerate(c.shards):
        where = f"component {c.name!r} shard {i}"
        if not shard.tensors:  # a header of 4096 bytes for nothing: shards are bounded by tensors
            raise InvalidRequest(f"{where} holds no tensors; every shard must hold at least one")
        if shard.offset < 0 or shard.nbytes < 0:
            raise InvalidRequest(f"{where}: offset {shard.offset} and size {shard.nbytes} must be >= 0")
        if per_rank:  # a block of a tensor per rank: names repeat across the shards, not within
            _check_ranked(where, shard, i, c)
            seen.update(t[0] for t in shard.tensors)
        elif shard.rank is not None:
            raise InvalidRequest(f"{where} names a rank, but the component's first shard does not")
        pos = 0
        for name, dtype, shape, start, end in shard.tensors:
            if (name in seen and not per_rank) or name == "__metadata__" or not name:
                raise InvalidRequest(f"{where}: tensor name {name!r} is empty, reserved or repeated")
            seen.add(name)
            if dtype not in ITEMSIZE:
                raise InvalidRequest(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
            # safetensors reads dims as u64 and sizes as usize: keep both far from overflowing.
            if (
                len(shape) > MAX_DIMS
                or numel([max(d, 1) for d in shape]) >= 2**62
                or min(shape, default=0) < 0
            ):
                raise InvalidRequest(f"{where}: tensor {name!r} has an invalid shape {list(shape[:8])}")
            size = numel(shape) * ITEMSIZE[dtype]
            if start != pos or end - start != size:
                raise InvalidRequest(
                    f"{where}: tensor {name!r} spans [{start}, {end}); expected "
                    f"[{pos}, {pos + size}) for shape {list(shape)} {dtype}"
                )
            pos = end
        if pos != shard.nbytes:
            raise InvalidRequest(f"{where}: tensors cover {pos} bytes, shard says {shard.nbytes}")
        total += shard.nbytes
    for alias, target in c.aliases.items():
        if target not in seen or alias in seen:
            raise InvalidRequest(f"component {c.name!r}: alias {alias!r} -> {target!r} is invalid")
    return total
