"""ckptd for the Hugging Face ``Trainer``: checkpoints without the synchronous ``_save_checkpoint``.

>>> client = Client.connect()                                              # doctest: +SKIP
>>> args = TrainingArguments(output_dir, save_strategy="steps", save_steps=500, ...)  # doctest: +SKIP
>>> trainer = Trainer(model, args, train_dataset=ds)                        # doctest: +SKIP
>>> ckpt = CkptdCallback.attach(trainer, client)                            # doctest: +SKIP
>>> ckpt.train()          # resumes from the newest ckptd checkpoint if there is one  # doctest: +SKIP

**Saving.** The ``Trainer`` decides to save through ``control.should_save``, which its
``DefaultFlowCallback`` sets in ``on_step_end`` (``save_strategy="steps"``, and at the last step)
or ``on_epoch_end`` (``"epoch"``); ``_maybe_log_save_evaluate`` then runs ``_save_checkpoint``.
This callback runs after ``DefaultFlowCallback`` in those same events: when ``should_save`` is set,
it snapshots the training state to ckptd and clears ``should_save``, so ``_save_checkpoint`` (and
``on_save``) never run and no ``checkpoint-N`` directory is written. The snapshot holds:

- ``model``: the model (a Hugging Face directory: ``from_pretrained`` loads it);
- ``optimizer``: the optimizer (unwrapped from accelerate's ``AcceleratedOptimizer``), unless
  ``save_only_model``;
- ``lr_scheduler``: the scheduler's ``state_dict()`` (via ``to_tree``);
- ``rng``: python, numpy, torch and CUDA RNG states (``capture_rng``);
- ``trainer_state``: ``TrainerState`` as JSON values (what ``save_to_json`` writes), with the
  current states of stateful callbacks (as ``_save_checkpoint`` records them).

It is taken in ``on_step_end``, i.e. after the optimizer step and before this step's logging
and evaluation: ``trainer_state.log_history`` lacks the log line of the saved step itself. A step
already committed in the run (resuming from an older step after an earlier attempt went further)
is kept and not saved again, with a warning: ckptd never overwrites a committed step.
``save_strategy="best"`` and ``load_best_model_at_end`` need the Trainer's own checkpoints and are
refused. One process only (no multi-rank coordination yet).

**Resuming.** ``train()`` (or ``prepare_resume`` + ``trainer.train(resume_from_checkpoint=...)``)
uses the Trainer's own resume logic, so it skips epochs and batches exactly as resuming from a
``checkpoint-N`` directory does. ``prepare_resume`` reads the checkpoint (checksums verified),
loads the model, and writes a small temporary resume directory: ``trainer_state.json`` and
symbolic links to the checkpoint's model shards, index and config (the Trainer reads those
itself). In ``on_train_begin`` (the optimizer and scheduler exist by then) it loads the optimizer
and scheduler state and removes the directory, and it restores the RNG states when the Trainer
would: at ``on_epoch_begin`` when the checkpoint is at an epoch boundary, else at the first
``on_step_begin`` (after the skipped batches were drawn), as ``Trainer._load_rng_state`` does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from ckptd import paths, reading
from ckptd.manifest import read_manifest
from client import restore as restore_mod
from client.client import Client
from client.errors import CheckpointError
from client.handle import SnapshotHandle
from client.integrations import capture_rng, from_tree, latest_step, load_step, restore_rng, to_tree

if TYPE_CHECKING:
    from transformers.trainer_utils import TrainOutput

log = logging.getLogger(__name__)
Policy = Literal["block", "skip", "error"]


@dataclass
class _Resume:
    step: int
    loaded: dict[str, Any]
    directory: str
    rng_at: Literal["epoch", "step", "done"] = "epoch"


class CkptdCallback(TrainerCallback):
    """Send the ``Trainer``'s checkpoints to ckptd instead of writing them synchronously.

    ``client``: a connected ``Client``; ``run``: the ckptd run (the client's by default);
    ``policy``: ``snapshot()``'s policy when both slots are still being written (``"block"``,
    ``"skip"`` or ``"error"``); ``wait_at_end``: wait for the last snapshots to be durable in
    ``on_train_end`` (raising a failure).
    """

    def __init__(
        self, client: Client, *, run: str | None = None, policy: Policy = "block", wait_at_end: bool = True
    ) -> None:
        self.client = client
        self.run = run
        self.policy: Policy = policy
        self.wait_at_end = wait_at_end
        self.handles: list[SnapshotHandle] = []
        self.trainer: Trainer | None = None
        self._resume: _Resume | None = None
        self._last_step: int | None = None
        self._warned_committed = False  # one warning for all the already-committed steps skipped

    # --- wiring ----------------------------------------------------------------------------------

    @classmethod
    def attach(cls, trainer: Trainer, client: Client, **options: Any) -> CkptdCallback:
        """Create the callback, add it to ``trainer`` and bind it (see ``bind``)."""
        callback = cls(client, **options)
        trainer.add_callback(callback)
        return callback.bind(trainer)

    def bind(self, trainer: Trainer) -> CkptdCallback:
        """Give the callback its ``Trainer``: needed for ``train``/``prepare_resume``, and so that
        the states of other stateful callbacks (e.g. early stopping) are saved."""
        self.trainer = trainer
        return self

    def train(self, *, resume: bool = True, step: int | None = None, **train_kwargs: Any) -> TrainOutput:
        """``trainer.train()``, resuming from the newest ckptd checkpoint of the run (or ``step``)
        when ``resume`` and one exists."""
        trainer = self._bound()
        resume_dir = self.prepare_resume(step=step) if resume else None
        return trainer.train(resume_from_checkpoint=resume_dir, **train_kwargs)

    def prepare_resume(self, *, step: int | None = None) -> str | None:
        """Load checkpoint ``step`` (default: the newest that verifies) for a resumed run and return
        the directory to pass as ``trainer.train(resume_from_checkpoint=...)``; None when the run
        has no checkpoint and ``step`` is None."""
        trainer = self._bound()
        if step is None and latest_step(self.client, self.run) is None:
            return None
        found, step_dir, loaded = load_step(self.client, run=self.run, step=step)
        missing = {"model", "trainer_state"} - set(loaded)
        if missing:
            raise CheckpointError(
                f"{step_dir} is not a CkptdCallback checkpoint (no {sorted(missing)})",
                code="restore_mismatch",
            )
        restore_mod.apply({"model": trainer.model}, {"model": loaded["model"]})
        directory = tempfile.mkdtemp(prefix=f"ckptd-resume-{found}-")
        with open(os.path.join(directory, "trainer_state.json"), "w") as f:
            json.dump(loaded["trainer_state"], f, indent=2, sort_keys=True)
        for entry in reading.model_files(read_manifest(step_dir)):  # what save_pretrained writes
            os.symlink(step_dir / entry, os.path.join(directory, entry))
        self._discard_resume()
        self._resume = _Resume(found, loaded, directory)
        log.info("resuming from %s (step %d)", step_dir, found)
        return directory

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every snapshot taken so far is durable; raises the first failure."""
        handles, self.handles = self.handles, []
        for h in handles:
            h.wait(timeout)

    # --- events ----------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _check_args(args)
        resume = self._resume
        if resume is None:
            return
        if state.global_step != resume.step:
            log.warning(
                "the Trainer starts at step %d, not at the prepared ckptd step %d: not restoring "
                "optimizer, scheduler and RNG (was resume_from_checkpoint passed to train()?)",
                state.global_step,
                resume.step,
            )
            self._discard_resume()
            return
        shutil.rmtree(resume.directory, ignore_errors=True)
        model, optimizer, scheduler = kwargs.get("model"), kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        if optimizer is not None and "optimizer" in resume.loaded:
            restore_mod.apply(
                {"model": model, "optimizer": _unwrap(optimizer)},
                {"model": resume.loaded["model"], "optimizer": resume.loaded["optimizer"]},
            )
        if scheduler is not None and "lr_scheduler" in resume.loaded:
            scheduler.load_state_dict(from_tree(resume.loaded["lr_scheduler"]))
        # Trainer._run_epoch restores RNG states before drawing the resumed epoch's order when the
        # checkpoint is at an epoch boundary, else after drawing it and skipping the done batches.
        ga = max(args.gradient_accumulation_steps, 1)
        loader = kwargs.get("train_dataloader")
        try:
            n = len(loader) if loader is not None else None
        except TypeError:
            n = None
        per_epoch = max(n // ga + int(n % ga > 0), 1) if n else max(args.max_steps, 1)
        mid_epoch = resume.step % per_epoch > 0 and not args.ignore_data_skip
        resume.rng_at = "step" if mid_epoch else "epoch"

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._maybe_restore_rng("epoch")

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._maybe_restore_rng("step")

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_save:
            control.should_save = False  # the Trainer's own _save_checkpoint must not run
            self._save(args, state, control, kwargs)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_save:
            control.should_save = False
            self._save(args, state, control, kwargs)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._discard_resume()
        if self.wait_at_end:
            self.wait()

    # --- internals -------------------------------------------------------------------------------

    def _bound(self) -> Trainer:
        if self.trainer is None:
            raise RuntimeError("bind(trainer) first, or create the callback with CkptdCallback.attach")
        return self.trainer

    def _maybe_restore_rng(self, event: Literal["epoch", "step"]) -> None:
        resume = self._resume
        if resume is not None and resume.rng_at == event:
            if "rng" in resume.loaded:
                restore_rng(resume.loaded["rng"])
            resume.rng_at = "done"
            self._resume = None  # everything is restored; free the loaded tensors

    def _discard_resume(self) -> None:
        if self._resume is not None:
            shutil.rmtree(self._resume.directory, ignore_errors=True)
            self._resume = None

    def _save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, kwargs: Mapping[str, Any]
    ) -> None:
        step = state.global_step
        if step == self._last_step:
            return  # already saved at this step (e.g. the last step of an epoch)
        run = self.run or self.client.run
        if (self.client.root / run / paths.step_dirname(step)).exists():
            # Resumed from an older step: an earlier attempt committed this one (ckptd never
            # overwrites a committed step). Keep it rather than fail the training.
            if not self._warned_committed:
                log.warning(
                    "[run=%s step=%d] already committed by an earlier attempt: not saved again, nor "
                    "will later steps already committed be (this is the only warning); to save "
                    "them, resume into a new run: CkptdCallback(run=...)",
                    run,
                    step,
                )
            self._warned_committed = True
            self._last_step = step
            return
        model = kwargs.get("model")
        if model is None:
            raise CheckpointError("the Trainer passed no model to the callback", code="restore_mismatch")
        tree: dict[str, Any] = {"model": model}
        optimizer = kwargs.get("optimizer")
        if optimizer is not None and not args.save_only_model:
            tree["optimizer"] = _unwrap(optimizer)
        scheduler = kwargs.get("lr_scheduler")
        if scheduler is not None and not args.save_only_model and hasattr(scheduler, "state_dict"):
            tree["lr_scheduler"] = to_tree(scheduler.state_dict(), "lr_scheduler")
        tree["rng"] = capture_rng()
        tree["trainer_state"] = self._trainer_state(state, control)
        tree["step"] = step
        handle = self.client.snapshot(tree, step=step, run=run, policy=self.policy)
        self._last_step = step
        # Forget committed ones; pending and failed ones stay for wait() (a failure is also raised
        # by the client's next snapshot()).
        self.handles = [h for h in self.handles if h.path is None and not h.skipped]
        self.handles.append(handle)

    def _trainer_state(self, state: TrainerState, control: TrainerControl) -> Any:
        """``TrainerState`` as JSON values, with stateful callbacks' current states recorded as
        ``Trainer._save_checkpoint`` records them."""
        data = json.loads(json.dumps(dataclasses.asdict(state)))  # as TrainerState.save_to_json
        if self.trainer is not None:
            self.trainer.store_flos()
            data["total_flos"] = self.trainer.state.total_flos
            stateful = [*self.trainer.callback_handler.callbacks, control]
        else:
            stateful = [control]
        saved = data.setdefault("stateful_callbacks", {})
        for cb in stateful:
            if isinstance(cb, ExportableState) and not isinstance(saved.get(type(cb).__name__), list):
                saved[type(cb).__name__] = json.loads(json.dumps(cb.state()))
        return to_tree(data, "trainer_state")


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"cannot snapshot an optimizer of type {type(inner).__name__}")
    return inner


def _check_args(args: TrainingArguments) -> None:
    if str(getattr(args.save_strategy, "value", args.save_strategy)) == "best":
        raise ValueError(
            "CkptdCallback cannot take over save_strategy='best' (the Trainer decides it after the "
            "callbacks ran); use 'steps' or 'epoch'"
        )
    if args.load_best_model_at_end:
        raise ValueError(
            "CkptdCallback does not support load_best_model_at_end (it needs checkpoint-N directories)"
        )
    if args.world_size > 1:
        raise ValueError(
            "CkptdCallback supports one training process (ckptd has no multi-rank coordination yet)"
        )
