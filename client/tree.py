"""What a snapshot contains: a user's object flattened into components, tensors and a JSON tree.

``flatten`` accepts an ``nn.Module``, a state dict, an optimizer, or a dict tree of those plus
plain values. Each top-level entry that holds tensors is a component (a bare module is the
component ``model``). Modules keep their state-dict names (so ``model`` loads with Hugging Face),
and so does a top-level state dict (string keys, tensor values): both are one ``$module`` node;
optimizer state is keyed by parameter name (``state.<param fqn>.exp_avg``). Tensors that alias
one another (same storage, offset, shape, strides and dtype, not empty) are stored once and
recorded as aliases. Every tensor is checked on every snapshot, before anything is copied, to
lie inside its storage (a storage can be resized under a view: FSDP frees unsharded parameters
so), and sparse tensors, unstorable dtypes and the names the daemon reserves are refused.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch
from pydantic import JsonValue
from torch import nn

from ckptd.layout import small_file
from ckptd.paths import InvalidName, check_name
from ckptd.torch_dtypes import TO_SAFETENSORS, safetensors_dtype
from client.blocks import Blocks, blocks_of, is_contiguous, is_replicated, local_block
from client.offload import is_offloaded, onloaded_state_dict

_PLAIN = (bool, int, float, str, type(None))
#: Plain values that are their own JSON (floats may be NaN or infinite; subclasses take the long way).
_EXACT_PLAIN = frozenset({bool, int, str, type(None)})
#: Deepest nesting of dicts and lists in a snapshot (JSON parsers stop at a few hundred levels).
MAX_DEPTH = 64
#: Names the daemon refuses (ckptd/daemon/validate.py), refused here before any copy.
RESERVED_COMPONENTS = frozenset({"ckptd"})
RESERVED_TENSOR_NAMES = ("", "__metadata__")


# ptr, shape, stride, dtype, conj bit, neg bit
_Key = tuple[int, torch.Size, tuple[int, ...], torch.dtype, bool, bool]


@dataclass
class Component:
    name: str
    tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # unique, in order
    aliases: dict[str, str] = field(default_factory=dict)
    #: The first stored tensor at each data pointer (the very ``tensors`` entry).
    _first: dict[int, tuple[str, torch.Tensor]] = field(default_factory=dict)
    #: Full alias keys (pointer, shape, strides, dtype), kept only for pointers that two tensors share.
    _seen: dict[_Key, str] = field(default_factory=dict)
    _names: set[str] = field(default_factory=set)
    prefer_dropped: frozenset[str] = frozenset()
    #: Whether any tensor added is on a CUDA device; whether all are in host memory.
    cuda: bool = False
    host: bool = True
    #: A Hugging Face model with a config (laid out as ``save_pretrained`` does), and a module's
    #: parameter count (its index's ``total_parameters``, as transformers counts).
    pretrained: bool = False
    parameters: int | None = None
    #: Of each ``Shard(0)`` DTensor (stored as its local tensor): (global shape, global offset).
    shards: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    #: Of each non-contiguous DTensor (``client.blocks``): every rank's block. A component with
    #: one is stored per rank, its ``Shard(0)`` DTensors too (``finish``); their DTensors:
    blocks: dict[str, Blocks] = field(default_factory=dict)
    _dtensors: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, t: torch.Tensor) -> None:
        # Runs once per tensor per snapshot: only cheap attribute reads on the common path.
        if type(t) is not torch.Tensor and type(t) is not nn.Parameter and is_dtensor(t):
            t = self._local(name, t)
        names = self._names
        if name in names or not t.is_cpu or t.dtype not in TO_SAFETENSORS:
            self._check(name, t)
        names.add(name)
        try:
            # The bytes a copy reads lie inside the storage (exact for a contiguous tensor; the
            # others, and any that fails this, are measured from their strides).
            ptr, storage = t.data_ptr(), t.untyped_storage()
            if ptr + t.nbytes > storage.data_ptr() + storage.nbytes() or not t.is_contiguous():
                self._check_extent(name, t)
        except (RuntimeError, NotImplementedError) as e:  # sparse, or no storage of its own
            ptr = self._storageless(name, t, e)
        if ptr in self._first:
            self._collide(ptr, name, t)
        else:
            entry = (name, t)
            self.tensors.append(entry)
            self._first[ptr] = entry

    def add_all(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        """``add`` each ``(name, tensor)`` in order (a state dict's items)."""
        names, first, tensors, ok = self._names, self._first, self.tensors, TO_SAFETENSORS
        for name, value in items:
            t = value
            if type(t) is not torch.Tensor and type(t) is not nn.Parameter and is_dtensor(t):
                t = self._local(name, t)
            if name in names or not t.is_cpu or t.dtype not in ok:
                self._check(name, t)
            names.add(name)
            try:
                ptr, storage = t.data_ptr(), t.untyped_storage()
                if ptr + t.nbytes > storage.data_ptr() + storage.nbytes() or not t.is_contiguous():
                    self._check_extent(name, t)
            except (RuntimeError, NotImplementedError) as e:
                ptr = self._storageless(name, t, e)
            if ptr in first:
                self._collide(ptr, name, t)
            else:
                entry = (name, t)
                tensors.append(entry)
                first[ptr] = entry

    def _local(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The local tensor of a DTensor: a ``Shard(0)`` one noted in ``shards``; a replicated one
        stored like a plain tensor (every rank holds it whole); any other: its blocks noted."""
        if not is_contiguous(t) and not is_replicated(t):
            local, self.blocks[name] = local_block(f"{self.name}/{name}", t)
            return local
        local, shape, offset = shard_of(f"{self.name}/{name}", t)
        if shape is not None:
            self.shards[name] = (shape, offset)
            self._dtensors[name] = t
        return local

    def _check(self, name: str, t: torch.Tensor) -> None:
        """Raise for a duplicate name, a meta tensor or a dtype safetensors cannot store; note a
        CUDA tensor."""
        if name in self._names:
            raise ValueError(
                f"two tensors would both be named {name!r} in component {self.name!r}; "
                "rename a key so that dotted paths are unique"
            )
        if t.is_meta:
            raise ValueError(
                f"tensor {self.name}/{name} is on the meta device (an offloaded or uninitialised "
                "parameter); onload the model (accelerate) before snapshotting"
            )
        if t.dtype not in TO_SAFETENSORS:
            safetensors_dtype(t.dtype, name)  # raises with the reason
        if t.is_cuda:
            self.cuda = True
        if not t.is_cpu:
            self.host = False

    def _storageless(self, name: str, t: torch.Tensor, error: Exception) -> int:
        """The data pointer of a tensor whose storage cannot be read: an efficient zero tensor
        (nothing to read: torch's copy writes zeros); any other is refused."""
        if t._is_zerotensor():
            return t.data_ptr()
        where = f"tensor {self.name}/{name}"
        if t.layout is not torch.strided:
            raise ValueError(
                f"{where} is a sparse tensor ({t.layout}); safetensors stores dense tensors: "
                "snapshot t.to_dense(), or its parts as separate tensors (COO: t.coalesce() then "
                ".indices() and .values(); CSR/BSR: .crow_indices(), .col_indices(), .values(); "
                "CSC/BSC: .ccol_indices(), .row_indices(), .values())"
            ) from error
        raise ValueError(
            f"{where} (a {type(t).__name__}) has no storage of its own to copy from ({error}); "
            "snapshot a plain tensor (for a DTensor: .to_local() or .full_tensor())"
        ) from error

    def _check_extent(self, name: str, t: torch.Tensor) -> None:
        """Raise unless every byte the view ``t`` reads lies inside its storage: a copy would read
        outside it (a segfault, or foreign bytes in the checkpoint). Zero-element views read none."""
        if t.numel() == 0:
            return
        offset, shape, stride = t.storage_offset(), tuple(t.shape), t.stride()
        low = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True) if s < 0)
        high = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True) if s > 0)
        needed, held = (high + 1) * t.element_size(), t.untyped_storage().nbytes()
        if low >= 0 and needed <= held:
            return
        what = (
            f"tensor {self.name}/{name} (shape {list(shape)}, stride {list(stride)}, storage offset "
            f"{offset}, {t.dtype}) reads {needed} bytes of storage, but its storage holds {held} bytes"
        )
        if held == 0:
            raise ValueError(
                f"{what}: its storage was freed (resized to 0, as FSDP does to unsharded "
                "parameters between forward and backward). Snapshot the state FSDP means: "
                "model.state_dict() of the FSDP module (sharded), or "
                "torch.distributed.checkpoint.state_dict.get_model_state_dict(model), not the "
                "freed parameters"
            )
        raise ValueError(
            f"{what}: the storage was shrunk under the view (untyped_storage().resize_()) or the "
            "view was made past its end; restore the storage's size, or snapshot a tensor that "
            "lies inside its storage"
        )

    def _collide(self, ptr: int, name: str, t: torch.Tensor) -> None:
        """A tensor starting where an earlier one does: an alias iff it has the same shape, strides,
        dtype and lazy conjugate/negative bits (``z.conj()`` shares ``z``'s bytes but not its
        values) and holds elements (zero-element tensors never alias)."""
        first_name, first = self._first[ptr]
        self._seen.setdefault(
            (ptr, first.shape, first.stride(), first.dtype, first.is_conj(), first.is_neg()), first_name
        )
        key = (ptr, t.shape, t.stride(), t.dtype, t.is_conj(), t.is_neg())
        if key in self._seen and t.numel():
            self.aliases[name] = self._seen[key]
            return
        self._seen[key] = name
        self.tensors.append((name, t))

    def finish(self) -> None:
        """Keep the name Hugging Face keeps for tied weights (not the one it declares tied)."""
        if self.blocks and self.shards:  # stored per rank: its Shard(0) DTensors as blocks too
            self.blocks.update((n, blocks_of(f"{self.name}/{n}", self._dtensors[n])) for n in self.shards)
            self.shards.clear()
        self._dtensors.clear()
        for alias, stored in list(self.aliases.items()):
            if stored in self.prefer_dropped and alias not in self.prefer_dropped:
                self.tensors = [(alias if n == stored else n, t) for n, t in self.tensors]
                if stored in self.shards:
                    self.shards[alias] = self.shards.pop(stored)
                if stored in self.blocks:
                    self.blocks[alias] = self.blocks.pop(stored)
                for a, s in self.aliases.items():
                    if s == stored:
                        self.aliases[a] = alias
                del self.aliases[alias]
                self.aliases[stored] = alias


_DTENSOR_TYPES: set[type] = set()


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing it eagerly)."""
    cls = type(t)
    if cls in _DTENSOR_TYPES:
        return True
    found = cls.__name__ == "DTensor" and hasattr(t, "placements") and hasattr(t, "to_local")
    if found:
        _DTENSOR_TYPES.add(cls)
    return found


#: Of each DTensor spec seen (its mesh, placements, global shape, strides and dtype; hashed once
#: by torch): its global shape, this rank's offset and local shape, or None for one held whole.
#: Computing them costs ~0.1 ms of Python per tensor, which every snapshot would pay again.
_LAYOUTS: dict[object, tuple[tuple[int, ...], tuple[int, ...], torch.Size] | None] = {}
_LAYOUTS_MAX = 1 << 16


def shard_of(where: str, t: Any) -> tuple[torch.Tensor, tuple[int, ...] | None, tuple[int, ...]]:
    """A DTensor's (local tensor, global shape, global offset); the shape is None for one every
    rank holds whole (``Replicate`` on every mesh dimension). Only what
    is a contiguous byte range of the full tensor is accepted: ``Shard(0)`` on a 1-D mesh
    (FSDP2's default). The layout of a spec is computed once (``_LAYOUTS``), and the local
    tensor is read without ``to_local()``'s autograd view (the copy reads the same bytes)."""
    spec, local = getattr(t, "_spec", None), getattr(t, "_local_tensor", None)
    if spec is None or not isinstance(local, torch.Tensor):  # not torch's DTensor layout
        spec, local = None, t.to_local()
    try:
        layout = _LAYOUTS[spec] if spec is not None else _layout_of(where, t)
    except KeyError:
        layout = _layout_of(where, t)
        if len(_LAYOUTS) >= _LAYOUTS_MAX:
            _LAYOUTS.clear()
        _LAYOUTS[spec] = layout
    if layout is None:
        return local, None, ()
    shape, offset, local_shape = layout
    if local.shape != local_shape:
        raise ValueError(
            f"tensor {where}: a DTensor whose local tensor has shape {tuple(local.shape)}, not the "
            f"{tuple(local_shape)} its Shard(0) placement gives; snapshot the model's own state dict"
        )
    return local, shape, offset


def _layout_of(where: str, t: Any) -> tuple[tuple[int, ...], tuple[int, ...], torch.Size] | None:
    """A DTensor's global shape, offset and local shape (None: held whole), or raise for a
    placement ckptd cannot write."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements, mesh = tuple(t.placements), t.device_mesh
    if all(isinstance(p, Replicate) for p in placements):
        return None
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(
            f"tensor {where} is a DTensor with placements {placements} on a mesh of shape "
            f"{tuple(mesh.shape)}: ckptd writes sharded tensors straight into consolidated files, "
            "which needs each rank's part to be one contiguous byte range of the full tensor: "
            "Shard(0) on a 1-D mesh (FSDP2's fully_shard default). Other placements (Shard(1), "
            "2-D meshes / HSDP, tensor parallelism) are not supported yet: snapshot a full state "
            "dict instead (torch.distributed.checkpoint.state_dict.get_model_state_dict with "
            "StateDictOptions(full_state_dict=True, cpu_offload=True)), or use "
            "torch.distributed.checkpoint for this model"
        )
    shape = tuple(int(n) for n in t.shape)
    local_shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    if tuple(local_shape[1:]) != shape[1:]:
        raise ValueError(
            f"tensor {where}: a DTensor whose Shard(0) placement gives local shape "
            f"{tuple(local_shape)} of global {shape}; snapshot the model's own state dict"
        )
    return shape, tuple(int(o) for o in offset), torch.Size(local_shape)


@dataclass
class Flat:
    components: list[Component]
    tree: JsonValue
    files: dict[str, str]
    cuda: bool
    host: bool = True  # every tensor is in host memory (its data_ptr() is a CPU address)

    @property
    def sharded(self) -> bool:
        """Whether any tensor is a rank's slice (``Shard(0)``) or block of a DTensor."""
        return any(c.shards or c.blocks for c in self.components)

    def signature(self) -> tuple[object, ...]:
        return tuple(
            (c.name, c.pretrained, c.parameters, tuple((n, t.dtype, tuple(t.shape)) for n, t in c.tensors))
            for c in self.components
        )


def normalize(obj: object) -> dict[str, Any]:
    """The top-level dict of a snapshot: a bare module is ``model``, a bare optimizer
    ``optimizer``, a state dict (a mapping of tensors) ``model``."""
    if isinstance(obj, nn.Module):
        return {"model": obj}
    if isinstance(obj, torch.optim.Optimizer):
        return {"optimizer": obj}
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {"model": obj}
        return dict(obj)
    raise TypeError(
        f"cannot snapshot a {type(obj).__name__}: pass an nn.Module, a state dict, an optimizer, "
        "or a dict of those and plain values"
    )


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector (left off if it was off). It would run many times
    over a possibly huge heap while a snapshot allocates its many small tuples and dicts on the
    training thread; nothing a snapshot allocates makes a cycle, and no tensor is freed by it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def flatten(obj: object) -> Flat:
    with paused_gc():
        return _flatten(obj)


def _flatten(obj: object) -> Flat:
    top = normalize(obj)
    for key in top:
        if not isinstance(key, str):
            raise TypeError(f"top-level keys must be strings, got {key!r}")
    modules = {k: v for k, v in top.items() if isinstance(v, nn.Module)}
    names = param_names(modules)
    components: list[Component] = []
    nodes: dict[str, JsonValue] = {}
    files: dict[str, str] = {}
    for key, value in top.items():
        if isinstance(value, nn.Module):
            comp = _component(key, _tied_names(value))
            # The parameters themselves where state_dict() is torch's: it would detach each one
            # (a dispatch per DTensor: ~0.1 ms each under FSDP2); the copy never records grad.
            keep = type(value).state_dict is nn.Module.state_dict
            state = value.state_dict(keep_vars=True) if keep else value.state_dict()
            if any(t.is_meta for t in state.values() if isinstance(t, torch.Tensor)) and is_offloaded(value):
                state = onloaded_state_dict(value)
            comp.add_all(state.items())
            nodes[key] = {"$module": key, "keys": list(state)}
            module_files = hf_files(value)
            files.update((small_file(key, name), text) for name, text in module_files.items())
            comp.pretrained = bool(module_files)
            comp.parameters = sum(p.numel() for p in value.parameters())
        elif isinstance(value, torch.optim.Optimizer):
            comp = _component(key)
            nodes[key] = _optimizer_node(value, comp, names)
        elif _is_state_dict(value):
            # A plain state dict: stored like a module's (one node for all its tensors, which
            # ``ckptd.tree.decode`` turns back into the same dict), not a node per tensor.
            comp = _component(key)
            comp.add_all(value.items())
            nodes[key] = {"$module": key, "keys": list(value)}
        else:
            comp = _component(key)
            nodes[key] = _encode(value, key, (), comp)
        comp.finish()
        _check_tensor_names(comp)
        if comp.tensors or comp.aliases:
            components.append(comp)
    return Flat(
        components, {"$dict": nodes}, files, any(c.cuda for c in components), all(c.host for c in components)
    )


def _is_state_dict(value: object) -> TypeGuard[Mapping[str, torch.Tensor]]:
    """A non-empty mapping of string keys to tensors."""
    if not isinstance(value, Mapping) or not value:
        return False
    for k, v in value.items():  # noqa: SIM110 (a loop: a third faster than all() on a generator)
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            return False
    return True


def _component(name: str, prefer_dropped: frozenset[str] = frozenset()) -> Component:
    try:
        check_name("component", name)
    except InvalidName as e:
        raise ValueError(f"top-level key {name!r} cannot name a checkpoint component: {e}") from e
    if name in RESERVED_COMPONENTS:
        raise ValueError(
            f"top-level key {name!r} cannot name a checkpoint component: it is reserved for "
            "ckptd's manifest (ckptd.json); rename the key"
        )
    return Component(name, prefer_dropped=prefer_dropped)


def _check_tensor_names(comp: Component) -> None:
    """Refuse the tensor names the daemon refuses (before anything is copied or sent)."""
    for name in RESERVED_TENSOR_NAMES:
        if name in comp._names:
            raise ValueError(
                f"tensor name {name!r} in component {comp.name!r} is reserved (safetensors keeps "
                "its header metadata under '__metadata__', and a tensor needs a name); rename the key"
            )


def _encode(value: object, key: str, path: tuple[str, ...], comp: Component) -> JsonValue:
    if len(path) > MAX_DEPTH:
        raise TypeError(f"{key}/{'.'.join(path[:5])}...: nested deeper than {MAX_DEPTH} levels")
    cls = type(value)
    if cls is not dict and cls is not list:  # (neither is a tensor or a plain value)
        if isinstance(value, torch.Tensor):
            name = ".".join(path) if path else key
            comp.add(name, value)
            return {"$tensor": [comp.name, name]}
        if isinstance(value, _PLAIN):
            if isinstance(value, float) and not math.isfinite(value):
                return {"$float": str(value)}  # JSON has no NaN or infinity
            return value
    # Tensors and exact int/str/bool/None in a container are handled here, without a call and a
    # path tuple each (as the recursion would: a tensor's name is its dotted path). Leaves one
    # level too deep go through the recursion, which raises.
    shallow = len(path) < MAX_DEPTH
    prefix = ".".join(path) + "." if path else ""
    add, cname = comp.add, comp.name
    if cls is dict or (cls is not list and cls is not tuple and isinstance(value, Mapping)):
        out: dict[str, JsonValue] = {}
        for k, v in value.items():  # type: ignore[attr-defined]
            if not isinstance(k, str):
                raise TypeError(f"dict keys in a snapshot must be strings; {key}/{'.'.join(path)} has {k!r}")
            if shallow and isinstance(v, torch.Tensor):
                name = prefix + k
                add(name, v)
                out[k] = {"$tensor": [cname, name]}
            elif shallow and type(v) in _EXACT_PLAIN:
                out[k] = v
            else:
                out[k] = _encode(v, key, (*path, k), comp)
        return {"$dict": out}
    if isinstance(value, list | tuple):
        items: list[JsonValue] = []
        for i, v in enumerate(value):
            if shallow and isinstance(v, torch.Tensor):
                name = prefix + str(i)
                add(name, v)
                items.append({"$tensor": [cname, name]})
            elif shallow and type(v) in _EXACT_PLAIN:
                items.append(v)
            else:
                items.append(_encode(v, key, (*path, str(i)), comp))
        return {"$tuple" if isinstance(value, tuple) else "$list": items}
    if isinstance(value, nn.Module | torch.optim.Optimizer):
        raise TypeError(
            f"{key}/{'.'.join(path)}: modules and optimizers must be top-level entries of the tree"
        )
    raise TypeError(
        f"{key}/{'.'.join(path) or key}: cannot store a {type(value).__name__}; snapshots hold "
        "tensors, modules, optimizers, dicts, lists and int/float/str/bool/None (nothing is pickled)"
    )


def param_names(modules: Mapping[str, nn.Module]) -> dict[int, str]:
    names: dict[int, str] = {}
    for comp, module in modules.items():
        for n, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), n if len(modules) == 1 else f"{comp}.{n}")
    return names


def optimizer_param_order(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _optimizer_node(opt: torch.optim.Optimizer, comp: Component, names: dict[int, str]) -> JsonValue:
    params = optimizer_param_order(opt)
    fqns = [names.get(id(p), str(i)) for i, p in enumerate(params)]
    sd = opt.state_dict()
    state = {fqns[int(i)]: s for i, s in sd["state"].items()}
    groups = [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in sd["param_groups"]]
    return {
        "$optimizer": comp.name,
        "state": _encode(state, comp.name, ("state",), comp),
        "param_groups": _encode(groups, comp.name, ("param_groups",), comp),
    }


def _tied_names(module: nn.Module) -> frozenset[str]:
    """Names Hugging Face declares tied (and drops when saving): kept only as aliases."""
    tied = getattr(module, "all_tied_weights_keys", None) or getattr(module, "_tied_weights_keys", None)
    if isinstance(tied, Mapping):
        return frozenset(str(k) for k in tied)
    if isinstance(tied, list | tuple | set):
        return frozenset(str(k) for k in tied)
    return frozenset()


def hf_files(module: nn.Module) -> dict[str, str]:
    """``config.json`` (and ``generation_config.json``) as ``save_pretrained`` writes them."""
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "to_diff_dict"):
        return {}
    d = config.to_diff_dict()
    d["architectures"] = [type(module).__name__]
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        d["dtype"] = str(dtype).removeprefix("torch.")
    files = {"config.json": json.dumps(d, indent=2, sort_keys=True) + "\n"}
    gen = getattr(module, "generation_config", None)
    can_generate = getattr(module, "can_generate", None)
    if gen is not None and callable(can_generate) and can_generate():
        files["generation_config.json"] = gen.to_json_string(use_diff=True)
    return files
