"""Restoring a checkpoint into sharded state (FSDP2 ``DTensor``s) of any world size.

Every step directory holds whole tensors in consolidated safetensors files (a sharded job's ranks
wrote their slices straight into them). A rank restoring into a DTensor reads only the rows its
own local tensor covers (``compute_local_shape_and_global_offset`` of the placements of the model
it is loaded into: the world size may differ from the one that saved), from the offsets in the
shard headers, and gets back a DTensor of those placements; a plain tensor is read whole. The
optimizer's per-parameter state (``exp_avg``, ...) of a DTensor parameter is read like the
parameter, so an optimizer without state yet (a fresh job) is restored sharded too.

Checksums are whole-file: the rank that picks the step (rank 0, or the only process) verifies it
(one read of every file, streamed); the other ranks read only their slices.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckptd import checksum, perrank, reading, tree
from ckptd.manifest import Manifest
from ckptd.shardfile import HeaderEntry, ShardFormatError, decode_header
from ckptd.torch_dtypes import FROM_SAFETENSORS
from client.tree import is_dtensor, normalize, optimizer_param_order, param_names

_Key = tuple[str, str]  # component, tensor name


def templates(obj: object) -> tuple[dict[_Key, Any], dict[_Key, Any]]:
    """The DTensors of ``obj`` a checkpoint's tensors are read into: of each module's state dict
    by name, and of each optimizer's parameters by their name (its state is laid out like them)."""
    top = normalize(obj)
    modules = {k: v for k, v in top.items() if isinstance(v, nn.Module)}
    names = param_names(modules)
    direct: dict[_Key, Any] = {}
    params: dict[_Key, Any] = {}
    for key, value in top.items():
        if isinstance(value, nn.Module):
            direct.update(((key, n), t) for n, t in value.state_dict().items() if is_dtensor(t))
        elif isinstance(value, torch.optim.Optimizer):
            for i, p in enumerate(optimizer_param_order(value)):
                if is_dtensor(p):
                    params[(key, names.get(id(p), str(i)))] = p
        else:  # a state dict or a tree of plain values: its tensors by their dotted path
            direct.update(((key, n or key), t) for n, t in _tensors(value, ()) if is_dtensor(t))
    return direct, params


def _tensors(value: object, path: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """The tensors of a tree of dicts, lists and tuples, named as ``client.tree`` names them."""
    if isinstance(value, torch.Tensor):
        yield ".".join(path), value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if isinstance(k, str):
                yield from _tensors(v, (*path, k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _tensors(v, (*path, str(i)))


def wants_slices(obj: object) -> bool:
    direct, params = templates(obj)
    return bool(direct or params)


def load_slices(step_dir: Path, manifest: Manifest, obj: object, *, verify: bool) -> dict[str, Any]:
    """The step as ``ckptd.load`` gives it, but every tensor restored into a DTensor of ``obj``
    read as that rank's slice only (a DTensor of the target's placements)."""
    problems = reading.verify(step_dir) if verify else reading._check_dirs(step_dir, manifest)
    if problems:
        raise reading.CorruptCheckpoint("; ".join(problems))
    direct, params = templates(obj)
    where: dict[_Key, tuple[Path, int, HeaderEntry]] = {}
    ranked: dict[_Key, list[perrank.Block]] = {}  # of per-rank components: each tensor's blocks
    for c in manifest.components:
        if c.sharding == "per-rank":
            ranked.update(((c.name, n), b) for n, b in perrank.blocks(step_dir, c).items())
            ranked.update(
                ((c.name, a), ranked[(c.name, t)]) for a, t in c.aliases.items() if (c.name, t) in ranked
            )
        for shard in c.shards if c.sharding == "consolidated" else ():
            path = step_dir / shard.file
            data_start, entries = _header(path)
            where.update(((c.name, e.name), (path, data_start, e)) for e in entries)
        for alias, target in c.aliases.items():
            if (c.name, target) in where:
                where[(c.name, alias)] = where[(c.name, target)]

    def target_of(component: str, name: str, shape: tuple[int, ...]) -> Any:
        target = direct.get((component, name))
        if target is None and name.startswith("state."):
            fqn = name[len("state.") :].rpartition(".")[0]
            target = params.get((component, fqn))
        if target is not None and tuple(target.shape) != shape:
            target = None  # not laid out like it (a scalar ``step``): read whole, checked later
        return target

    def lookup(component: str, name: str) -> Any:
        blocks = ranked.get((component, name))
        if blocks is not None:
            shape = perrank.shape_of(blocks)
            return _read_blocks(blocks, shape, target_of(component, name, shape))
        found = where.get((component, name))
        if found is None:
            raise reading.CorruptCheckpoint(f"{step_dir}: tensor {component}/{name} missing from the shards")
        return _read(found, target_of(component, name, found[2].shape))

    try:
        out = tree.decode(manifest.tree, lookup)
    except tree.TreeError as e:
        raise reading.CorruptCheckpoint(f"{step_dir}: {e}") from e
    if not isinstance(out, dict):
        raise reading.CorruptCheckpoint(f"{step_dir}: manifest tree is not a dict")
    return out


def _read_blocks(blocks: list[perrank.Block], shape: tuple[int, ...], target: Any) -> torch.Tensor:
    """A tensor of a per-rank component, whole, or the box of it the DTensor ``target`` holds
    (only the rows of the blocks that box overlaps are read)."""
    if target is None:
        return perrank.read_box(blocks, (0,) * len(shape), shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local, offset = compute_local_shape_and_global_offset(
        torch.Size(shape), target.device_mesh, target.placements
    )
    return _dtensor(perrank.read_box(blocks, tuple(offset), tuple(local)), target, shape)


def _dtensor(local: torch.Tensor, target: Any, shape: tuple[int, ...]) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    out: torch.Tensor = DTensor.from_local(
        local.contiguous(),
        target.device_mesh,
        target.placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=torch.empty(shape, device="meta").stride(),
    )
    return out


def _header(path: Path) -> tuple[int, tuple[HeaderEntry, ...]]:
    fd = reading._open_shard(path)
    try:
        size = os.fstat(fd).st_size
        header = decode_header(reading._read_header(fd, size), size, str(path))
    except ShardFormatError as e:
        raise reading.CorruptCheckpoint(str(e)) from e
    finally:
        os.close(fd)
    return header.data_start, header.entries


def _read(found: tuple[Path, int, HeaderEntry], target: Any) -> torch.Tensor:
    """The tensor ``found`` names, whole, or the slice of it the DTensor ``target`` holds."""
    path, data_start, entry = found
    dtype = FROM_SAFETENSORS[entry.dtype]
    shape = entry.shape
    first, rows, local_shape, offset = 0, shape[0] if shape else 1, shape, (0,) * len(shape)
    if target is not None:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local, off = compute_local_shape_and_global_offset(
            torch.Size(shape), target.device_mesh, target.placements
        )
        local_shape, offset = tuple(local), tuple(off)
        first, rows = (offset[0], local_shape[0]) if shape else (0, 1)
        if rows == 0:
            first = 0
    row_shape = shape[1:] if shape else ()
    t = torch.empty((rows, *row_shape) if shape else (), dtype=dtype)
    row_bytes = (entry.end - entry.start) // shape[0] if shape and shape[0] else entry.end - entry.start
    if t.numel():
        fd = reading._open_shard(path)
        try:
            raw = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
            reading._read_into(fd, raw, data_start + entry.start + first * row_bytes, checksum.new(), path)
        except OSError as e:
            raise reading.CorruptCheckpoint(f"{path}: cannot read shard ({e.strerror})") from e
        finally:
            os.close(fd)
    if target is None:
        return t
    for dim in range(1, len(shape)):  # other dimensions split too (a 2-D mesh): narrow them
        if local_shape[dim] != shape[dim]:
            t = t.narrow(dim, offset[dim], local_shape[dim])
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        t.contiguous(),
        target.device_mesh,
        target.placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=torch.empty(shape, device="meta").stride(),
    )
