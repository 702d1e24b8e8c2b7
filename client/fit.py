"""Whether a loaded checkpoint fits the objects it is restored into, checked before any is changed.

``restore`` applies a step only after the whole of it has been checked here: a manifest tree that
was damaged (and resealed), or a checkpoint of other objects, is refused with nothing changed.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import nn

from client.errors import CheckpointError


def mismatch(message: str) -> CheckpointError:
    return CheckpointError(message, code="restore_mismatch")


def check_module(key: str, target: nn.Module, value: Any) -> None:
    """What ``load_state_dict(strict=True)`` needs: the same keys, tensors of the same shapes
    (offloaded parameters have their shapes on the meta device)."""
    check_state_dict(key, target.state_dict(), value, exact=True)


def check_state_dict(key: str, target: Mapping[str, Any], value: Any, *, exact: bool) -> None:
    if not isinstance(value, Mapping):
        raise mismatch(f"{key}: the checkpoint holds a {type(value).__name__}, not a state dict")
    missing = sorted(k for k in target if k not in value)
    extra = sorted(str(k) for k in value if k not in target)
    if exact and (missing or extra):
        raise mismatch(
            f"{key}: state dict keys differ: missing from the checkpoint {missing[:5]}, "
            f"only in the checkpoint {extra[:5]} ({len(missing)} and {len(extra)} in all)"
        )
    for name, t in target.items():
        if name in value:
            check_value(f"{key}.{name}", t, value[name])


def check_value(where: str, target: Any, value: Any) -> None:
    """A dict tree: a tensor only from a tensor of its shape, a dict only from a dict."""
    if isinstance(target, torch.Tensor):
        if not isinstance(value, torch.Tensor):
            raise mismatch(f"{where}: the checkpoint holds a {type(value).__name__}, not a tensor")
        if target.shape != value.shape:
            raise mismatch(
                f"{where}: size mismatch: checkpoint tensor has shape {tuple(value.shape)}, "
                f"target {tuple(target.shape)}"
            )
    elif isinstance(target, MutableMapping):
        if not isinstance(value, Mapping):
            raise mismatch(f"{where}: the checkpoint holds a {type(value).__name__}, not a dict")
        for k, v in value.items():
            if k in target:
                check_value(f"{where}.{k}", target[k], v)
    elif isinstance(target, list) and isinstance(value, list) and len(target) == len(value):
        for i, (t, v) in enumerate(zip(target, value, strict=True)):
            check_value(f"{where}.{i}", t, v)


def check_optimizer_saved(key: str, saved: Any) -> None:
    """The structure ``_optimizer_state`` reads: ``state`` a dict of dicts keyed by parameter
    name, ``param_groups`` a list of dicts with a list of parameter names."""
    if not isinstance(saved, Mapping):
        raise mismatch(f"{key}: the checkpoint holds a {type(saved).__name__}, not an optimizer state")
    state, groups = saved.get("state"), saved.get("param_groups")
    if not isinstance(state, Mapping) or not all(isinstance(s, Mapping) for s in state.values()):
        raise mismatch(f"{key}.state: not a dict of per-parameter dicts ({type(state).__name__})")
    if not isinstance(groups, list):
        raise mismatch(f"{key}.param_groups: not a list ({type(groups).__name__})")
    for i, g in enumerate(groups):
        params = g.get("params") if isinstance(g, Mapping) else None
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise mismatch(f"{key}.param_groups.{i}: not a dict with a list of parameter names")
