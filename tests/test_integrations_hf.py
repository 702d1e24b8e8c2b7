"""The Hugging Face ``Trainer`` with ``CkptdCallback``, against a real daemon.

A tiny GPT-2 (with dropout, so the RNG matters) is trained for 10 steps over 2 epochs of shuffled
data. A run with the callback is stopped after step 7 (snapshots at steps 3 and 6); brand-new
Trainers with freshly initialised models and scrambled RNGs resume from step 6 (an epoch boundary)
and from step 3 (mid-epoch, batches skipped) and must end bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import same_bits
from torch.utils.data import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

import ckptd
from client import Client
from client.integrations import from_tree, to_tree
from client.integrations.hf_trainer import CkptdCallback, default_run

MAX_STEPS = 10  # 6 steps per epoch: 2 epochs
Connect = Callable[..., Client]


class Tokens(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 24, length: int = 16) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StopAt(TrainerCallback):  # type: ignore[misc]
    """Stops training after ``step``, as if the process had died there."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step >= self.step:
            control.should_training_stop = True


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


def make_trainer(out: Path, seed: int, **args: Any) -> Trainer:
    targs = TrainingArguments(
        output_dir=str(out),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        warmup_steps=2,
        lr_scheduler_type="linear",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **args,
    )
    return Trainer(model=tiny_gpt2(seed), args=targs, train_dataset=Tokens())


def scramble_rngs() -> None:
    """Advance every RNG, as other work in a new process would. (Not a reseed: that would also
    change ``torch.initial_seed()``, from which accelerate seeds the data order, as the Trainer's
    own ``set_seed(args.seed)`` fixes it in a real run.)"""
    torch.rand(1000)
    random.random()
    np.random.rand(10)


def final_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not same_bits(a[k], b[k])]
    assert not different, f"differ: {different[:5]}"


def test_to_tree_round_trips_int_keys_and_numpy() -> None:
    value = {
        "state": {0: {"step": torch.tensor(3.0)}, 1: {}},
        "groups": [{"params": [0, 1], "lr": 0.1, "betas": (0.9, 0.99)}],
        "np": np.arange(3, dtype=np.int32),
        "scalar": np.float64(2.5),
        "mixed": {1: "a", "1.5": "b", None: "c"},
    }
    tree = to_tree(value)
    assert tree["state"]["__ckptd_keys__"] == {"0": 0, "1": 1}
    assert isinstance(tree["np"], torch.Tensor)
    assert tree["scalar"] == 2.5
    back = from_tree(tree)
    assert set(back["state"]) == {0, 1}
    assert back["mixed"] == {1: "a", "1.5": "b", None: "c"}
    assert back["groups"][0]["betas"] == (0.9, 0.99)
    with pytest.raises(TypeError, match=r"x\.y: cannot store a object"):
        to_tree({"x": {"y": object()}})
    with pytest.raises(TypeError, match="collide"):
        to_tree({1: "a", "1": "b"})


def test_trainer_resumes_bit_exact_from_ckptd(workdir: Path, daemon: Any, connect: Connect) -> None:
    # Uninterrupted reference run, no checkpoints.
    reference = make_trainer(workdir / "ref", seed=0, save_strategy="no")
    reference.train()
    expected = final_weights(reference)

    # The same run with the callback, "dying" after step 7: snapshots at 3 and 6, none by the Trainer.
    client = connect(daemon)
    out = workdir / "out"
    trainer = make_trainer(out, seed=0, save_strategy="steps", save_steps=3)
    trainer.add_callback(StopAt(7))
    callback = CkptdCallback.attach(trainer, client)
    callback.train()  # nothing to resume from: a plain train()
    assert trainer.state.global_step == 7
    assert callback.handles == []  # on_train_end waited for them
    run_dir = daemon.root / default_run(out)
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-000003", "step-000006"]
    # checkpoint-N entries link to the committed ckptd steps, not the Trainer's own checkpoints.
    assert all((p / "model.safetensors").is_symlink() for p in out.glob("checkpoint-*")), (
        "the Trainer wrote its own checkpoint"
    )

    loaded = ckptd.load(run_dir / "step-000006")
    assert set(loaded) == {"model", "optimizer", "lr_scheduler", "rng", "trainer_state", "step"}
    assert loaded["trainer_state"]["global_step"] == 6
    assert loaded["step"] == 6
    assert GPT2LMHeadModel.from_pretrained(run_dir / "step-000006") is not None

    # Resume from the newest checkpoint (step 6, the end of epoch 0) in a brand-new Trainer.
    resumed = make_trainer(workdir / "r6", seed=99, save_strategy="steps", save_steps=3)
    scramble_rngs()
    ckpt = CkptdCallback.attach(resumed, client, run=run_dir.name)  # another output_dir: name the run
    ckpt.train()
    assert resumed.state.global_step == MAX_STEPS
    assert_same_weights(final_weights(resumed), expected)
    # It went on checkpointing: step 9 and the last step (10).
    assert (run_dir / "step-000009").is_dir()
    assert (run_dir / "step-000010").is_dir()

    # Resume mid-epoch (step 3): the Trainer skips the 3 batches already seen. Steps 6, 9 and 10
    # are already committed: they are kept, not saved again (and the training does not fail).
    mid = make_trainer(workdir / "r3", seed=98, save_strategy="steps", save_steps=3)
    scramble_rngs()
    CkptdCallback.attach(mid, client, run=run_dir.name).train(step=3)
    assert mid.state.global_step == MAX_STEPS
    assert_same_weights(final_weights(mid), expected)
    assert sorted(p.name for p in run_dir.glob("step-*")) == [f"step-{s:06d}" for s in (3, 6, 9, 10)]
