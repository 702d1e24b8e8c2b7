"""What a review of the Hugging Face integration found, each reproduced with the real libraries.

A real ``transformers.Trainer`` (CPU, a tiny GPT-2) against a real daemon: ``on_save`` callbacks
that write into ``checkpoint-N`` (the usual recipe) must not touch the committed step; committed
steps are read-only for their owner (a second, unprivileged user: root bypasses modes) and every
deletion path still removes them; a training resumed from someone else's checkpoint keeps that
checkpoint's weights; a second training never skips nor prunes another's steps; the daemon's
``--keep-last`` bounds a snapshot's; an unchanged tokenizer is encoded once; retention keeps the
best step; processor files ckptd cannot take are left out with a warning, not a failed save.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_hf_trainer_expectations import Connect, make_trainer, steps_of, tiny_tokenizer
from transformers import TrainerCallback

import ckptd
from ckptd import protocol
from client import Client
from client.errors import CheckpointError
from client.integrations.hf_outputs import MARKER, processor_files
from client.integrations.hf_trainer import CkptdCallback, default_run

OTHER_UID = 65534  # nobody: a second, unprivileged user


class AddFiles(TrainerCallback):  # type: ignore[misc]
    """The usual on_save recipe: save an adapter and a config into checkpoint-<global_step>."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_file({"lora": torch.ones(2)}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text("{}\n")


def run_dir_of(daemon: Any, out: Path) -> Path:
    return Path(daemon.root) / default_run(out)


def as_other_user(code: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -c code`` as uid 65534 (it may read everything, it writes as itself)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    argv = [
        "setpriv",
        f"--reuid={OTHER_UID}",
        f"--regid={OTHER_UID}",
        "--clear-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
        sys.executable,
        "-c",
        code,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)


def chown_tree(path: Path, uid: int) -> None:
    os.chown(path, uid, uid)
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)


# --- item 1: checkpoint-N is output_dir's, the step is read-only -------------------------------


def test_on_save_files_land_in_output_dir_not_in_the_step(
    workdir: Path, daemon: Any, connect: Connect
) -> None:
    out = workdir / "out"
    trainer = make_trainer(
        out, max_steps=4, tokenizer=tiny_tokenizer(), save_strategy="steps", save_steps=2, save_total_limit=1
    )
    trainer.add_callback(AddFiles())
    CkptdCallback.attach(trainer, connect(daemon)).train()
    run_dir = run_dir_of(daemon, out)
    step_dir = run_dir / "step-000004"
    checkpoint = out / "checkpoint-4"
    assert checkpoint.is_dir() and not checkpoint.is_symlink()
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "adapter_model.safetensors").is_symlink()
    assert "adapter_model.safetensors" not in os.listdir(step_dir)
    assert "adapter_config.json" not in os.listdir(step_dir)
    assert ckptd.reading.verify(step_dir) == []
    # What from_pretrained and the Trainer's resume read: links into the step, and the marker.
    assert (checkpoint / "model.safetensors").resolve() == (step_dir / "model.safetensors").resolve()
    assert (checkpoint / "tokenizer.json").is_symlink() and (checkpoint / "trainer_state.json").is_symlink()
    marker = json.loads((checkpoint / MARKER).read_text())
    assert (marker["run"], marker["step"]) == (run_dir.name, 4)
    # Retention removed step 2 and its checkpoint-2 with the callback's files; step 4 intact.
    assert steps_of(run_dir) == [4]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert ckptd.reading.verify(step_dir) == []


def test_committed_step_is_read_only_for_its_owner(workdir: Path, daemon: Any, client: Client) -> None:
    client.snapshot({"model": {"w": torch.ones(4)}, "optimizer": {"m": torch.zeros(3)}}, step=1).wait(60)
    step_dir = Path(daemon.root) / "default" / "step-000001"
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    dirs = [step_dir, *(p for p in step_dir.rglob("*") if p.is_dir())]
    assert files and len(dirs) == 2
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o444"}
    assert {oct(p.stat().st_mode & 0o777) for p in dirs} == {"0o555"}
    chown_tree(Path(daemon.root), OTHER_UID)  # as if the daemon ran as that user
    code = f"""
import json, os
res = {{}}
for what, fn in (
    ("rewrite", lambda: open({str(files[0])!r}, "r+b").close()),
    ("replace", lambda: open({str(step_dir / "model.safetensors")!r}, "wb").close()),
    ("add", lambda: open({str(step_dir / "extra.safetensors")!r}, "wb").close()),
    ("add_sub", lambda: open({str(step_dir / "optimizer" / "x.json")!r}, "wb").close()),
):
    try:
        fn()
        res[what] = "written"
    except PermissionError:
        res[what] = "PermissionError"
print(json.dumps(res))
"""
    done = as_other_user(code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == dict.fromkeys(
        ("rewrite", "replace", "add", "add_sub"), "PermissionError"
    )
    assert ckptd.reading.verify(step_dir) == []


def test_every_deletion_path_removes_sealed_steps_as_their_owner(
    workdir: Path, daemon: Any, client: Client
) -> None:
    for step in range(1, 6):
        client.snapshot(
            {"model": {"w": torch.full((4,), float(step))}, "opt": {"m": torch.ones(2)}}, step=step
        ).wait(60)
    root = Path(daemon.root)
    run_dir = root / "default"
    for name in ("step-000009.ckptd-tmp-swept", "step-000008.ckptd-tmp-discarded"):  # sealed leftovers
        shutil.copytree(run_dir / "step-000005", run_dir / name, copy_function=shutil.copy2)
        os.chmod(run_dir / name, 0o555)
    chown_tree(root, OTHER_UID)
    ckptd_cli = str(Path(sys.executable).parent / "ckptd")
    code = f"""
import subprocess
from pathlib import Path
from ckptd import commit
from ckptd.storage import Storage
run = Path({str(run_dir)!r})
for argv in (["prune", str(run), "--keep-last", "4"], ["rm", str(run / "step-000002")]):
    print(subprocess.run([{ckptd_cli!r}, *argv], capture_output=True, text=True).stdout)
commit.apply_retention(Storage(), run, 2, run / "step-000005")
commit.discard(Storage(), commit.StagedCheckpoint(run, 8, run / "step-000008.ckptd-tmp-discarded"))
commit.sweep(Storage(), run.parent)
"""
    done = as_other_user(code)
    assert done.returncode == 0, done.stderr
    assert steps_of(run_dir) == [4, 5], done.stdout + done.stderr
    assert sorted(p.name for p in run_dir.iterdir() if "ckptd-tmp" in p.name) == []


# --- item 2: resuming someone else's checkpoint -------------------------------------------------


def test_resume_from_a_foreign_checkpoint_keeps_its_weights(
    workdir: Path, daemon: Any, connect: Connect
) -> None:
    client = connect(daemon)
    a = make_trainer(workdir / "c", seed=1, max_steps=2, save_strategy="steps", save_steps=2)
    CkptdCallback.attach(a, client).train()  # an earlier ckptd training of output_dir c
    b = make_trainer(workdir / "b", seed=2, max_steps=2, save_strategy="steps", save_steps=2)
    b.train()  # a stock Hugging Face checkpoint, elsewhere
    stock = load_file(str(workdir / "b" / "checkpoint-2" / "model.safetensors"))
    c = make_trainer(workdir / "c", seed=3, max_steps=2, save_strategy="steps", save_steps=2)
    CkptdCallback.attach(c, client)
    c.train(resume_from_checkpoint=str(workdir / "b" / "checkpoint-2"))
    got = c.model.state_dict()
    assert not [k for k in stock if not torch.equal(stock[k], got[k])]


# --- item 3: a second training, retention bounds ------------------------------------------------


def test_second_training_gets_its_own_default_run(workdir: Path, daemon: Any, connect: Connect) -> None:
    client = connect(daemon)
    a = make_trainer(workdir / "a", seed=1, max_steps=2, save_strategy="steps", save_steps=2)
    CkptdCallback.attach(a, client).train()
    b = make_trainer(
        workdir / "b", seed=2, max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=1
    )
    CkptdCallback.attach(b, client).train()
    assert (workdir / "b" / "checkpoint-4").is_dir()
    assert steps_of(run_dir_of(daemon, workdir / "a")) == [2]  # a's step is not b's to prune
    assert steps_of(run_dir_of(daemon, workdir / "b")) == [4]
    assert default_run(workdir / "a") != default_run(workdir / "b")
    assert default_run(workdir / "a").startswith("a-")


def test_second_training_into_a_shared_run_is_refused(workdir: Path, daemon: Any, connect: Connect) -> None:
    client = connect(daemon)
    a = make_trainer(workdir / "a", seed=1, max_steps=2, save_strategy="steps", save_steps=2)
    CkptdCallback.attach(a, client, run="shared").train()
    b = make_trainer(workdir / "b", seed=2, max_steps=4, save_strategy="steps", save_steps=2)
    CkptdCallback.attach(b, client, run="shared")
    with pytest.raises(
        CheckpointError, match=r"run=shared step=2.*another training.*CkptdCallback\(run=\.\.\.\)"
    ):
        b.train()
    assert steps_of(Path(daemon.root) / "shared") == [2]
    assert ckptd.reading.verify(Path(daemon.root) / "shared" / "step-000002") == []


def test_daemon_keep_last_bounds_a_snapshots_keep_last(start_daemon: Any, connect: Connect) -> None:
    d = start_daemon("--keep-last", "2")
    client = connect(d)
    for step in range(1, 5):
        client.snapshot({"w": torch.full((2,), float(step))}, step=step, keep_last=3).wait(60)
    assert steps_of(Path(d.root) / "default") == [3, 4]  # the operator's 2, not the snapshot's 3
    client.snapshot({"w": torch.zeros(2)}, step=5, keep_last=1).wait(60)
    assert steps_of(Path(d.root) / "default") == [5]


# --- item 4: an unchanged tokenizer is encoded once ----------------------------------------------


def test_unchanged_blob_is_base64_encoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    big = np.random.default_rng(0).bytes(9 * 2**20)  # a 9 MiB tokenizer.json
    calls = []
    real = protocol.base64.b64encode

    def counting(data: bytes) -> bytes:
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(protocol.base64, "b64encode", counting)
    frames = [
        protocol.encode_snapshot(
            i, "r", i, 0, 0, {"$dict": {}}, {}, blobs={"tokenizer.json": big, "t.json": b"{}"}
        )
        for i in (1, 2)
    ]
    assert calls == [len(big), 2, 2]  # the big one once; the small one is not worth caching
    for i, frame in zip((1, 2), frames, strict=True):
        msg = protocol.decode_client(frame[4:])
        assert isinstance(msg, protocol.Snapshot) and msg.id == i
        assert msg.blobs == {"tokenizer.json": big, "t.json": b"{}"}
    changed = big[:-1] + b"x"
    protocol.encode_snapshot(3, "r", 3, 0, 0, {"$dict": {}}, {}, blobs={"tokenizer.json": changed})
    assert calls[-1] == len(changed)


# --- item 6: processor files ckptd refuses ------------------------------------------------------


def test_processor_files_ckptd_cannot_name_are_left_out(
    workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Processor:
        def save_pretrained(self, d: str) -> None:
            for name in ("preprocessor_config.json", "README", "x" * 130 + ".json", "vocab file.txt"):
                Path(d, name).write_text("{}")

    with caplog.at_level(logging.WARNING, logger="client.integrations.hf_outputs"):
        files = processor_files(Processor())
    assert list(files) == ["preprocessor_config.json"]
    assert len([r for r in caplog.records if "not saving" in r.getMessage()]) == 3


# --- item 5: retention keeps the best step ------------------------------------------------------


def test_retention_keeps_the_best_step(workdir: Path, daemon: Any, connect: Connect) -> None:
    out = workdir / "out"
    trainer = make_trainer(
        out,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        metric_for_best_model="loss",
        greater_is_better=True,  # the loss falls: the first evaluation (step 2) is the best
        save_total_limit=1,
    )
    CkptdCallback.attach(trainer, connect(daemon)).train()
    assert trainer.state.best_global_step == 2
    assert steps_of(run_dir_of(daemon, out)) == [2, 6]
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-2")
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]


def test_keep_steps_survive_retention(client: Client, daemon: Any) -> None:
    for step in range(1, 5):
        client.snapshot({"w": torch.full((2,), float(step))}, step=step, keep_last=1, keep_steps=[1]).wait(60)
    assert steps_of(Path(daemon.root) / "default") == [1, 4]


class SaveProcessorInto(TrainerCallback):  # type: ignore[misc]
    """The reviewer's recipe (LLaMA-Factory's SaveProcessorCallback too): the model's and the
    processor's save_pretrained into checkpoint-<global_step>."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = f"{args.output_dir}/checkpoint-{state.global_step}"
        kwargs["model"].save_pretrained(folder)
        kwargs["processing_class"].save_pretrained(folder)


def test_save_pretrained_into_checkpoint_n_leaves_the_step_intact(
    workdir: Path, daemon: Any, connect: Connect
) -> None:
    out = workdir / "out"
    tok = tiny_tokenizer()
    trainer = make_trainer(out, max_steps=2, tokenizer=tok, save_strategy="steps", save_steps=2)
    trainer.add_callback(SaveProcessorInto())
    CkptdCallback.attach(trainer, connect(daemon)).train()
    step_dir = run_dir_of(daemon, out) / "step-000002"
    assert ckptd.reading.verify(step_dir) == []
    assert not [
        p for p in step_dir.iterdir() if p.stat().st_mtime_ns > (step_dir / "ckptd.json").stat().st_mtime_ns
    ]
    checkpoint = out / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").is_symlink()  # the callback's own file
    assert not (checkpoint / "tokenizer.json").is_symlink()
    assert (checkpoint / "trainer_state.json").is_symlink() and (checkpoint / MARKER).is_file()


class RewriteState(TrainerCallback):  # type: ignore[misc]
    """Writes over a link of checkpoint-N (as root, which file modes do not stop)."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        with open(f"{args.output_dir}/checkpoint-{state.global_step}/trainer_state.json", "w") as f:
            f.write("{}\n")


def test_root_callback_writing_over_the_step_is_not_silent(
    workdir: Path, daemon: Any, connect: Connect
) -> None:
    trainer = make_trainer(workdir / "out", max_steps=2, save_strategy="steps", save_steps=2)
    trainer.add_callback(RewriteState())
    CkptdCallback.attach(trainer, connect(daemon))
    with pytest.raises(CheckpointError, match=r"wrote into the committed step.*trainer_state\.json"):
        trainer.train()
