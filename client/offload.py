"""Models whose parameters accelerate offloaded (``cpu_offload``, ``disk_offload``,
``dispatch_model`` with ``"cpu"``/``"disk"`` in the device map).

Their offloaded parameters sit on the meta device; the real values live in the hooks'
``weights_map`` (CPU memory or an offload folder). Snapshots onload them through accelerate's own
``align_module_device``, one submodule at a time; restores write back into the offloaded copies.
accelerate is imported only when a model actually has meta tensors.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from client.errors import CheckpointError


def is_offloaded(module: nn.Module) -> bool:
    """Whether any submodule has parameters offloaded by an accelerate hook."""
    if not any(p.device.type == "meta" for p in itertools.chain(module.parameters(), module.buffers())):
        return False  # the common case, without importing accelerate
    from accelerate.utils.modeling import has_offloaded_params

    return any(has_offloaded_params(m) for m in module.modules())


def onloaded_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every offloaded tensor onloaded to the CPU.

    Entries that are not offloaded are returned as ``state_dict()`` has them (on their device);
    each submodule with offloaded parameters is onloaded in turn with accelerate's
    ``align_module_device(submodule, "cpu")`` (which reads the hook's ``weights_map``: CPU memory or
    the offload folder) and its own tensors are taken; the module is offloaded again right after.
    Tensors that share a weights-map entry (tied weights of ``cpu_offload``) stay shared.

    Raises ``ValueError`` when a tensor is still on the meta device (a parameter that was never
    materialised and has no offloaded copy).
    """
    from accelerate.utils.modeling import align_module_device, has_offloaded_params

    state = module.state_dict()
    if not any(t.device.type == "meta" for t in state.values()):
        return state
    for prefix, sub in module.named_modules(remove_duplicate=False):
        if not has_offloaded_params(sub):
            continue
        with align_module_device(sub, torch.device("cpu")):
            # Keys without a dot are the submodule's own parameters and buffers (children are
            # "child.name"); its children stay offloaded and are visited on their own.
            for key, t in sub.state_dict().items():
                if "." not in key:
                    name = f"{prefix}.{key}" if prefix else key
                    if name in state and state[name].device.type == "meta":
                        state[name] = t
    still = [k for k, t in state.items() if t.device.type == "meta"]
    if still:
        raise ValueError(
            f"{len(still)} tensors are on the meta device without an offloaded copy to onload: {still[:5]}"
        )
    return state


def load_offloaded_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state)`` for a module with offloaded parameters, in place.

    (``load_state_dict`` itself only warns and copies nothing into meta parameters.) Offloaded
    tensors are written where the hook's ``weights_map`` keeps them: CPU tensors (``cpu_offload``,
    ``"cpu"`` in a device map) are copied into in place, and ``.dat`` files of an offload folder
    (``disk_offload``, ``"disk"``) are rewritten through a memory map. Tensors that are read from
    the model's own safetensors files (``from_pretrained(..., offload_folder=...)``) are refused.
    Every key of the module's state dict must be in ``state`` (``KeyError`` otherwise).
    """
    from accelerate.utils.modeling import has_offloaded_params

    with torch.no_grad():
        current = module.state_dict()
        for name, t in current.items():
            if t.device.type != "meta":
                _copy_checked(t, state[name], name)
        for prefix, sub in module.named_modules(remove_duplicate=False):
            if not has_offloaded_params(sub):
                continue
            weights_map: Any = sub._hf_hook.weights_map
            for key, t in sub.state_dict().items():
                if "." in key or t.device.type != "meta":
                    continue
                name = f"{prefix}.{key}" if prefix else key
                _write_offloaded(weights_map, key, state[name], name)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise CheckpointError(
            f"{name}: checkpoint tensor has shape {tuple(src.shape)}, model {tuple(dst.shape)}",
            code="restore_mismatch",
        )
    dst.copy_(src)


def _write_offloaded(weights_map: Any, key: str, value: torch.Tensor, name: str) -> None:
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    dataset, full = weights_map, key
    if isinstance(weights_map, PrefixedDataset):
        dataset, full = weights_map.dataset, f"{weights_map.prefix}{key}"
    if isinstance(dataset, OffloadedWeightsLoader):
        if full in dataset.state_dict:
            _copy_checked(dataset.state_dict[full], value, name)
            return
        info = dataset.index[full]
        if info.get("safetensors_file") is not None or dataset.save_folder is None:
            raise CheckpointError(
                f"{name} is offloaded to the model's own file {info.get('safetensors_file')}; "
                "ckptd does not overwrite it: load the checkpoint before offloading",
                code="restore_mismatch",
            )
        _write_dat(os.path.join(dataset.save_folder, f"{full}.dat"), info, value, name)
        return
    target = dataset[full]
    if not isinstance(target, torch.Tensor) or target.device.type == "meta":
        raise CheckpointError(f"{name}: cannot write to its offloaded copy", code="restore_mismatch")
    _copy_checked(target, value, name)


def _write_dat(path: str, info: Mapping[str, Any], value: torch.Tensor, name: str) -> None:
    """Rewrite an accelerate offload ``.dat`` file (the layout of ``offload_weight``)."""
    import numpy as np

    shape = tuple(info["shape"])
    if tuple(value.shape) != shape:
        raise CheckpointError(
            f"{name}: checkpoint tensor has shape {tuple(value.shape)}, offloaded {shape}",
            code="restore_mismatch",
        )
    dtype = getattr(torch, str(info["dtype"]))
    raw = value.detach().to("cpu", dtype).contiguous().reshape(-1)
    if dtype == torch.bfloat16:
        raw = raw.view(torch.int16)  # as offload_weight stores it: numpy has no bfloat16
    elif str(info["dtype"]).startswith("float8_"):
        raw = raw.view(torch.int8)
    mm = np.memmap(path, dtype=raw.numpy().dtype, shape=(max(raw.numel(), 1),), mode="r+")
    mm[: raw.numel()] = raw.numpy()
    mm.flush()
    del mm
