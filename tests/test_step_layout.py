"""The step directory every loader reads right (issue 12, items 6-8), with a real daemon.

The top of a step directory holds what ``save_pretrained`` writes for the ``model`` component
and ``ckptd.json``; every other component is in a subdirectory of its own. Loaders that read a
whole directory (torch's ``HuggingFaceStorageReader``, accelerate's
``load_checkpoint_and_dispatch``, ``from_pretrained``) get the model, never another component.
Steps written in the old flat layout (``ckptd/1``, committed under ``tests/data/ckptd1``) still
load bit-exact.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import same_bits
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import ckptd
from ckptd.manifest import read_manifest
from client import Client

if TYPE_CHECKING:
    from conftest import DaemonProc

Connect = Callable[..., Client]
DATA = Path(__file__).parent / "data" / "ckptd1"


def tiny_qwen2(seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=96,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # norms of ones are equal in any two fresh models: make each its own
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


def trained_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.arange(8).reshape(1, 8)).logits.sum().backward()
    opt.step()
    opt.zero_grad()
    return opt


def distill_step(
    daemon: DaemonProc, connect: Connect, *, step: int = 3, max_shard_size: str | None = None
) -> tuple[Path, Qwen2ForCausalLM, Qwen2ForCausalLM]:
    """A committed step of ``{"model": m, "teacher": t, "optimizer": opt}``, m and t different."""
    model, teacher = tiny_qwen2(1), tiny_qwen2(2)
    opt = trained_optimizer(model)
    options = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    c = connect(daemon, **options)
    info = c.snapshot({"model": model, "teacher": teacher, "optimizer": opt}, step=step).wait(timeout=60)
    assert info is not None
    return info.path, model, teacher


def assert_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert same_bits(got[name], t), name


def test_hf_storage_reader_loads_the_models_weights_not_the_teachers(
    daemon: DaemonProc, connect: Connect
) -> None:
    step_dir, model, teacher = distill_step(daemon, connect)
    # DCP's own loader, as its docs show, in one process (no process group).
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(step_dir)))
    assert_bits(state, model.state_dict())
    assert not torch.equal(state["lm_head.weight"], teacher.state_dict()["lm_head.weight"])


def test_load_checkpoint_and_dispatch_reads_a_step_with_several_components(
    daemon: DaemonProc, connect: Connect
) -> None:
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    step_dir, model, _ = distill_step(daemon, connect, max_shard_size="20KB")  # sharded: an index
    with init_empty_weights():
        empty = Qwen2ForCausalLM(model.config)
    loaded = load_checkpoint_and_dispatch(empty, str(step_dir), device_map={"": "cpu"})
    assert_bits(loaded.state_dict(), model.state_dict())
    assert [p.name for p in step_dir.glob("*.index.json")] == ["model.safetensors.index.json"]


@pytest.mark.parametrize("max_shard_size", [None, "20KB"], ids=["one-shard", "sharded"])
def test_from_pretrained_of_the_step_and_of_the_teachers_directory(
    daemon: DaemonProc, connect: Connect, max_shard_size: str | None
) -> None:
    step_dir, model, teacher = distill_step(daemon, connect, max_shard_size=max_shard_size)
    for where, want in ((step_dir, model), (step_dir / "teacher", teacher)):
        loaded, info = AutoModelForCausalLM.from_pretrained(where, output_loading_info=True)
        assert not any(info.values()), (where, info)
        assert_bits(loaded.state_dict(), want.state_dict())


def test_top_of_a_single_shard_step_is_what_save_pretrained_writes(
    daemon: DaemonProc, connect: Connect, tmp_path: Path
) -> None:
    step_dir, model, _ = distill_step(daemon, connect)
    model.save_pretrained(tmp_path / "hf")
    want = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert want == ["config.json", "generation_config.json", "model.safetensors"]  # no index
    top = sorted(p.name for p in step_dir.iterdir())
    assert top == sorted([*want, "ckptd.json", "optimizer", "teacher"])
    assert sorted(p.name for p in (step_dir / "teacher").iterdir()) == want
    assert sorted(p.name for p in (step_dir / "optimizer").iterdir()) == ["optimizer.safetensors"]
    assert_bits(load_file(step_dir / "model.safetensors"), model.state_dict())
    manifest = read_manifest(step_dir)
    assert manifest.format == "ckptd/2"
    dirs = {c.name: (c.dir, c.index, [s.file for s in c.shards]) for c in manifest.components}
    assert dirs == {
        "model": ("", None, ["model.safetensors"]),
        "teacher": ("teacher", None, ["teacher/model.safetensors"]),
        "optimizer": ("optimizer", None, ["optimizer/optimizer.safetensors"]),
    }


def test_sharded_index_matches_save_pretrained_with_total_parameters(
    daemon: DaemonProc, connect: Connect, tmp_path: Path
) -> None:
    step_dir, model, _ = distill_step(daemon, connect, max_shard_size="20KB")
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    want = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    got = json.loads((step_dir / "model.safetensors.index.json").read_text())
    assert got == want  # total_size, total_parameters (the module's parameters), the weight map
    assert set(got["metadata"]) == {"total_size", "total_parameters"}
    assert got["metadata"]["total_parameters"] == model.num_parameters()
    assert (step_dir / "teacher" / "model.safetensors.index.json").exists()
    hf_top = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert sorted(p.name for p in step_dir.iterdir() if p.is_file()) == sorted([*hf_top, "ckptd.json"])
    opt_files = sorted(p.name for p in (step_dir / "optimizer").iterdir())
    n = len(opt_files) - 1
    assert n > 1 and opt_files == sorted(
        [
            "optimizer.safetensors.index.json",
            *(f"optimizer-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)),
        ]
    )
    opt_index = json.loads((step_dir / "optimizer" / "optimizer.safetensors.index.json").read_text())
    assert set(opt_index["metadata"]) == {"total_size"}  # not a module: no parameter count


def test_restore_of_the_new_layout_is_bit_exact(daemon: DaemonProc, connect: Connect) -> None:
    step_dir, model, teacher = distill_step(daemon, connect, max_shard_size="20KB")
    m2, t2 = tiny_qwen2(5), tiny_qwen2(6)
    opt2 = trained_optimizer(m2)
    c = connect(daemon)
    assert c.restore({"model": m2, "teacher": t2, "optimizer": opt2}) == 3
    assert_bits(m2.state_dict(), model.state_dict())
    assert_bits(t2.state_dict(), teacher.state_dict())
    assert not ckptd.verify(step_dir)


def copy_old_root(workdir: Path) -> Path:
    root = workdir / "old-root"
    shutil.copytree(DATA, root, ignore=shutil.ignore_patterns("expected.*", "*.txt"))
    return root


def old_expected() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    flat = load_file(DATA / "expected.safetensors")
    model = {k.removeprefix("model/"): v for k, v in flat.items() if k.startswith("model/")}
    opt: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        if k.startswith("optimizer/"):
            _, i, name = k.split("/")
            opt.setdefault(i, {})[name] = v
    return model, opt


def old_objects() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The objects of ``tests/data/ckptd1/make_step.py.txt`` (other values: restored into)."""
    torch.manual_seed(99)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def test_old_ckptd1_step_loads_restores_and_verifies_bit_exact(
    workdir: Path, start_daemon: Callable[..., DaemonProc], connect: Connect
) -> None:
    root = copy_old_root(workdir)
    step_dir = root / "v1run" / "step-000007"
    assert read_manifest(step_dir).format == "ckptd/1"
    want_model, want_opt = old_expected()
    for where in (step_dir, root / "v1run"):
        loaded = ckptd.load(where)
        assert_bits(loaded["model"], want_model)
        assert loaded["epoch"] == 3 and loaded["extra"]["lr"] == 0.5 and loaded["extra"]["name"] == "v1"
        assert same_bits(loaded["extra"]["ids"], torch.arange(4))
    assert ckptd.verify(step_dir) == []
    model, opt = old_objects()
    tree = {
        "model": model,
        "optimizer": opt,
        "epoch": 0,
        "extra": {"lr": 0.0, "name": "", "ids": torch.zeros(4, dtype=torch.long)},
    }
    c = connect(start_daemon(root=root))
    assert c.restore(tree, run="v1run") == 7
    assert_bits(model.state_dict(), want_model)
    state = opt.state_dict()["state"]
    for i, names in want_opt.items():
        for name, t in names.items():
            assert same_bits(torch.as_tensor(state[int(i)][name]), t), (i, name)
    assert tree["epoch"] == 3 and tree["extra"]["name"] == "v1"


def test_cli_ls_and_verify_read_an_old_ckptd1_step(workdir: Path) -> None:
    import subprocess
    import sys

    root = copy_old_root(workdir)
    for args, shown in (
        (["verify", str(root / "v1run")], ["step-000007", "OK"]),
        (["ls", str(root)], ["v1run", "model,optimizer,extra", "LATEST"]),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "ckptd", *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        assert all(s in done.stdout for s in shown), (args, done.stdout)


def test_load_of_a_run_falls_back_past_a_corrupt_newest_step(
    daemon: DaemonProc, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    c = connect(daemon)
    for step in (1, 2):
        info = c.snapshot({"model": {"w": torch.full((64,), float(step))}}, step=step).wait(timeout=60)
        assert info is not None
    newest = daemon.root / "default" / "step-000002"
    shard = newest / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="ckptd.reading"):
        loaded = ckptd.load(daemon.root / "default")
    assert torch.equal(loaded["model"]["w"], torch.full((64,), 1.0))
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert str(newest) in warning and "checksum" in warning and "older step" in warning, warning
    assert torch.equal(ckptd.load(daemon.root)["model"]["w"], torch.full((64,), 1.0))  # a root too
    with pytest.raises(ckptd.CorruptCheckpoint, match="checksum"):
        ckptd.load(newest)  # a step directory: no fallback
    (daemon.root / "default" / "step-000001" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ckptd.CorruptCheckpoint, match=r"no committed checkpoint .* loads"):
        ckptd.load(daemon.root / "default")


def test_a_component_directory_replaced_by_a_link_is_corrupt_and_never_followed(
    daemon: DaemonProc, connect: Connect, workdir: Path
) -> None:
    """A component directory is one ckptd made: a symlink in its place (to a copy outside the
    step, whose files verify) is refused, not read through; the run falls back."""
    c = connect(daemon)
    for step in (1, 2):
        info = c.snapshot(
            {"model": {"w": torch.full((8,), float(step))}, "extra": {"v": torch.ones(3) * step}}, step=step
        ).wait(timeout=60)
        assert info is not None
    newest = daemon.root / "default" / "step-000002"
    outside = workdir / "outside-extra"
    shutil.move(newest / "extra", outside)
    (newest / "extra").symlink_to(outside)
    problems = ckptd.verify(newest)
    assert problems and "component directory is a symlink" in problems[0], problems
    with pytest.raises(ckptd.CorruptCheckpoint, match="symlink"):
        ckptd.load(newest)
    assert torch.equal(ckptd.load(daemon.root / "default")["model"]["w"], torch.full((8,), 1.0))
