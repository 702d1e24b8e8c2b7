"""The benchmark's workloads, built fast with random values (no download, no weight init).

- ``qwen``: a decoder shaped like Qwen2-0.5B (hidden 896, 24 layers, 14 heads, 2 kv heads,
  intermediate 4864, vocab 151936, tied embeddings), random bf16 weights: 1.26 GB in the state
  dict (290 tensors plus the tied ``lm_head.weight``), 0.99 GB of unique bytes.
- ``qwen_adamw``: the same model plus its AdamW state after one step (exp_avg, exp_avg_sq in bf16).
- ``small``: 20,000 fp32 tensors of 256 elements, to measure per-tensor overhead.

The model is constructed on the meta device, materialized with ``to_empty`` and filled by copying
slices of one random pool (the cost is the first touch of the pages, not random number generation).
``quick=True`` builds tiny versions of the three for the test suite.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bench.names import WORKLOADS

log = logging.getLogger(__name__)

_POOL_ELEMS = 1 << 22


@dataclass
class Workload:
    """Live training state, and the forms each system is given it in."""

    name: str
    description: str
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # the ``small`` workload

    def ckptd_obj(self) -> object:
        """What a trainer hands to ``Client.snapshot``."""
        if self.model is None:
            return self.tensors
        if self.optimizer is None:
            return {"model": self.model}
        return {"model": self.model, "optimizer": self.optimizer}

    def state_dict(self) -> dict[str, object]:
        """What a trainer hands to ``torch.save`` and ``torch.distributed.checkpoint``."""
        if self.model is None:
            return dict(self.tensors)
        out: dict[str, object] = {"model": self.model.state_dict()}
        if self.optimizer is not None:
            out["optimizer"] = self.optimizer.state_dict()
        return out

    def safetensors_files(self) -> dict[str, dict[str, torch.Tensor]]:
        """One flat dict of unshared tensors per file (``save_file`` refuses shared tensors):
        the model without its tied duplicate, as ``save_pretrained`` stores it."""
        if self.model is None:
            return {"tensors": dict(self.tensors)}
        files = {"model": model_tensors(self.model)}
        if self.optimizer is not None:
            files["optimizer"] = optimizer_tensors(self.model, self.optimizer)
        return files

    def unique_tensors(self) -> list[torch.Tensor]:
        """Every tensor once (tied and aliased ones once): the bytes every system must move."""
        return [t for f in self.safetensors_files().values() for t in f.values()]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.unique_tensors())

    @property
    def model_nbytes(self) -> int:
        if self.model is None:
            return self.nbytes
        return sum(t.numel() * t.element_size() for t in model_tensors(self.model).values())


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied duplicates dropped (the name ``save_pretrained`` drops goes)."""
    dropped = set(getattr(model, "_tied_weights_keys", None) or ())  # a dict or list of names
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    items = sorted(model.state_dict().items(), key=lambda kv: kv[0] in dropped)
    for name, t in items:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.contiguous()
    return dict(sorted(out.items()))


def optimizer_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """``state.<param name>.<key>`` for every tensor of the optimizer state."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for p, state in opt.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"state.{names[id(p)]}.{key}"] = value
    return out


def build(
    name: str, *, quick: bool = False, device: str = "cpu", adamw_layers: int | None = None
) -> Workload:
    """Build workload ``name`` (see the module docstring) with deterministic random values."""
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    if name == "small":
        count, numel = (200, 256) if quick else (20_000, 256)
        flat = torch.randn(count * numel, generator=gen).to(device)
        tensors = {f"t.{i:05d}": flat[i * numel : (i + 1) * numel].clone() for i in range(count)}
        wl = Workload(name, f"{count} fp32 tensors of {numel} elements", tensors=tensors)
    elif name in ("qwen", "qwen_adamw"):
        layers = adamw_layers if (name == "qwen_adamw" and adamw_layers) else None
        fill = RandomFill(gen)
        model = qwen_model(quick=quick, device=device, layers=layers, fill=fill)
        desc = f"Qwen2-0.5B-shaped decoder, {_layers(model)} layers, random bf16"
        wl = Workload(name, desc, model=model)
        if name == "qwen_adamw":
            wl.optimizer = adamw_after_one_step(model, fill)
            wl.description = desc + " + AdamW state after one step"
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")
    log.info(
        "built %s (%s): %.3f GB, %d tensors, in %.1fs",
        name,
        wl.description,
        wl.nbytes / 1e9,
        len(wl.unique_tensors()),
        time.perf_counter() - started,
    )
    return wl


def qwen_model(*, quick: bool, device: str, layers: int | None, fill: RandomFill) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # hidden, layers, heads, kv heads, intermediate, vocab
    dims = (64, 2, 4, 2, 128, 1000) if quick else (896, 24, 14, 2, 4864, 151936)
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    shape: dict[str, Any] = dict(zip((*keys, "intermediate_size", "vocab_size"), dims, strict=True))
    if layers:
        shape["num_hidden_layers"] = layers
    config = Qwen2Config(**shape, tie_word_embeddings=True, max_position_embeddings=4096)
    with torch.device("meta"):
        model: nn.Module = Qwen2ForCausalLM(config)
    model = model.to(dtype=torch.bfloat16).to_empty(device=device)
    model.tie_weights()  # type: ignore[operator]  # a PreTrainedModel method
    with torch.no_grad():
        fill(list(model.parameters()))
    for buf in model.buffers():  # rotary inv_freq: any finite values do for checkpointing
        buf.fill_(1.0)
    model.requires_grad_(True)
    return model


def adamw_after_one_step(model: nn.Module, fill: RandomFill) -> torch.optim.AdamW:
    """AdamW with the state one ``step()`` leaves for a random gradient g: ``step`` 1,
    ``exp_avg`` = (1 - beta1)·g, ``exp_avg_sq`` = (1 - beta2)·g², in the parameters' dtype.

    Written directly rather than by running a step: the same tensors, without a gradient buffer and
    the step's temporaries (first-touch page faults dominate the build time on small machines).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    beta1, beta2 = opt.param_groups[0]["betas"]
    for group in opt.param_groups:
        for p in group["params"]:
            exp_avg = torch.empty_like(p, memory_format=torch.preserve_format)
            fill([exp_avg])
            exp_avg_sq = exp_avg.square().mul_((1 - beta2) / (1 - beta1) ** 2)
            opt.state[p] = {
                "step": torch.tensor(1.0, dtype=torch.float32),
                "exp_avg": exp_avg.mul_(1.0),
                "exp_avg_sq": exp_avg_sq,
            }
    return opt


class RandomFill:
    """Fills tensors by copying from one random pool at pseudo-random offsets: memcpy speed."""

    def __init__(self, gen: torch.Generator) -> None:
        self._pool = torch.empty(_POOL_ELEMS, dtype=torch.float32).uniform_(-0.05, 0.05, generator=gen)
        self._pools: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._offset = 0

    def __call__(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            key = (t.dtype, t.device)
            if key not in self._pools:
                self._pools[key] = self._pool.to(t.device, t.dtype)
            src = self._pools[key]
            flat, i, n = t.view(-1), 0, t.numel()
            while i < n:
                k = min(n - i, src.numel() - self._offset)
                flat[i : i + k].copy_(src[self._offset : self._offset + k])
                i += k
                self._offset = (self._offset + k) % src.numel()
            self._offset = (self._offset * 7919 + 104729) % src.numel()


def _layers(model: nn.Module) -> int:
    return int(getattr(getattr(model, "config", None), "num_hidden_layers", 0))
