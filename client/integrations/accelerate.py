"""ckptd for Hugging Face accelerate: ``Accelerator.save_state`` and offloaded models.

>>> accelerator = Accelerator()                                            # doctest: +SKIP
>>> model, optimizer = accelerator.prepare(model, optimizer)               # doctest: +SKIP
>>> ckpt = register_ckptd(accelerator, Client.connect())                   # doctest: +SKIP
>>> accelerator.save_state("ckpts/step_500")   # model weights go to ckptd, step 500  # doctest: +SKIP
>>> accelerator.load_state("ckpts/step_500")   # model weights come back from ckptd  # doctest: +SKIP

**save_state.** ``Accelerator.save_state`` builds ``weights`` (the models' state dicts), then calls
every hook registered with ``register_save_state_pre_hook(hook)`` as ``hook(models, weights,
output_dir)``, then ``save_accelerator_state`` writes what is left in ``weights`` as
``model.safetensors``, ``model_1.safetensors``, ... . The hook of ``register_ckptd`` snapshots
the models to ckptd (``model``, ``model_1``, ... components; a Hugging Face model's component loads
with ``from_pretrained``), writes ``output_dir/ckptd_checkpoint.json`` (root, run, step: where the
weights went) and empties ``weights``, so accelerate writes no model weights and ``save_state``
does not wait for them. The optimizer, scheduler, sampler, RNG and custom states are still written
by accelerate itself (the hook does not receive them). The load hook (``register_load_state_pre_hook``,
``hook(models, input_dir)``) reads ``ckptd_checkpoint.json``, waits for that snapshot if it is still
in flight, loads the models and empties ``models``, so accelerate does not look for weight files.
Not for FSDP, DeepSpeed or Megatron-LM (accelerate saves those models itself and passes no weights).

**Offloaded models.** ``cpu_offload``, ``disk_offload`` and ``dispatch_model`` with ``"cpu"`` or
``"disk"`` in the device map leave offloaded parameters on the meta device, which a snapshot
refuses. ``onloaded_state_dict(module)`` onloads them with accelerate's ``align_module_device``
(one module at a time, to the CPU) and returns a state dict of real tensors; the save hook uses it
for offloaded models. ``load_offloaded_state_dict(module, state)`` is the way back: it writes
into the offloaded copies (CPU tensors in place, ``.dat`` files of the offload folder), which
``load_state_dict`` cannot do (it warns and copies nothing into meta parameters); the load hook
uses it for offloaded models.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils.modeling import align_module_device, has_offloaded_params
from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset
from torch import nn

from client import restore as restore_mod
from client.client import Client
from client.errors import CheckpointError
from client.handle import SnapshotHandle
from client.integrations import load_step

log = logging.getLogger(__name__)
POINTER = "ckptd_checkpoint.json"
_TRAILING_INT = re.compile(r"(\d+)$")


def is_offloaded(module: nn.Module) -> bool:
    """Whether any submodule has parameters offloaded by an accelerate hook."""
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


def snapshot_view(module: nn.Module) -> nn.Module | dict[str, torch.Tensor]:
    """What to snapshot for ``module``: the module itself, or its onloaded state dict when
    accelerate offloaded some of its parameters."""
    return onloaded_state_dict(module) if is_offloaded(module) else module


class CkptdSaveState:
    """The save/load hooks of ``register_ckptd``; ``handles`` maps each ``output_dir`` (absolute)
    to its snapshot's handle."""

    def __init__(
        self,
        accelerator: Accelerator,
        client: Client,
        *,
        run: str | None = None,
        step: Callable[[str], int] | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.client = client
        self.run = run or client.run
        self.step = step or self._default_step
        self.handles: dict[str, SnapshotHandle] = {}
        self._removers: list[Any] = []

    def _default_step(self, output_dir: str) -> int:
        """The number that ends ``output_dir``'s name (``checkpoint_3``, ``step-500``), else
        ``accelerator.save_iteration``."""
        m = _TRAILING_INT.search(os.path.basename(os.path.normpath(output_dir)))
        return int(m.group(1)) if m else int(self.accelerator.save_iteration)

    def register(self) -> CkptdSaveState:
        self._removers = [
            self.accelerator.register_save_state_pre_hook(self.save_hook),
            self.accelerator.register_load_state_pre_hook(self.load_hook),
        ]
        return self

    def remove(self) -> None:
        """Unregister both hooks: ``save_state`` writes the weights itself again."""
        for r in self._removers:
            r.remove()
        self._removers = []

    def save_hook(
        self, models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str
    ) -> None:
        if not weights:
            if models:
                log.warning("accelerate passed no weights (FSDP/DeepSpeed?): it saves the models itself")
            return
        if len(weights) != len(models):
            raise CheckpointError(
                f"accelerate passed {len(weights)} state dicts for {len(models)} models",
                code="restore_mismatch",
            )
        step = self.step(output_dir)
        tree: dict[str, Any] = {
            _key(i): snapshot_view(self.accelerator.unwrap_model(m)) for i, m in enumerate(models)
        }
        handle = self.client.snapshot(tree, step=step, run=self.run)
        _write_json(
            Path(output_dir) / POINTER,
            {"root": str(self.client.root), "run": self.run, "step": step, "models": len(models)},
        )
        self.handles[os.path.abspath(output_dir)] = handle
        weights.clear()  # accelerate writes no model.safetensors

    def load_hook(self, models: list[nn.Module], input_dir: str) -> None:
        pointer = Path(input_dir) / POINTER
        if not pointer.exists():
            return  # not a ckptd save: accelerate loads its own files
        info = json.loads(pointer.read_text())
        pending = self.handles.get(os.path.abspath(input_dir))
        if pending is not None:
            pending.wait()
        if Path(info["root"]) != self.client.root:
            raise CheckpointError(
                f"{pointer} names root {info['root']}, this client's daemon writes to {self.client.root}",
                code="root_mismatch",
            )
        _, _, loaded = load_step(self.client, run=str(info["run"]), step=int(info["step"]))
        for i, m in enumerate(models):
            target = self.accelerator.unwrap_model(m)
            if is_offloaded(target):
                load_offloaded_state_dict(target, loaded[_key(i)])
            else:
                restore_mod.apply({"model": target}, {"model": loaded[_key(i)]})
        models.clear()  # accelerate loads no weight files

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every snapshot taken so far is durable; raises the first failure."""
        for h in list(self.handles.values()):
            h.wait(timeout)


def register_ckptd(
    accelerator: Accelerator,
    client: Client,
    *,
    run: str | None = None,
    step: Callable[[str], int] | None = None,
) -> CkptdSaveState:
    """Make ``accelerator.save_state``/``load_state`` hand the model weights to/from ckptd.

    ``step(output_dir) -> int`` names the ckptd step of a save (default: the number ending
    ``output_dir``'s name, else ``accelerator.save_iteration``); ``run`` defaults to the client's.
    """
    return CkptdSaveState(accelerator, client, run=run, step=step).register()


def _key(i: int) -> str:
    return "model" if i == 0 else f"model_{i}"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
