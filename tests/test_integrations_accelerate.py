"""accelerate with ckptd, against a real daemon: ``save_state``/``load_state`` through the hooks of
``register_ckptd``, and snapshots of models offloaded by ``cpu_offload``, ``disk_offload`` and
``dispatch_model``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator, cpu_offload, disk_offload, dispatch_model
from helpers import same_bits
from transformers import GPT2Config, GPT2LMHeadModel

import ckptd
from client import Client
from client.integrations.accelerate import (
    POINTER,
    is_offloaded,
    load_offloaded_state_dict,
    onloaded_state_dict,
    register_ckptd,
)

Connect = Callable[..., Client]


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    with torch.no_grad():  # fresh norms are all ones: randomise so a skipped load would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


def snapshot_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(loaded: dict[str, Any], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(expected)
    different = [k for k in expected if not same_bits(loaded[k], expected[k])]
    assert not different, different[:5]


def test_save_state_hands_weights_to_ckptd(workdir: Path, daemon: Any, connect: Connect) -> None:
    client = connect(daemon)
    accelerator = Accelerator(cpu=True)
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    ids = torch.randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    ckpt = register_ckptd(accelerator, client)

    out = workdir / "ckpts" / "step_3"
    accelerator.save_state(str(out))
    expected = snapshot_of(model)
    with torch.no_grad():  # training goes on while the daemon writes
        for p in model.parameters():
            p.add_(1.0)
    ckpt.wait(timeout=60)

    step_dir = daemon.root / "default" / "step-000003"
    assert ckptd.verify(step_dir) == []
    assert_same(ckptd.load(step_dir)["model"], expected)
    files = {p.name for p in out.iterdir()}
    assert not {f for f in files if f.startswith(("model", "pytorch_model"))}, files  # no weights
    assert {"optimizer.bin", POINTER} <= files  # accelerate still saves the rest itself
    assert GPT2LMHeadModel.from_pretrained(step_dir) is not None

    accelerator.load_state(str(out))  # weights from ckptd, optimizer from accelerate's file
    assert_same(snapshot_of(model), expected)

    ckpt.remove()
    accelerator.save_state(str(workdir / "plain"))  # without the hooks accelerate writes the weights
    assert (workdir / "plain" / "model.safetensors").exists()


def offload(kind: str, model: torch.nn.Module, folder: Path) -> None:
    if kind == "cpu_offload":
        cpu_offload(model, execution_device=torch.device("cpu"))
    elif kind == "disk_offload":
        disk_offload(model, str(folder), execution_device=torch.device("cpu"))
    else:
        device_map = {
            "transformer.wte": "cpu",
            "transformer.wpe": "cpu",
            "transformer.drop": "cpu",
            "transformer.h.0": "disk",
            "transformer.h.1": "disk",
            "transformer.ln_f": "cpu",
            "lm_head": "cpu",
        }
        dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(folder))


@pytest.mark.parametrize("kind", ["cpu_offload", "disk_offload", "dispatch_model"])
def test_onloaded_state_dict_of_offloaded_models(
    kind: str, workdir: Path, daemon: Any, connect: Connect
) -> None:
    client = connect(daemon)
    model = tiny_gpt2()
    expected = snapshot_of(model)
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    offload(kind, model, workdir / "offload")
    assert is_offloaded(model)
    assert any(t.device.type == "meta" for t in model.state_dict().values())

    state = onloaded_state_dict(model)
    assert not any(t.device.type == "meta" for t in state.values())
    info = client.snapshot({"model": state}, step=1).wait(timeout=60)
    assert info is not None
    assert_same(ckptd.load(info.path)["model"], expected)

    # The model still works offloaded afterwards (everything went back to the meta device).
    assert any(t.device.type == "meta" for t in model.state_dict().values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)

    # And other weights load into the offloaded model (where its hooks keep them).
    other = tiny_gpt2(seed=1)
    with torch.no_grad():
        other_logits = other(input_ids=ids).logits
    load_offloaded_state_dict(model, snapshot_of(other))
    assert_same(onloaded_state_dict(model), snapshot_of(other))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, other_logits)


def test_save_state_of_an_offloaded_model(workdir: Path, daemon: Any, connect: Connect) -> None:
    client = connect(daemon)
    accelerator = Accelerator(cpu=True)
    model = tiny_gpt2()
    expected = snapshot_of(model)
    disk_offload(model, str(workdir / "offload"), execution_device=torch.device("cpu"))
    model = accelerator.prepare_model(model, device_placement=False)  # for inference, say
    ckpt = register_ckptd(accelerator, client, step=lambda _: 42)
    accelerator.save_state(str(workdir / "ckpt"))
    ckpt.wait(timeout=60)
    assert_same(ckptd.load(daemon.root / "default" / "step-000042")["model"], expected)

    load_offloaded_state_dict(model, snapshot_of(tiny_gpt2(seed=1)))
    accelerator.load_state(str(workdir / "ckpt"))  # back into the offload folder, from ckptd
    assert_same(onloaded_state_dict(model), expected)


def test_snapshot_of_an_offloaded_module_directly_and_restore_into_it(daemon: Any, connect: Connect) -> None:
    client = connect(daemon)
    model = tiny_gpt2()
    expected = snapshot_of(model)
    cpu_offload(model, execution_device=torch.device("cpu"))
    info = client.snapshot(model, step=1).wait(timeout=60)
    assert info is not None
    assert_same(ckptd.load(info.path)["model"], expected)
    load_offloaded_state_dict(model, snapshot_of(tiny_gpt2(seed=1)))  # scribble over it
    client.restore(model)  # restores into the offloaded copies
    assert_same(onloaded_state_dict(model), expected)
