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
with ``from_pretrained``: the step directory for ``model``, ``step_dir/model_1`` for the next),
writes ``output_dir/ckptd_checkpoint.json`` (root, run, step: where the
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from client import restore as restore_mod
from client.client import Client
from client.errors import CheckpointError
from client.handle import SnapshotHandle
from client.integrations import load_step
from client.offload import is_offloaded, load_offloaded_state_dict, onloaded_state_dict

__all__ = [
    "CkptdSaveState",
    "is_offloaded",
    "load_offloaded_state_dict",
    "onloaded_state_dict",
    "register_ckptd",
    "snapshot_view",
]
log = logging.getLogger(__name__)
POINTER = "ckptd_checkpoint.json"
_TRAILING_INT = re.compile(r"(\d+)$")


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
        # accelerate removes its oldest checkpoint directories past total_limit (with automatic
        # naming only): ckptd's retention removes their steps likewise (committed ones only).
        project = self.accelerator.project_configuration
        keep_last = project.total_limit if project.automatic_checkpoint_naming else None
        handle = self.client.snapshot(tree, step=step, run=self.run, keep_last=keep_last)
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
