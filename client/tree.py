"""What a snapshot contains: a user's object flattened into components, tensors and a JSON tree.

``flatten`` accepts an ``nn.Module``, a state dict, an optimizer, or a dict tree of those plus
plain values. Each top-level entry that holds tensors is a component (a bare module is the
component ``model``). Modules keep their state-dict names (so ``model`` loads with Hugging Face);
optimizer state is keyed by parameter name (``state.<param fqn>.exp_avg``). Tensors that alias
one another (same storage, offset, shape and strides) are stored once and recorded as aliases.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import JsonValue
from torch import nn

from ckptd.paths import InvalidName, check_name
from ckptd.torch_dtypes import TO_SAFETENSORS, safetensors_dtype
from client.offload import is_offloaded, onloaded_state_dict

_PLAIN = (bool, int, float, str, type(None))
#: Deepest nesting of dicts and lists in a snapshot (JSON parsers stop at a few hundred levels).
MAX_DEPTH = 64


@dataclass
class Component:
    name: str
    tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # unique, in order
    aliases: dict[str, str] = field(default_factory=dict)
    _seen: dict[tuple[int, torch.Size, tuple[int, ...], torch.dtype], str] = field(default_factory=dict)
    _names: set[str] = field(default_factory=set)
    prefer_dropped: frozenset[str] = frozenset()

    def add(self, name: str, t: torch.Tensor) -> None:
        # Runs once per tensor per snapshot: only cheap attribute reads on the common path.
        if name in self._names:
            raise ValueError(
                f"two tensors would both be named {name!r} in component {self.name!r}; "
                "rename a key so that dotted paths are unique"
            )
        self._names.add(name)
        if t.is_meta:
            raise ValueError(
                f"tensor {self.name}/{name} is on the meta device (an offloaded or uninitialised "
                "parameter); onload the model (accelerate) before snapshotting"
            )
        if t.dtype not in TO_SAFETENSORS:
            safetensors_dtype(t.dtype, name)  # raises with the reason
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype)
        if key in self._seen and t.numel():
            self.aliases[name] = self._seen[key]
            return
        self._seen[key] = name
        self.tensors.append((name, t))

    def finish(self) -> None:
        """Keep the name Hugging Face keeps for tied weights (not the one it declares tied)."""
        for alias, stored in list(self.aliases.items()):
            if stored in self.prefer_dropped and alias not in self.prefer_dropped:
                self.tensors = [(alias if n == stored else n, t) for n, t in self.tensors]
                for a, s in self.aliases.items():
                    if s == stored:
                        self.aliases[a] = alias
                del self.aliases[alias]
                self.aliases[stored] = alias


@dataclass
class Flat:
    components: list[Component]
    tree: JsonValue
    files: dict[str, str]
    cuda: bool

    def signature(self) -> tuple[object, ...]:
        return tuple(
            (c.name, tuple((n, t.dtype, tuple(t.shape)) for n, t in c.tensors)) for c in self.components
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


def flatten(obj: object) -> Flat:
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
            state = value.state_dict()
            if is_offloaded(value):
                state = onloaded_state_dict(value)
            for name, t in state.items():
                comp.add(name, t)
            nodes[key] = {"$module": key, "keys": list(state)}
            if not files:
                files = hf_files(value)
        elif isinstance(value, torch.optim.Optimizer):
            comp = _component(key)
            nodes[key] = _optimizer_node(value, comp, names)
        else:
            comp = _component(key)
            nodes[key] = _encode(value, key, (), comp)
        comp.finish()
        if comp.tensors or comp.aliases:
            components.append(comp)
    cuda = any(t.is_cuda for c in components for _, t in c.tensors)
    return Flat(components, {"$dict": nodes}, files, cuda)


def _component(name: str, prefer_dropped: frozenset[str] = frozenset()) -> Component:
    try:
        check_name("component", name)
    except InvalidName as e:
        raise ValueError(f"top-level key {name!r} cannot name a checkpoint component: {e}") from e
    return Component(name, prefer_dropped=prefer_dropped)


def _encode(value: object, key: str, path: tuple[str, ...], comp: Component) -> JsonValue:
    if len(path) > MAX_DEPTH:
        raise TypeError(f"{key}/{'.'.join(path[:5])}...: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, torch.Tensor):
        name = ".".join(path) if path else key
        comp.add(name, value)
        return {"$tensor": [comp.name, name]}
    if isinstance(value, _PLAIN):
        if isinstance(value, float) and not math.isfinite(value):
            return {"$float": str(value)}  # JSON has no NaN or infinity
        return value
    if isinstance(value, Mapping):
        out: dict[str, JsonValue] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"dict keys in a snapshot must be strings; {key}/{'.'.join(path)} has {k!r}")
            out[k] = _encode(v, key, (*path, k), comp)
        return {"$dict": out}
    if isinstance(value, list | tuple):
        items = [_encode(v, key, (*path, str(i)), comp) for i, v in enumerate(value)]
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
