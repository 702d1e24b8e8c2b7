"""Checkpoints of Hugging Face models, written by a real daemon, read back by Hugging Face.

The point of the safetensors layout (DESIGN §2) is that the ``model`` component of a checkpoint
is an ordinary ``save_pretrained`` directory: these tests load it with transformers and with
``safetensors.torch.load_file``, and compare the shard split with what ``save_pretrained`` writes
for the same ``max_shard_size``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import ckptd
from client import Client

if TYPE_CHECKING:
    from conftest import DaemonProc

# Small enough for several shards of the tiny model below (HF's units: 200KB = 200_000 bytes);
# bf16 halves every tensor, so it halves the limit too, for the same split.
SHARD = {torch.float32: "200KB", torch.bfloat16: "100KB"}
TIED = "lm_head.weight"
EMBED = "model.embed_tokens.weight"

Connect = Callable[..., Client]


def tiny_qwen2(dtype: torch.dtype = torch.float32, seed: int = 0) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(dtype)
    # Freshly initialised norms are all ones and biases all zeros: equal to any other fresh
    # model, so a load that silently skipped them would still compare equal. Randomise them.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def snapshot_dir(
    daemon: DaemonProc, connect: Connect, obj: object, dtype: torch.dtype, step: int = 7
) -> Path:
    c = connect(daemon, max_shard_size=SHARD[dtype])
    info = c.snapshot(obj, step=step).wait(timeout=60)
    assert info is not None
    assert info.path.is_dir()
    assert info.path == daemon.root / "default" / f"step-{step:06d}"
    return info.path


def read_index(directory: Path) -> dict[str, object]:
    with open(directory / "model.safetensors.index.json") as f:
        index: dict[str, object] = json.load(f)
    return index


def partition(weight_map: Mapping[str, str]) -> dict[str, frozenset[str]]:
    """Shard file -> the tensor names it holds."""
    out: dict[str, set[str]] = {}
    for name, file in weight_map.items():
        out.setdefault(file, set()).add(name)
    return {file: frozenset(names) for file, names in out.items()}


def assert_same_tensors(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_from_pretrained_loads_identical_weights(
    daemon: DaemonProc, connect: Connect, dtype: torch.dtype
) -> None:
    model = tiny_qwen2(dtype)
    path = snapshot_dir(daemon, connect, model, dtype)
    assert (path / "config.json").exists()
    assert not ckptd.verify(path)

    # dtype="auto" takes the dtype from config.json, which must say what was saved.
    loaded, loading_info = AutoModelForCausalLM.from_pretrained(path, dtype="auto", output_loading_info=True)
    # Nothing missing, unexpected or mismatched: every weight came from the checkpoint.
    assert not any(loading_info.values()), loading_info
    assert type(loaded) is Qwen2ForCausalLM
    assert loaded.dtype == dtype
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_tensors(loaded.state_dict(), model.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_shard_loads_with_safetensors(daemon: DaemonProc, connect: Connect, dtype: torch.dtype) -> None:
    model = tiny_qwen2(dtype)
    path = snapshot_dir(daemon, connect, model, dtype)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) >= 3, [s.name for s in shards]
    n = len(shards)
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

    union: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_file(shard)
        assert part, f"{shard.name} is empty"
        assert not set(part) & set(union), f"{shard.name} repeats tensors"
        union.update(part)
    # Like save_pretrained, the tied lm_head is not stored: only the embedding it aliases.
    want = {k: v for k, v in model.state_dict().items() if k != TIED}
    assert_same_tensors(union, want)

    weight_map = read_index(path)["weight_map"]
    assert isinstance(weight_map, dict)
    for shard in shards:
        assert partition(weight_map)[shard.name] == frozenset(load_file(shard))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_index_matches_save_pretrained(
    daemon: DaemonProc, connect: Connect, workdir: Path, dtype: torch.dtype
) -> None:
    model = tiny_qwen2(dtype)
    path = snapshot_dir(daemon, connect, model, dtype)
    ours = read_index(path)

    hf_dir = workdir / "hf"
    model.save_pretrained(hf_dir, max_shard_size=SHARD[dtype])
    theirs = read_index(hf_dir)

    ours_map, theirs_map = ours["weight_map"], theirs["weight_map"]
    assert isinstance(ours_map, dict)
    assert isinstance(theirs_map, dict)
    assert set(ours_map) == set(theirs_map)
    assert TIED not in ours_map
    # Same shard-size rule: the same groups of tensors, under the same file names.
    assert partition(ours_map) == partition(theirs_map)
    assert len(partition(ours_map)) >= 3

    ours_meta, theirs_meta = ours["metadata"], theirs["metadata"]
    assert isinstance(ours_meta, dict)
    assert isinstance(theirs_meta, dict)
    assert ours_meta["total_size"] == theirs_meta["total_size"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ckptd_load_keeps_tied_weights_shared(
    daemon: DaemonProc, connect: Connect, dtype: torch.dtype
) -> None:
    model = tiny_qwen2(dtype)
    path = snapshot_dir(daemon, connect, model, dtype)
    state = ckptd.load(path)["model"]
    assert_same_tensors(state, model.state_dict())
    # One tensor under both names, as the model has it: restoring keeps the tie.
    assert state[TIED] is state[EMBED]

    fresh = tiny_qwen2(dtype, seed=1)
    assert not torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)
    fresh.load_state_dict(state)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert_same_tensors(fresh.state_dict(), model.state_dict())


def test_restore_into_hf_model_with_optimizer(daemon: DaemonProc, connect: Connect) -> None:
    model = tiny_qwen2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    c = connect(daemon, max_shard_size=SHARD[torch.float32])
    c.snapshot({"model": model, "optimizer": opt, "step": 2}, step=2).wait(timeout=60)

    fresh = tiny_qwen2(seed=1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    target: dict[str, object] = {"model": fresh, "optimizer": fresh_opt, "step": 0}
    assert c.restore(target) == 2
    assert target["step"] == 2
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert_same_tensors(fresh.state_dict(), model.state_dict())

    # Optimizer state is keyed by index in torch's form; both were built in the same order.
    want, got = opt.state_dict(), fresh_opt.state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert set(got["state"]) == set(want["state"])
    for i, s in want["state"].items():
        assert set(got["state"][i]) == set(s)
        for k, v in s.items():
            assert torch.equal(got["state"][i][k], v), (i, k)
