"""PyTorch Lightning with ``CkptdCheckpointIO``, against a real daemon (skipped without lightning).

A tiny LightningModule is fitted for 8 steps (2 epochs of 4 batches) with two ``ModelCheckpoint``
callbacks: one keeps every 4th step, one keeps only the newest of every 2nd step (so Lightning
removes checkpoints). The checkpoint dicts must come back from ckptd as Lightning made them, and a
new Trainer resumed from step 4 must end with the same weights as the uninterrupted fit.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import same_bits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning")
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from client import Client
from client.integrations.lightning import FORMAT, POINTER_NOTE, CkptdCheckpointIO, read_pointer

Connect = Callable[..., Client]
pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    # lightning 2.6 still uses torch's deprecated pytree LeafSpec
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
]


class Tiny(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Recording(CkptdCheckpointIO):
    """Keeps a deep copy of every checkpoint dict Lightning hands over."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.saved: dict[str, dict[str, Any]] = {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.saved[Path(path).name + "@" + Path(path).parent.name] = copy.deepcopy(checkpoint)
        super().save_checkpoint(checkpoint, path, storage_options)


def loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=False)


def trainer(io: CkptdCheckpointIO, callbacks: list[Any], max_steps: int = 8) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        plugins=[io],
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )


def checkpoint_every(workdir: Path, steps: int, top_k: int) -> ModelCheckpoint:
    """Every ``steps`` steps; ``top_k=-1`` keeps all, 1 only the newest (no monitor)."""
    dirpath = workdir / ("all" if top_k == -1 else "newest")
    return ModelCheckpoint(dirpath=dirpath, every_n_train_steps=steps, save_top_k=top_k)


def fresh_model(seed: int) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def assert_equal_trees(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and same_bits(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(map(str, a)), sorted(map(str, b)))
        for k in a:
            assert_equal_trees(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal_trees(x, y, f"{where}.{i}")
    else:
        assert a == b, (where, a, b)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty:UserWarning")
def test_fit_save_load_remove_resume(workdir: Path, daemon: Any, connect: Connect) -> None:
    client = connect(daemon)
    every4, newest2 = checkpoint_every(workdir, 4, -1), checkpoint_every(workdir, 2, 1)
    io = Recording(client)
    model = fresh_model(0)
    trainer(io, [every4, newest2]).fit(model, loader())
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    # Pointers where Lightning expects files; only the newest of `newest2` is left.
    assert sorted(p.name for p in (workdir / "all").iterdir()) == [
        "epoch=0-step=4.ckpt",
        "epoch=1-step=8.ckpt",
    ]
    assert sorted(p.name for p in (workdir / "newest").iterdir()) == ["epoch=1-step=8.ckpt"]
    pointer = json.loads((workdir / "all" / "epoch=0-step=4.ckpt").read_text())
    assert pointer == {
        "format": FORMAT,
        "root": str(daemon.root),
        "run": "default",
        "step": 4,
        "note": POINTER_NOTE,
    }
    # Steps 2 and 6 were removed with their pointers; 4 is still named by `every4`.
    run_dir = daemon.root / "default"
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-000004", "step-000008"]

    # What comes back is what Lightning saved (int keys of optimizer states included).
    for name in ("epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"):
        loaded = io.load_checkpoint(workdir / "all" / name)
        assert_equal_trees(io.saved[f"{name}@all"], loaded, name)
    state = io.load_checkpoint(workdir / "all" / "epoch=0-step=4.ckpt")["optimizer_states"][0]["state"]
    assert set(state) == {0, 1, 2, 3}

    # Resume from step 4 in a new Trainer with the same callbacks, into run "resumed": the same
    # final weights, and its own checkpoints (steps 6 and 8; 6 removed by `newest2` once 8 is in).
    resumed = fresh_model(1)
    io2 = CkptdCheckpointIO(client, run="resumed")
    again = trainer(io2, [checkpoint_every(workdir, 4, -1), checkpoint_every(workdir, 2, 1)])
    again.fit(resumed, loader(), ckpt_path=str(workdir / "all" / "epoch=0-step=4.ckpt"))
    assert again.global_step == 8
    for k, v in resumed.state_dict().items():
        assert same_bits(v, expected[k]), k
    assert sorted(p.name for p in (daemon.root / "resumed").glob("step-*")) == ["step-000008"]
    # Lightning does not overwrite a file: the new one is "-v1".
    new8 = workdir / "all" / "epoch=1-step=8-v1.ckpt"
    assert read_pointer(new8) == (str(daemon.root), "resumed", 8)
    assert_equal_trees(
        io2.load_checkpoint(new8)["state_dict"],
        io.saved["epoch=1-step=8.ckpt@all"]["state_dict"],
    )


def test_pointer_detection_and_plain_checkpoints(workdir: Path, daemon: Any, connect: Connect) -> None:
    io = CkptdCheckpointIO(connect(daemon))
    plain = workdir / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, plain)
    assert read_pointer(plain) is None
    assert torch.equal(io.load_checkpoint(plain)["state_dict"]["w"], torch.ones(2))  # TorchCheckpointIO
    io.save_checkpoint(
        {"state_dict": {"w": torch.zeros(2)}, "global_step": 5, "epoch": 0}, workdir / "a.ckpt"
    )
    io.teardown()
    # A step an earlier process committed is kept: not saved again, no pointer written.
    CkptdCheckpointIO(connect(daemon)).save_checkpoint(
        {"state_dict": {}, "global_step": 5}, workdir / "b.ckpt"
    )
    assert not (workdir / "b.ckpt").exists()
    io.remove_checkpoint(plain)
    assert not plain.exists()
    with pytest.raises(TypeError, match="cannot store a object"):
        io.save_checkpoint({"state_dict": {}, "global_step": 6, "x": object()}, workdir / "c.ckpt")
