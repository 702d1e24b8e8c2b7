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
it snapshots the training state to ckptd and clears ``should_save``, so ``_save_checkpoint`` never
runs and the weights are written once, by the daemon. Once a step is committed, at the next
callback point on the training thread, ``output_dir/checkpoint-N`` is made (a directory of
``output_dir`` with links to the step's files and a marker naming the step; what ``on_save``
callbacks add there stays in ``output_dir``: the step is read-only), ``on_save`` of every
callback fires and ``best_model_checkpoint`` is set (with ``metric_for_best_model``);
``save_total_limit`` is the snapshot's ``keep_last`` (the daemon's retention, which keeps the best
step too; the ``checkpoint-N`` of removed steps go too). The run is ``run``, else the client's,
else (a client of ``"default"``) one per ``output_dir`` (``default_run``). The snapshot holds:

- ``model``: the model (a Hugging Face directory: ``from_pretrained`` loads it);
- ``optimizer``: the optimizer (unwrapped from accelerate's ``AcceleratedOptimizer``), unless
  ``save_only_model``;
- ``lr_scheduler``: the scheduler's ``state_dict()`` (via ``to_tree``);
- ``rng``: python, numpy, torch and CUDA RNG states (``capture_rng``);
- ``trainer_state``: ``TrainerState`` as JSON values (what ``save_to_json`` writes), with the
  current states of stateful callbacks (as ``_save_checkpoint`` records them).

Beside the model's files: the processing class's ``save_pretrained`` files (tokenizer.json, ...;
made once per training), ``trainer_state.json`` and ``training_args.json`` (no pickle).

It is taken in ``on_step_end``, i.e. after the optimizer step and before this step's logging
and evaluation: ``trainer_state.log_history`` lacks the log line of the saved step itself. A step
already committed in the run (resuming from an older step after an earlier attempt went further)
is kept and not saved again, with a warning: ckptd never overwrites a committed step; one that
another training committed (this one did not resume from the run) is refused with the fix.
``save_strategy="best"`` and ``load_best_model_at_end`` need the Trainer's own checkpoints and are
refused. One process only (no multi-rank coordination yet).

**Resuming.** ``trainer.train(resume_from_checkpoint=True)`` finds the newest ``checkpoint-N``;
the Trainer reads model and ``trainer_state.json`` through its links, and ``on_train_begin`` loads
ckptd step N for the rest (below), from the run that ``trainer_state.json`` names
(``stateful_callbacks["ckptd"]``); a checkpoint that names none is the Trainer's alone.
``train()`` (or ``prepare_resume`` + ``trainer.train(resume_from_checkpoint=...)``) uses the
Trainer's own resume logic, so it skips epochs and batches exactly as resuming from a
``checkpoint-N`` directory does. ``prepare_resume`` reads the checkpoint (checksums verified),
loads the model, and writes a small temporary resume directory: ``trainer_state.json`` and
symbolic links to the checkpoint's model shards, index and config (the Trainer reads those). In
``on_train_begin`` (the optimizer and scheduler exist by then) it loads the optimizer and
scheduler state and removes the directory, and it restores the RNG states when the Trainer
would: at ``on_epoch_begin`` when the checkpoint is at an epoch boundary, else at the first
``on_step_begin`` (after the skipped batches were drawn), as ``Trainer._load_rng_state`` does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
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
from client.integrations.hf_outputs import (
    fill_checkpoint,
    link_checkpoint,
    link_committed,
    processor_files,
    prune_links,
)

if TYPE_CHECKING:
    from transformers.trainer_utils import TrainOutput

log = logging.getLogger(__name__)
Policy = Literal["block", "skip", "error"]
_CONFIG_FILES = frozenset({"config.json", "generation_config.json"})  # written from the model
#: The key of ``trainer_state.json``'s ``stateful_callbacks`` naming the ckptd step it belongs to
#: (not a callback's class name: the Trainer never tries to rebuild a callback from it).
STATE_KEY = "ckptd"


def default_run(output_dir: str | os.PathLike[str]) -> str:
    """The run of a ``CkptdCallback`` given no run (and a client of the run ``"default"``): one
    per ``output_dir``, ``<its name>-<8 hex digits of its absolute path>``, so two trainings
    never share one by accident."""
    path = os.path.abspath(os.fspath(output_dir))
    name = "".join(c if c.isalnum() or c in "_-." else "_" for c in os.path.basename(path))
    name = name.lstrip("._-")[:100] or "run"
    return f"{name}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


@dataclass
class _Resume:
    step: int
    loaded: dict[str, Any]
    directory: str
    rng_at: Literal["epoch", "step", "done"] = "epoch"


class CkptdCallback(TrainerCallback):
    """Send the ``Trainer``'s checkpoints to ckptd instead of writing them synchronously.

    ``client``: a connected ``Client``; ``run``: the ckptd run (by default the client's, unless
    that is ``"default"``: then one per ``output_dir``, ``default_run``; a resumed training
    carries on in the run it resumed from);
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
        self._resumed_run: str | None = None  # the ckptd run this training resumed from
        self._saving_run: str | None = None  # the run of the snapshots taken (links, retention)
        self._last_step: int | None = None
        self._warned_committed = False  # one warning for all the already-committed steps skipped
        self._unannounced: list[SnapshotHandle] = []  # on_save not yet fired for these
        self._processor: tuple[object, dict[str, bytes]] | None = None  # its files, made once

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
        self._link_committed(trainer.args)
        return self

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._link_committed(args)  # a callback given to Trainer(callbacks=[...])

    def _link_committed(self, args: TrainingArguments) -> None:
        """Before ``train()`` looks for ``checkpoint-N`` (``resume_from_checkpoint=True``): every
        committed step of this training's run has its entry, also one committed after the
        trainer that snapshotted it died."""
        made = link_committed(str(args.output_dir), self.client.root, self._run(args))
        if made:
            log.info("linked %s committed step(s) into %s: %s", len(made), args.output_dir, made)

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
        run = self._run(trainer.args)
        if step is None and latest_step(self.client, run) is None:
            return None
        found, step_dir, loaded = load_step(self.client, run=run, step=step)
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
            if entry != "trainer_state.json":  # written above, from the tree
                os.symlink(step_dir / entry, os.path.join(directory, entry))
        self._discard_resume()
        self._resume = _Resume(found, loaded, directory)
        self._resumed_run = run
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
        self._processor = None
        if self._resume is None:
            self._resumed_run = None
            if state.global_step > 0:
                self._resume_from_state(state)
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
            self._resumed_run = None
            return
        if resume.directory:
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
        self._announce(args, state, control)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_save:
            control.should_save = False  # the Trainer's own _save_checkpoint must not run
            self._save(args, state, control, kwargs)
        self._announce(args, state, control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_save:
            control.should_save = False
            self._save(args, state, control, kwargs)
        self._announce(args, state, control)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._announce(args, state, control)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._announce(args, state, control)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._discard_resume()
        if self.wait_at_end:
            self.wait()
        self._announce(args, state, control)

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
            if self._resume.directory:
                shutil.rmtree(self._resume.directory, ignore_errors=True)
            self._resume = None

    def _run(self, args: TrainingArguments) -> str:
        """The run this training saves to (and ``prepare_resume`` reads)."""
        if self.run is not None:
            return self.run
        if self._resumed_run is not None:
            return self._resumed_run
        if self.client.run != "default":
            return self.client.run
        return default_run(str(args.output_dir))

    def _resume_from_state(self, state: TrainerState) -> None:
        """The Trainer resumed at ``state.global_step`` from a checkpoint of its choosing
        (``resume_from_checkpoint=True`` finds ``checkpoint-N``): when that checkpoint's
        ``trainer_state.json`` names a ckptd step (``stateful_callbacks["ckptd"]``, written by
        ``_save``) at that step, load it, so optimizer, scheduler and RNG are restored as
        ``prepare_resume`` does. Any other checkpoint (the Trainer's own, someone else's) is the
        Trainer's to load: nothing of ckptd's is."""
        saved: Any = state.stateful_callbacks  # a dict once loaded from trainer_state.json
        record = saved.get(STATE_KEY) if isinstance(saved, dict) else None
        if not isinstance(record, dict) or record.get("step") != state.global_step:
            return
        run, root = record.get("run"), record.get("root")
        if not isinstance(run, str) or Path(str(root)).resolve() != self.client.root.resolve():
            log.warning(
                "the Trainer resumed from a ckptd checkpoint of %s (run %s), not of this client's "
                "root %s: not restoring optimizer, scheduler and RNG from ckptd",
                root,
                run,
                self.client.root,
            )
            return
        found, step_dir, loaded = load_step(self.client, run=run, step=state.global_step)
        self._resume = _Resume(found, loaded, "")
        self._resumed_run = run
        log.info("resuming from %s (step %d), the Trainer's resume_from_checkpoint", step_dir, found)

    def _announce(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        """On the training thread: for each snapshot committed since the last call (in step
        order), link ``output_dir/checkpoint-N`` to it and fire ``on_save`` of every callback, as
        ``_save_checkpoint`` would have; drop the links of steps that retention removed."""
        done = [h for h in self._unannounced if h.done_now()]
        self._unannounced = [h for h in self._unannounced if h not in done]  # failures: wait()
        committed = sorted((h for h in done if h.path is not None), key=lambda h: h.step)
        run = self._saving_run or self._run(args)
        run_dir = self.client.root / run
        for h in committed:
            if h.path is None:
                continue
            link = link_checkpoint(str(args.output_dir), h.step, h.path, self.client.root, run)
            if link is None and not h.path.exists():
                # Retention already removed it (a later step committed first): there is no
                # checkpoint-N for on_save callbacks to write into or read from.
                log.info("step %s was removed by retention before its on_save; not announced", h.step)
                continue
            self._note_best(args, state)
            if self.trainer is not None:
                # As the Trainer's own on_save sees it: global_step is the saved step (callbacks
                # name f"checkpoint-{state.global_step}"); training is at a later step, restored.
                should_save, now = control.should_save, state.global_step
                state.global_step = h.step
                before = _file_stats(h.path)
                try:
                    self.trainer.callback_handler.on_save(args, state, control)
                finally:
                    state.global_step = now
                    control.should_save = should_save  # on_save clears it; a save to come stays
                _check_untouched(h.path, before)
            if link is not None:
                fill_checkpoint(link, h.path)
        if committed:
            prune_links(str(args.output_dir), run_dir)
        self._note_best(args, state)

    @staticmethod
    def _note_best(args: TrainingArguments, state: TrainerState) -> None:
        """``best_model_checkpoint``, as ``_save_checkpoint`` sets it: the link of the best step
        (``metric_for_best_model``), once that step is committed."""
        best = getattr(state, "best_global_step", None)
        if args.metric_for_best_model is None or not best:
            return
        link = Path(str(args.output_dir)) / f"checkpoint-{best}"
        if link.is_dir():
            state.best_model_checkpoint = str(link)

    def _save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, kwargs: Mapping[str, Any]
    ) -> None:
        step = state.global_step
        if step == self._last_step:
            return  # already saved at this step (e.g. the last step of an epoch)
        run = self._run(args)
        if (self.client.root / run / paths.step_dirname(step)).exists():
            if self._resumed_run != run:  # another training's step: never skip nor prune it
                raise CheckpointError(
                    f"[run={run} step={step}] is already committed by another training (this one "
                    f"did not resume from run {run!r}); ckptd never overwrites a committed step: "
                    "give this training its own run, CkptdCallback(run=...), or resume from that "
                    "run (trainer.train(resume_from_checkpoint=True), CkptdCallback.train())",
                    code="already_committed",
                )
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
        trainer_state = self._trainer_state(state, control)
        trainer_state["stateful_callbacks"][STATE_KEY] = {
            "root": str(self.client.root.resolve()),
            "run": run,
            "step": step,
        }
        tree["trainer_state"] = to_tree(trainer_state, "trainer_state")
        tree["step"] = step
        files = {
            **self._processor_files(kwargs.get("processing_class") or kwargs.get("tokenizer")),
            # As TrainerState.save_to_json and TrainingArguments.to_json_string write them (no
            # training_args.bin: that is a pickle).
            "trainer_state.json": (json.dumps(trainer_state, indent=2, sort_keys=True) + "\n").encode(),
            "training_args.json": args.to_json_string().encode(),  # type: ignore[no-untyped-call]
        }
        limit = args.save_total_limit
        keep_last = limit if limit is not None and limit > 0 else None
        # As rotate_checkpoints, retention never removes the best step (best_model_checkpoint).
        best = getattr(state, "best_global_step", None)
        keep_steps = [best] if args.metric_for_best_model is not None and best else []
        handle = self.client.snapshot(
            tree,
            step=step,
            run=run,
            policy=self.policy,
            files=files,
            keep_last=keep_last,
            keep_steps=keep_steps,
        )
        self._last_step = step
        self._saving_run = run
        # Forget committed ones; pending and failed ones stay for wait() (a failure is also raised
        # by the client's next snapshot()).
        self.handles = [h for h in self.handles if h.path is None and not h.skipped]
        self.handles.append(handle)
        if not handle.skipped:
            self._unannounced.append(handle)

    def _processor_files(self, processing_class: object) -> dict[str, bytes]:
        """The tokenizer's (processor's) files, made by its ``save_pretrained`` once per training."""
        if self._processor is None or self._processor[0] is not processing_class:
            self._processor = (processing_class, processor_files(processing_class, _CONFIG_FILES))
        return self._processor[1]

    def _trainer_state(self, state: TrainerState, control: TrainerControl) -> dict[str, Any]:
        """``TrainerState`` as JSON values (what ``save_to_json`` writes), with stateful
        callbacks' current states recorded as ``Trainer._save_checkpoint`` records them."""
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
        return dict(data)


def _file_stats(step_dir: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime) of the files at the top of a committed step."""
    stats = {}
    try:
        with os.scandir(step_dir) as entries:
            for e in entries:
                if e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    stats[e.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
    except FileNotFoundError:  # retention removed it already
        pass
    return stats


def _check_untouched(step_dir: Path, before: dict[str, tuple[int, int, int]]) -> None:
    """After ``on_save``: a callback running as root (which file modes do not stop) may have
    written into the read-only step through a link of ``checkpoint-N``. Raise if the step no
    longer verifies; a file rewritten with the same bytes is only warned about."""
    after = _file_stats(step_dir)
    if not after:
        return
    touched = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
    if not touched:
        return
    problems = reading.verify(step_dir)
    where = f"{step_dir} ({', '.join(touched)})"
    fix = (
        "on_save callbacks may add files to checkpoint-N, never write over the links into the "
        "step there (remove a link first: os.remove removes the link only)"
    )
    if problems:
        raise CheckpointError(
            f"an on_save callback wrote into the committed step {where}; it no longer verifies "
            f"({problems[0]}): {fix}",
            code="restore_mismatch",
        )
    log.warning("an on_save callback rewrote files of the committed step %s (same bytes): %s", where, fix)


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
