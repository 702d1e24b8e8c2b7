"""Restoring a checkpoint in place into the objects a user snapshotted."""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping, MutableSequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckptd import paths, reading, safeio
from ckptd.manifest import read_manifest
from client import fit, reshard
from client.errors import CheckpointError
from client.offload import is_offloaded, load_offloaded_state_dict
from client.tree import normalize, optimizer_param_order, param_names

log = logging.getLogger(__name__)


def restore_run(obj: object, run_dir: Path, *, step: int | None, fallback: bool, verify: bool = True) -> int:
    """Load step ``step`` (None: the newest that verifies, or only the newest unless ``fallback``)
    of the run in ``run_dir`` into ``obj``; returns the step. Nothing is changed on failure.
    Into sharded state (DTensors) only this rank's slices are read (``client.reshard``), the
    step verified first unless ``verify`` is False (another rank verified it)."""
    sliced = reshard.wants_slices(obj)
    if step is not None:
        candidates = [run_dir / paths.step_dirname(step)]
    else:
        candidates = reading.candidates(run_dir)[: None if fallback else 1]
    refused: CheckpointError | None = None
    for i, step_dir in enumerate(candidates):
        later = "; trying an older step" if i + 1 < len(candidates) else ""
        try:
            found = safeio.lstat_kind(step_dir)
            if found not in ("a directory", None):  # ckptd never makes one; a link is not followed
                raise reading.CorruptCheckpoint(f"{step_dir} is {found}, not a checkpoint directory")
            manifest = read_manifest(step_dir)
            if sliced:
                loaded = reshard.load_slices(step_dir, manifest, obj, verify=verify)
            else:
                loaded = reading.load_manifest(step_dir, manifest)
        except reading.CorruptCheckpoint as e:  # ManifestError too: every damaged step, no more
            if step is not None or not fallback:
                raise CheckpointError(f"cannot restore {step_dir}: {e}", code="corrupt") from e
            log.warning("skipping %s: %s%s", step_dir, e, later)
            continue
        try:
            apply(obj, loaded)  # checks all of it against the objects before changing any
        except CheckpointError as e:
            if e.code != "restore_mismatch":
                raise
            error = CheckpointError(f"cannot restore {step_dir}: {e}", code="restore_mismatch")
            if step is not None or not fallback:
                raise error from e
            log.warning("skipping %s: it does not fit the objects restored into: %s%s", step_dir, e, later)
            refused = refused or error
            continue
        return manifest.step  # read_manifest checked it is the step its directory is named for
    if refused is not None:  # e.g. every step is of another model: say why the newest did not fit
        raise CheckpointError(
            f"no committed checkpoint in {run_dir} fits the objects restored into; {refused}",
            code="restore_mismatch",
        ) from refused
    raise CheckpointError(f"no committed checkpoint that verifies in {run_dir}", code="not_found")


def apply(obj: object, loaded: Mapping[str, Any]) -> None:
    """Load ``loaded`` (from ``ckptd.load``) into ``obj``: modules, optimizers and dict trees in
    place (tensors copied into the existing ones), plain values set on the dicts that hold them."""
    top = normalize(obj)
    missing = [k for k in top if k not in loaded]
    if missing:
        raise CheckpointError(
            f"checkpoint has no {missing}; it holds {sorted(loaded)}", code="restore_mismatch"
        )
    modules = {k: v for k, v in top.items() if isinstance(v, nn.Module)}
    names = param_names(modules)
    optimizer_states = {}
    for key, target in top.items():  # everything is checked before anything is changed
        value = loaded[key]
        if isinstance(target, nn.Module):
            fit.check_module(key, target, value)
        elif isinstance(target, torch.optim.Optimizer):
            fit.check_optimizer_saved(key, value)
            optimizer_states[key] = _optimizer_state(target, value, names)
            _check_optimizer_tensors(key, target, optimizer_states[key])
        else:
            fit.check_value(key, target, value)
    for key, target in top.items():
        value = loaded[key]
        if isinstance(target, nn.Module):
            if is_offloaded(target):
                load_offloaded_state_dict(target, value)
            else:
                target.load_state_dict(value)
        elif isinstance(target, torch.optim.Optimizer):
            target.load_state_dict(optimizer_states[key])
        elif isinstance(obj, MutableMapping) and obj.get(key) is target:  # obj is the tree itself
            obj[key] = _merge(target, value, key)
        else:
            _merge(target, value, key)


def _check_optimizer_tensors(key: str, opt: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Saved per-parameter state has the shapes of the state this optimizer already holds."""
    params = optimizer_param_order(opt)
    for i, saved in state["state"].items():
        current = opt.state.get(params[i])
        if current:
            fit.check_value(f"{key}.state.{i}", dict(current), saved)


def _merge(target: Any, value: Any, where: str) -> Any:
    """Copy ``value`` into ``target`` where ``target`` can be updated in place; returns what the
    container should now hold."""
    if isinstance(target, torch.Tensor) and isinstance(value, torch.Tensor):
        if target.shape != value.shape:
            raise CheckpointError(
                f"{where}: checkpoint tensor has shape {tuple(value.shape)}, target {tuple(target.shape)}",
                code="restore_mismatch",
            )
        with torch.no_grad():
            target.copy_(value)
        return target
    if isinstance(target, MutableMapping) and isinstance(value, Mapping):
        for k, v in value.items():
            target[k] = _merge(target[k], v, f"{where}.{k}") if k in target else v
        return target
    if isinstance(target, MutableSequence) and isinstance(value, list) and len(target) == len(value):
        for i, v in enumerate(value):
            target[i] = _merge(target[i], v, f"{where}.{i}")
        return target
    return value


def _optimizer_state(
    opt: torch.optim.Optimizer, saved: Mapping[str, Any], names: dict[int, str]
) -> dict[str, Any]:
    """Turn name-keyed optimizer state back into torch's index-keyed form for ``opt``."""
    params = optimizer_param_order(opt)
    fqns = [names.get(id(p), str(i)) for i, p in enumerate(params)]
    index = {fqn: i for i, fqn in enumerate(fqns)}
    saved_groups = saved["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise CheckpointError(
            f"checkpoint optimizer has {len(saved_groups)} param groups, this one {len(opt.param_groups)}",
            code="restore_mismatch",
        )
    groups = []
    pos = 0
    for i, (sg, cg) in enumerate(zip(saved_groups, opt.param_groups, strict=True)):
        current = fqns[pos : pos + len(cg["params"])]
        pos += len(cg["params"])
        if sorted(sg["params"]) != sorted(current):
            only_saved = sorted(set(sg["params"]) - set(current))[:5]
            only_here = sorted(set(current) - set(sg["params"]))[:5]
            raise CheckpointError(
                f"param group {i} differs: only in checkpoint {only_saved}, only here {only_here}",
                code="restore_mismatch",
            )
        groups.append({**sg, "params": [index[f] for f in current]})
    state = {index[fqn]: s for fqn, s in saved["state"].items() if fqn in index}
    return {"state": state, "param_groups": groups}
