"""What a Hugging Face user expects of a ``Trainer`` checkpoint, with ckptd taking the saves.

Real ``transformers.Trainer`` runs on the CPU (a tiny GPT-2 from a config, a tiny dataset, a
few steps) against a real daemon: the tokenizer's files in the step directory (and
``AutoTokenizer.from_pretrained`` on it), ``resume_from_checkpoint=True`` through the
``checkpoint-N`` links, ``save_total_limit`` (and accelerate's ``total_limit``) through ckptd's
retention, ``on_save`` once a step is committed, ``trainer_state.json``/``training_args.json``
as files. Plus the wire side: small files as bytes (binary, several MB) and their limits.
"""

from __future__ import annotations

import json
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import same_bits
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch.utils.data import Dataset
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

import ckptd
from ckptd.protocol import Snapshot, decode_client, encode_snapshot
from client import Client
from client.errors import CheckpointError
from client.integrations.hf_trainer import CkptdCallback, default_run

Connect = Callable[..., Client]
VOCAB = 64
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a checkpoint is durable once it is committed",
    "tokenizers split text into tokens and ids",
    "ckptd writes safetensors shards from shared memory",
] * 4


class Tokens(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 16, length: int = 8) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=g)

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


class SaveRecorder(TrainerCallback):  # type: ignore[misc]
    """Records every on_save: the step, the thread, whether checkpoint-N is there, the best."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def on_save(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.calls.append(
            {
                "step": state.global_step,
                "thread": threading.get_ident(),
                "links": sorted(p.name for p in Path(args.output_dir).glob("checkpoint-*") if p.is_dir()),
                "best": state.best_model_checkpoint,
                "model": kwargs.get("model") is not None,
            }
        )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer trained here (no download), with a chat template."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        CORPUS, trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[UNK]", "[PAD]", "[EOS]"])
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    return fast


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=16, n_layer=1, n_head=2))


def make_trainer(
    out: Path, seed: int = 0, *, max_steps: int = 6, tokenizer: Any = None, **args: Any
) -> Trainer:
    targs = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        warmup_steps=1,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **args,
    )
    extra = {"eval_dataset": Tokens(8)} if targs.eval_strategy != "no" else {}
    return Trainer(
        model=tiny_gpt2(seed), args=targs, train_dataset=Tokens(), processing_class=tokenizer, **extra
    )


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def steps_of(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in run_dir.glob("step-*"))


# --- item 1: tokenizer and processor files ------------------------------------------------------


def test_tokenizer_files_in_step_dir_load_with_autotokenizer(
    workdir: Path, daemon: Any, connect: Connect
) -> None:
    tokenizer = tiny_tokenizer()
    trainer = make_trainer(
        workdir / "out", max_steps=2, tokenizer=tokenizer, save_strategy="steps", save_steps=2
    )
    CkptdCallback.attach(trainer, connect(daemon)).train()
    step_dir = daemon.root / default_run(workdir / "out") / "step-000002"
    stock = workdir / "stock"
    tokenizer.save_pretrained(stock)
    for name in os.listdir(stock):  # every file save_pretrained writes, byte for byte
        assert (step_dir / name).read_bytes() == (stock / name).read_bytes(), name
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(step_dir))
    loaded = AutoTokenizer.from_pretrained(step_dir)
    assert len(loaded) == len(tokenizer) > 1
    assert loaded.get_vocab() == tokenizer.get_vocab()
    text = "the quick fox writes shards"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    chat = [{"role": "user", "content": "hello"}]
    assert loaded.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(
        chat, tokenize=False
    )
    assert ckptd.reading.verify(step_dir) == []


def test_small_files_as_bytes_binary_and_multi_mb(workdir: Path, client: Client, daemon: Any) -> None:
    rng = np.random.default_rng(0)
    binary = bytes(range(256)) * 16 + b"\x00\xff\xfe" + rng.bytes(3 * 2**20)  # not UTF-8
    big = rng.bytes(9 * 2**20)  # larger than a Qwen2 tokenizer.json
    files = {"tokenizer.model": binary, "tokenizer.json": big, "chat_template.jinja": "{{ x }} é\n".encode()}
    handle = client.snapshot({"w": torch.arange(4.0)}, step=1, files=files)
    handle.wait(60)
    step_dir = daemon.root / "default" / "step-000001"
    for name, data in files.items():
        assert (step_dir / name).read_bytes() == data, name
    assert ckptd.reading.verify(step_dir) == []


def test_small_files_bounded_and_named_safely(client: Client) -> None:
    w = {"w": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="over the limit"):
        client.snapshot(w, step=1, files={"huge.json": bytes(41 * 2**20)}).wait(60)
    for name in ("model.safetensors", "ckptd.json", "x.bin", "../up.json", "optimizer.pt", "noext"):
        with pytest.raises(CheckpointError, match="not allowed"):
            client.snapshot(w, step=2, files={name: b"{}"}).wait(30)


def test_snapshot_frame_carries_blobs_and_keep_last_intact() -> None:
    data = bytes(range(256)) * 4
    frame = encode_snapshot(
        1, "r", 3, 0, 0, {"$dict": {}}, {"config.json": "{}"}, blobs={"a.model": data}, keep_last=2
    )
    msg = decode_client(frame[4:])
    assert isinstance(msg, Snapshot)
    assert msg.blobs == {"a.model": data} and msg.files == {"config.json": "{}"} and msg.keep_last == 2
    plain = decode_client(encode_snapshot(1, "r", 3, 0, 0, {"$dict": {}}, {})[4:])
    assert isinstance(plain, Snapshot) and plain.blobs == {} and plain.keep_last is None


# --- item 2: resume_from_checkpoint=True --------------------------------------------------------


def test_resume_from_checkpoint_true_is_bit_identical(workdir: Path, daemon: Any, connect: Connect) -> None:
    reference = make_trainer(workdir / "ref", max_steps=8, save_strategy="no")
    reference.train()
    expected = weights(reference)

    out = workdir / "out"
    client = connect(daemon)
    first = make_trainer(out, max_steps=8, save_strategy="steps", save_steps=3)
    first.add_callback(StopAt(5))  # "dies" after step 5: committed steps 3 (mid-epoch) only
    CkptdCallback.attach(first, client)
    first.train()
    link = out / "checkpoint-3"
    assert link.is_dir() and not link.is_symlink()  # output_dir's, with links into the step
    step_dir = daemon.root / default_run(out) / "step-000003"
    assert (link / "model.safetensors").resolve() == (step_dir / "model.safetensors").resolve()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]

    resumed = make_trainer(out, seed=7, max_steps=8, save_strategy="steps", save_steps=3)
    torch.rand(100), random.random(), np.random.rand(3)  # other work in a new process
    CkptdCallback.attach(resumed, client)
    resumed.train(resume_from_checkpoint=True)  # the HF idiom: get_last_checkpoint(output_dir)
    assert resumed.state.global_step == 8
    got = weights(resumed)
    assert not [k for k in expected if not same_bits(expected[k], got[k])]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-3",
        "checkpoint-6",
        "checkpoint-8",
    ]
    assert not list(out.glob("checkpoint-*/optimizer.pt")), "the Trainer wrote its own checkpoint"


# --- item 3: save_total_limit and accelerate's total_limit -------------------------------------


def test_save_total_limit_keeps_two_committed_steps(workdir: Path, daemon: Any, connect: Connect) -> None:
    out = workdir / "out"
    trainer = make_trainer(out, max_steps=5, save_strategy="steps", save_steps=1, save_total_limit=2)
    CkptdCallback.attach(trainer, connect(daemon)).train()  # no processing class: nothing breaks
    run_dir = daemon.root / default_run(out)
    assert steps_of(run_dir) == [4, 5]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-4",
        "checkpoint-5",
    ]
    assert not (run_dir / "step-000005" / "tokenizer_config.json").exists()


def test_keep_last_per_snapshot_is_committed_only_retention(client: Client, daemon: Any) -> None:
    for step in range(1, 5):
        client.snapshot({"w": torch.full((2,), float(step))}, step=step, keep_last=2).wait(60)
    assert steps_of(daemon.root / "default") == [3, 4]
    client.snapshot({"w": torch.zeros(2)}, step=5).wait(60)  # no keep_last: the daemon's (keep all)
    assert steps_of(daemon.root / "default") == [3, 4, 5]
    with pytest.raises(ValueError, match="keep_last"):
        client.snapshot({"w": torch.zeros(2)}, step=6, keep_last=0)


def test_accelerate_total_limit_prunes_ckptd_steps(workdir: Path, daemon: Any, connect: Connect) -> None:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from client.integrations.accelerate import register_ckptd

    project = ProjectConfiguration(str(workdir / "proj"), automatic_checkpoint_naming=True, total_limit=2)
    accelerator = Accelerator(cpu=True, project_config=project)
    model = accelerator.prepare(torch.nn.Linear(4, 4))
    ckpt = register_ckptd(accelerator, connect(daemon))
    for _ in range(4):
        accelerator.save_state()
        ckpt.wait(60)
    assert sorted(os.listdir(workdir / "proj" / "checkpoints")) == ["checkpoint_2", "checkpoint_3"]
    assert steps_of(daemon.root / "default") == [2, 3]
    accelerator.load_state(str(workdir / "proj" / "checkpoints" / "checkpoint_3"))
    assert model is not None


# --- items 4 and 5: on_save, best_model_checkpoint, trainer_state.json, training_args.json ------


def test_on_save_fires_once_committed_with_best_checkpoint(
    workdir: Path, daemon: Any, connect: Connect
) -> None:
    out = workdir / "out"
    trainer = make_trainer(
        out,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        metric_for_best_model="loss",
    )
    recorder = SaveRecorder()
    trainer.add_callback(recorder)
    CkptdCallback.attach(trainer, connect(daemon)).train()
    # Once per committed step, with global_step the saved step (as the Trainer's own on_save).
    assert [c["step"] for c in recorder.calls] == [2, 4], recorder.calls
    assert {c["thread"] for c in recorder.calls} == {threading.get_ident()}  # the training thread
    assert all(c["model"] for c in recorder.calls)
    for c in recorder.calls:  # checkpoint-<global_step> is there when on_save runs
        assert f"checkpoint-{c['step']}" in c["links"]
    assert trainer.state.global_step == 4
    best = trainer.state.best_global_step
    assert best in (2, 4)
    assert trainer.state.best_model_checkpoint == str(out / f"checkpoint-{best}")
    assert trainer.state.best_metric is not None


def test_trainer_state_and_args_are_json_files(workdir: Path, daemon: Any, connect: Connect) -> None:
    out = workdir / "out"
    trainer = make_trainer(out, max_steps=3, save_strategy="steps", save_steps=3)
    CkptdCallback.attach(trainer, connect(daemon)).train()
    step_dir = daemon.root / default_run(out) / "step-000003"
    state = TrainerState.load_from_json(str(step_dir / "trainer_state.json"))
    assert state.global_step == 3 and state.max_steps == 3
    assert state.log_history and state.log_history[0]["step"] == 1
    assert "TrainerControl" in state.stateful_callbacks
    args = json.loads((step_dir / "training_args.json").read_text())
    assert args["output_dir"] == str(out) and args["save_steps"] == 3 and args["learning_rate"] == 1e-2
    assert not list(step_dir.glob("*.bin")) and not list(step_dir.glob("*.pt*"))
    assert ckptd.load(step_dir)["trainer_state"]["global_step"] == 3
