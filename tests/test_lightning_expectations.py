"""What a Lightning (and Hugging Face) user expects of ckptd's checkpoints (issue 12, items 9, 10).

- Item 9: a checkpoint saved by ``CkptdCheckpointIO`` loads into a module with
  ``client.integrations.lightning.load_from_checkpoint(Module, path)`` (no daemon, no plugin):
  hyper-parameters from the checkpoint, weights bit-identical; the pointer file itself says what
  it is and what to call (``torch.load`` cannot read JSON).
- Item 10: resuming an older step into the same run, with real Trainers on the CPU: the steps an
  earlier training already committed are skipped with one warning, training carries on, and the
  steps after them are saved.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import same_bits
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

pytest.importorskip("lightning")
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

import ckptd
from client import Client
from client.integrations.lightning import CkptdCheckpointIO, load_from_checkpoint, read_pointer

Connect = Callable[..., Client]
pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty:UserWarning"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed:UserWarning"),
]


class Tiny(L.LightningModule):
    def __init__(self, lr: float = 0.05, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])


def loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=False)


def trainer(io: CkptdCheckpointIO | None, dirpath: Path, max_steps: int, every: int = 2) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        plugins=[io] if io is not None else None,
        callbacks=[ModelCheckpoint(dirpath=dirpath, every_n_train_steps=every, save_top_k=-1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )


# --- item 9: load_from_checkpoint -------------------------------------------------------------


def test_load_from_checkpoint_reads_a_pointer_without_daemon_or_plugin(
    workdir: Path, daemon: Any, connect: Connect
) -> None:
    torch.manual_seed(0)
    model = Tiny(lr=0.01, width=12)
    trainer(CkptdCheckpointIO(connect(daemon)), workdir / "ckpts", max_steps=4).fit(model, loader())
    pointer = workdir / "ckpts" / "epoch=0-step=4.ckpt"
    assert read_pointer(pointer) == (str(daemon.root), "default", 4)
    daemon.stop()  # what follows needs no daemon

    loaded = load_from_checkpoint(Tiny, pointer)
    assert isinstance(loaded, Tiny) and loaded.hparams["lr"] == 0.01 and loaded.hparams["width"] == 12
    for k, v in model.state_dict().items():
        assert same_bits(loaded.state_dict()[k], v), k
    # kwargs override the saved hyper-parameters, as with Lightning's own load_from_checkpoint.
    assert load_from_checkpoint(Tiny, pointer, lr=0.5).hparams["lr"] == 0.5
    # The ckptd step directory itself works too.
    by_dir = load_from_checkpoint(Tiny, daemon.root / "default" / "step-000004")
    assert same_bits(by_dir.net[0].weight, model.net[0].weight)

    # Lightning's own reader cannot read JSON; the pointer says what it is and what to call.
    with pytest.raises(pickle.UnpicklingError):
        Tiny.load_from_checkpoint(pointer)
    note = json.loads(pointer.read_text())["note"]
    assert "ckptd pointer" in note and "load_from_checkpoint(YourModule, path)" in note


def test_load_from_checkpoint_reads_an_ordinary_lightning_checkpoint(workdir: Path) -> None:
    torch.manual_seed(0)
    model = Tiny(lr=0.02)
    trainer(None, workdir / "plain", max_steps=2).fit(model, loader())  # TorchCheckpointIO
    loaded = load_from_checkpoint(Tiny, workdir / "plain" / "epoch=0-step=2.ckpt")
    assert loaded.hparams["lr"] == 0.02
    assert same_bits(loaded.net[2].weight, model.net[2].weight)


# --- item 10: resuming an older step into the same run --------------------------------------------


def committed(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in run_dir.glob("step-*"))


def skip_warnings(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == logger and r.levelno >= logging.WARNING and "already committed" in r.getMessage()
    ]


def test_lightning_resume_older_step_into_the_same_run(
    workdir: Path, daemon: Any, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    client = connect(daemon)
    run_dir = daemon.root / "default"
    torch.manual_seed(0)
    trainer(CkptdCheckpointIO(client), workdir / "first", max_steps=8).fit(Tiny(), loader())
    assert committed(run_dir) == [2, 4, 6, 8]
    before = {s: (run_dir / f"step-{s:06d}" / "ckptd.json").read_bytes() for s in (6, 8)}

    # A new training resumes from step 4 into the same run and goes on to step 12.
    caplog.set_level(logging.INFO, logger="client.integrations.lightning")
    torch.manual_seed(1)
    again = trainer(CkptdCheckpointIO(client), workdir / "second", max_steps=12)
    again.fit(Tiny(), loader(), ckpt_path=str(workdir / "first" / "epoch=0-step=4.ckpt"))
    assert again.global_step == 12
    warned = skip_warnings(caplog, "client.integrations.lightning")
    assert len(warned) == 1, warned
    assert "step=6" in warned[0] and "CkptdCheckpointIO(run=...)" in warned[0]
    assert committed(run_dir) == [2, 4, 6, 8, 10, 12]
    for s, manifest in before.items():  # the earlier training's steps are kept as they were
        assert (run_dir / f"step-{s:06d}" / "ckptd.json").read_bytes() == manifest
    # Pointers only for what this training saved; they load.
    assert sorted(p.name for p in (workdir / "second").iterdir()) == [
        "epoch=2-step=10.ckpt",
        "epoch=2-step=12.ckpt",
    ]
    assert ckptd.verify(run_dir / "step-000012") == []
    final = load_from_checkpoint(Tiny, workdir / "second" / "epoch=2-step=12.ckpt")
    assert same_bits(final.net[0].weight, again.lightning_module.net[0].weight)  # type: ignore[index]


class Tokens(Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_hf_resume_older_step_into_the_same_run(
    workdir: Path, daemon: Any, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    transformers = pytest.importorskip("transformers")
    from client.integrations.hf_trainer import CkptdCallback, default_run

    def hf_trainer(out: str, max_steps: int) -> Any:
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=64, n_positions=8, n_embd=16, n_layer=1, n_head=2)
        args = transformers.TrainingArguments(
            output_dir=str(workdir / out),
            max_steps=max_steps,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=2,
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
        )
        model = transformers.GPT2LMHeadModel(config)
        return transformers.Trainer(model=model, args=args, train_dataset=Tokens())

    client = connect(daemon)
    run_dir = daemon.root / default_run(workdir / "a")  # the callback's run: one per output_dir
    first = hf_trainer("a", max_steps=6)
    CkptdCallback.attach(first, client).train()
    assert committed(run_dir) == [2, 4, 6]

    caplog.set_level(logging.INFO, logger="client.integrations.hf_trainer")
    again = hf_trainer("a", max_steps=10)
    CkptdCallback.attach(again, client).train(step=2)  # steps 4 and 6 are already committed
    assert again.state.global_step == 10
    warned = skip_warnings(caplog, "client.integrations.hf_trainer")
    assert len(warned) == 1, warned
    assert "step=4" in warned[0] and "run=" in warned[0]
    assert committed(run_dir) == [2, 4, 6, 8, 10]
    assert ckptd.load(run_dir / "step-000010")["step"] == 10
