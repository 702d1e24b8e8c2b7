"""Corruption of the newest checkpoint, as the restore side sees it.

``tests/test_cli.py`` checks that ``ckptd verify STEP_DIR`` and ``ckptd.load`` catch each kind of
damage. Here: ``client.restore(obj)`` falls back to the previous committed step with a warning
and returns it, loading exactly that step's values; ``restore(obj, step=N)`` raises
``CheckpointError`` (code ``corrupt``) naming the problem; ``ckptd verify RUN_DIR`` (the run's
newest step) does not report a run whose newest checkpoint is damaged as OK.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import DaemonProc
from helpers import same_bits
from torch import nn

import ckptd
from ckptd import paths
from ckptd.manifest import read_manifest
from client import CheckpointError, Client

KINDS = ["flip", "truncate", "delete", "index", "manifest"]


def trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    return model, opt


def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    model, opt = trained(999)
    return model, opt


def assert_holds_step(
    model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, object], step: int
) -> None:
    ref_model, ref_opt = trained(step)
    for name, t in ref_model.state_dict().items():
        assert same_bits(model.state_dict()[name], t), name
    ref_state = ref_opt.state_dict()["state"]
    got_state = opt.state_dict()["state"]
    for i, s in ref_state.items():
        assert same_bits(got_state[i]["exp_avg"], s["exp_avg"]), i
    assert state["step"] == step


def damage(step_dir: Path, how: str) -> str:
    """Damage a committed checkpoint; returns the name of the file a report must name."""
    manifest = read_manifest(step_dir)
    shard = step_dir / manifest.components[0].shards[-1].file
    if how == "flip":
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0x40
        shard.write_bytes(bytes(data))
        return shard.name
    if how == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 8)
        return shard.name
    if how == "delete":
        shard.unlink()
        return shard.name
    if how == "index":
        index = step_dir / manifest.components[0].index
        doc = json.loads(index.read_text())
        first = next(iter(doc["weight_map"]))
        doc["weight_map"][first] = "elsewhere.safetensors"
        index.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return index.name
    if how == "manifest":
        path = step_dir / "ckptd.json"
        path.write_bytes(path.read_bytes().replace(b'"step": ', b'"step": 1', 1))
        return "ckptd.json"
    raise AssertionError(how)


def commit_steps(client: Client, steps: list[int]) -> dict[int, Path]:
    out = {}
    for step in steps:
        model, opt = trained(step)
        info = client.snapshot({"model": model, "optimizer": opt, "step": step}, step=step).wait(30)
        assert info is not None
        out[step] = info.path
    return out


@pytest.fixture
def sharded(daemon: DaemonProc, connect: Callable[..., Client]) -> Client:
    return connect(daemon, max_shard_size="10KB")  # Linear(64, 64) is 16 KiB: several shards


@pytest.mark.parametrize("how", KINDS)
def test_damaged_newest_step_restore_falls_back_explicit_step_raises_verify_reports(
    sharded: Client,
    caplog: pytest.LogCaptureFixture,
    how: str,
    record_property: Callable[[str, object], None],
) -> None:
    committed = commit_steps(sharded, [1, 2, 3])
    newest = committed[3]
    assert len(read_manifest(newest).components[0].shards) > 1
    name = damage(newest, how)
    problems = ckptd.verify(newest)
    assert problems and any(name in p for p in problems), problems

    model, opt = fresh()
    state: dict[str, object] = {"model": model, "optimizer": opt, "step": 0}
    with caplog.at_level(logging.WARNING):
        step = sharded.restore(state)
    assert step == 2
    assert_holds_step(model, opt, state, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(newest) in w for w in warnings), warnings

    model, opt = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        sharded.restore({"model": model, "optimizer": opt, "step": 0}, step=3)
    assert e.value.code == "corrupt"
    assert name in str(e.value), str(e.value)
    for k, v in model.state_dict().items():  # nothing was half-restored
        assert same_bits(v, before[k]), k

    # The older steps are untouched and restore exactly.
    for s in (1, 2):
        model, opt = fresh()
        state = {"model": model, "optimizer": opt, "step": 0}
        assert sharded.restore(state, step=s) == s
        assert_holds_step(model, opt, state, s)
    lost = sum(1 for s in (1, 2) if ckptd.verify(committed[s]))
    record_property("runs", 1)
    record_property("committed", 2)
    record_property("lost", lost)
    assert lost == 0

    # `ckptd verify RUN_DIR` checks the run's newest step: it must not call this run OK.
    done = subprocess.run(
        [sys.executable, "-m", "ckptd", "verify", str(newest.parent)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0, f"ckptd verify of the run called it fine with a damaged newest step:\n{out}"
    assert name in out, out


def test_corrupt_older_step_does_not_disturb_restore_of_the_newest(
    sharded: Client, caplog: pytest.LogCaptureFixture
) -> None:
    committed = commit_steps(sharded, [1, 2])
    damage(committed[1], "flip")
    model, opt = fresh()
    state: dict[str, object] = {"model": model, "optimizer": opt, "step": 0}
    with caplog.at_level(logging.WARNING):
        assert sharded.restore(state) == 2
    assert_holds_step(model, opt, state, 2)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_every_step_corrupt_raises_not_found(sharded: Client) -> None:
    committed = commit_steps(sharded, [1, 2])
    for how, path in zip(["flip", "manifest"], committed.values(), strict=True):
        damage(path, how)
    model, opt = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        sharded.restore({"model": model, "optimizer": opt, "step": 0})
    assert e.value.code == "not_found"
    for k, v in model.state_dict().items():
        assert same_bits(v, before[k]), k


@pytest.mark.parametrize("latest", ["garbage\n", "step-000099\n", "../../etc\n", "", None], ids=repr)
def test_broken_or_missing_latest_falls_back_to_the_highest_intact_step(
    sharded: Client, latest: str | None
) -> None:
    committed = commit_steps(sharded, [1, 2])
    pointer = committed[2].parent / paths.LATEST
    if latest is None:
        pointer.unlink()
    else:
        pointer.write_text(latest)
    assert ckptd.latest(sharded.root) == committed[2]
    model, opt = fresh()
    state: dict[str, object] = {"model": model, "optimizer": opt, "step": 0}
    assert sharded.restore(state) == 2
    assert_holds_step(model, opt, state, 2)


def test_restore_with_fallback_disabled_raises_on_a_damaged_newest_step(sharded: Client) -> None:
    committed = commit_steps(sharded, [1, 2])
    damage(committed[2], "flip")
    model, opt = fresh()
    with pytest.raises(CheckpointError) as e:
        sharded.restore({"model": model, "optimizer": opt, "step": 0}, fallback=False)
    assert e.value.code == "corrupt"
