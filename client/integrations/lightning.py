"""ckptd for PyTorch Lightning: ``CkptdCheckpointIO``, a ``CheckpointIO`` plugin.

>>> trainer = L.Trainer(                                                   # doctest: +SKIP
...     plugins=[CkptdCheckpointIO(Client.connect())],
...     callbacks=[ModelCheckpoint(dirpath="ckpts", every_n_train_steps=500)],
... )
>>> trainer.fit(model)                                                     # doctest: +SKIP
>>> trainer.fit(model, ckpt_path="ckpts/epoch=0-step=500.ckpt")            # resumes  # doctest: +SKIP

Needs the ``lightning`` package (``pip install ckptd[lightning]``).

**Paths.** Lightning names each checkpoint by a file path (``ckpts/epoch=0-step=500.ckpt``). The
plugin snapshots the checkpoint to ckptd as step ``checkpoint["global_step"]`` of the client's run
(or ``run=``), and writes at the Lightning path a small JSON *pointer* (``{"format":
"ckptd-pointer/1", "root": ..., "run": ..., "step": ...}``, written atomically), so that everything
of Lightning that looks at files (``ckpt_path="last"``, ``save_last="link"``, top-k bookkeeping)
keeps working. Two Lightning paths saved at the same global step (``last.ckpt`` and the top-k file,
or two ``ModelCheckpoint`` callbacks) share one ckptd checkpoint: the first save's content. A step
already committed by an earlier process (resuming an older step into the same run) is kept, not
saved again and no pointer written, with one warning for all such steps (to save them, use another
``run``); training carries on and later steps are saved.

**Loading without a Trainer**: ``load_from_checkpoint(MyModule, path)`` (Lightning's own
``MyModule.load_from_checkpoint`` reads the path with ``torch.load``, which cannot read a pointer).

**The checkpoint dict** is stored as three top-level entries:

- ``model``: ``checkpoint["state_dict"]`` (``model.safetensors`` or its shards, with Lightning's
  parameter names);
- ``optimizer_states``: the list of optimizer state dicts; their int keys (``state[0]``) are stored
  as strings with a ``__ckptd_keys__`` entry that restores them (``to_tree``), so tensors are named
  ``0.state.0.exp_avg``;
- ``lightning``: everything else (``epoch``, ``global_step``, ``loops``, ``callbacks``,
  ``lr_schedulers``, ``hyper_parameters``, ...), through ``to_tree``.

Values that are not tensors, dicts, lists, tuples or int/float/str/bool/None (e.g. an OmegaConf
``hyper_parameters`` container, or a callable saved by ``on_save_checkpoint``) are refused with
the key that holds them: nothing is pickled. ``load_checkpoint`` reverses the mapping (checksums
verified; it needs no daemon); given a path that is not a pointer it loads the file with
``TorchCheckpointIO``, so older Lightning checkpoints still resume.

**Removal.** ``remove_checkpoint`` waits for that checkpoint's snapshot if it is still being
written, deletes the pointer, and deletes the ckptd step once no other pointer (in the same
directory, or written by this plugin) names it and a newer step of the run is committed (until
then it stays, so a crash never leaves the run without a checkpoint). ``teardown`` waits for every
snapshot in flight and raises a failure. Do not also give the daemon ``--keep-last``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule

from ckptd import paths, reading
from ckptd.storage import unseal_tree
from client.client import Client
from client.errors import CheckpointError
from client.handle import SnapshotHandle
from client.integrations import from_tree, to_tree

log = logging.getLogger(__name__)
FORMAT = "ckptd-pointer/1"
#: Written in every pointer, for whoever opens one (torch.load cannot: it is JSON).
POINTER_NOTE = (
    "a ckptd pointer, not a torch checkpoint: load it with "
    "client.integrations.lightning.load_from_checkpoint(YourModule, path), or resume with "
    "L.Trainer(plugins=[CkptdCheckpointIO()]).fit(..., ckpt_path=path)"
)
Policy = Literal["block", "skip", "error"]
_POINTER_MAX = 64 * 1024
_Key = tuple[str, str, int]  # (root, run, step)
_Module = TypeVar("_Module", bound=LightningModule)


class CkptdCheckpointIO(CheckpointIO):
    """Lightning checkpoints through ckptd (see the module's documentation).

    ``client``: a connected ``Client``, or None to connect on first use with ``connect_options``
    (``Client.connect``'s arguments); a client the plugin connected itself is closed in
    ``teardown`` (and connected again if needed). ``run``: the ckptd run (the client's by default).
    ``policy``: ``snapshot()``'s policy when every slot is still being written.
    """

    def __init__(
        self,
        client: Client | None = None,
        *,
        run: str | None = None,
        policy: Policy = "block",
        **connect_options: Any,
    ) -> None:
        super().__init__()
        self._client = client
        self._owns_client = client is None
        self._connect_options = connect_options
        self.run = run
        self.policy: Policy = policy
        self._handles: dict[_Key, SnapshotHandle] = {}
        self._pointers: dict[str, _Key] = {}  # pointer paths written by this plugin
        self._doomed: set[_Key] = set()
        self._warned_committed = False

    @property
    def client(self) -> Client:
        if self._client is None:
            # Lightning saves on global rank 0 only: this client checkpoints that process alone
            # (a multi-rank client would wait for parts the other ranks never send).
            self._client = Client.connect(**{"process_group": False, **self._connect_options})
        if self._client.world_size > 1:
            raise ValueError(
                "CkptdCheckpointIO was given a client connected across "
                f"{self._client.world_size} ranks, but Lightning saves checkpoints on rank 0 only, "
                "so the other ranks' parts would never arrive; connect it with "
                "Client.connect(process_group=False), or let the plugin connect"
            )
        return self._client

    # --- CheckpointIO ----------------------------------------------------------------------------

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        pointer = _local(path)
        client = self.client
        run = self.run or client.run
        key: _Key = (str(client.root), run, int(checkpoint["global_step"]))
        self._prune()
        handle = self._handles.get(key)
        if handle is not None and handle.done_now() and handle.path is None:  # failed (or skipped)
            if handle.error is not None:
                log.warning(
                    "[run=%s step=%d] earlier save failed (%s); saving again", run, key[2], handle.error
                )
            handle = None
        if handle is None:
            if (Path(key[0]) / run / paths.step_dirname(key[2])).exists():
                self._skip_committed(key, pointer)
                return
            handle = client.snapshot(to_snapshot(checkpoint), step=key[2], run=run, policy=self.policy)
            if handle.skipped:
                log.warning("[run=%s step=%d] not saved (%s): all slots busy", run, key[2], pointer)
                return
            self._handles[key] = handle
        self._doomed.discard(key)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        _write_pointer(pointer, key)
        self._pointers[str(pointer.absolute())] = key

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        p = _local(path)
        if (p / "ckptd.json").is_file():  # a ckptd step directory
            return from_snapshot(reading.load(p), map_location)
        key = read_pointer(p)
        if key is None:  # an ordinary Lightning checkpoint
            return TorchCheckpointIO().load_checkpoint(
                path, map_location=map_location, weights_only=weights_only
            )
        self._wait(key)
        step_dir = Path(key[0]) / key[1] / paths.step_dirname(key[2])
        if not step_dir.is_dir():
            raise FileNotFoundError(
                f"{p} points at {step_dir}, which was never committed (the process died before the "
                "snapshot was durable?) or was removed"
            )
        return from_snapshot(reading.load(step_dir), map_location)

    def remove_checkpoint(self, path: _PATH) -> None:
        p = _local(path)
        key = read_pointer(p)
        if key is None:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
            return
        self._wait(key)
        p.unlink(missing_ok=True)
        self._pointers.pop(str(p.absolute()), None)
        if not self._referenced(key, p.parent):
            self._doomed.add(key)
        self._prune()

    def teardown(self) -> None:
        """Wait for every snapshot in flight (raising the first failure), then prune."""
        handles = list(self._handles.values())
        try:
            for h in handles:
                h.wait()
        finally:
            self._handles = {k: h for k, h in self._handles.items() if not h.done_now()}
            self._prune()
            if self._owns_client and self._client is not None:
                self._client.close()
                self._client = None

    # --- internals -------------------------------------------------------------------------------

    def _skip_committed(self, key: _Key, pointer: Path) -> None:
        """A step an earlier training committed (resumed from an older step): kept, not saved
        again, and no pointer written for it; one warning for all of them."""
        root, run, step = key
        if not self._warned_committed:
            log.warning(
                "[run=%s step=%d] already committed in %s by an earlier training: not saved again "
                "(%s not written), nor will later steps already committed be (this is the only "
                "warning); to save them, give this training its own run: CkptdCheckpointIO(run=...)",
                run,
                step,
                root,
                pointer,
            )
        else:
            log.info("[run=%s step=%d] already committed: not saved again", run, step)
        self._warned_committed = True

    def _wait(self, key: _Key) -> None:
        handle = self._handles.get(key)
        if handle is not None and not handle.skipped:
            handle.wait()

    def _referenced(self, key: _Key, directory: Path) -> bool:
        if key in self._pointers.values():
            return True
        try:
            entries = list(directory.iterdir())
        except OSError:
            return False
        return any(e.is_file() and read_pointer(e) == key for e in entries)

    def _prune(self) -> None:
        """Delete doomed steps that are committed and older than their run's newest commit."""
        for key in sorted(self._doomed):
            root, run, step = key
            h = self._handles.get(key)
            if h is not None and not h.done_now():
                continue
            run_dir = Path(root) / run
            committed = paths.committed_steps(run_dir)
            if not committed or committed[-1][0] <= step:
                continue  # keep the newest: never leave a run without a checkpoint
            self._doomed.discard(key)
            self._handles.pop(key, None)
            _remove_step(run_dir, step)


def load_from_checkpoint(
    cls: type[_Module],
    checkpoint_path: _PATH,
    map_location: Any | None = None,
    strict: bool | None = None,
    **kwargs: Any,
) -> _Module:
    """``cls.load_from_checkpoint(checkpoint_path)`` for a checkpoint saved by ``CkptdCheckpointIO``.

    Lightning's own ``LightningModule.load_from_checkpoint`` reads the path with ``torch.load``
    and cannot read the plugin's JSON pointer files (``UnpicklingError: invalid load key``). This
    reads the pointer (or a ckptd step directory, or an ordinary ``.ckpt``) as the plugin's
    ``load_checkpoint`` does, with no daemon, then builds the module as Lightning does: ``cls``
    made from the saved ``hyper_parameters`` (``kwargs`` override them), ``on_load_checkpoint``,
    the weights loaded (``strict``), the module on the weights' device.

    >>> model = load_from_checkpoint(MyModule, "ckpts/epoch=0-step=500.ckpt")  # doctest: +SKIP
    """
    from lightning.pytorch.core.saving import _load_state  # what load_from_checkpoint builds with

    checkpoint = CkptdCheckpointIO().load_checkpoint(checkpoint_path, map_location=map_location)
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {}).update(kwargs)
    model = _load_state(cls, checkpoint, strict=strict, **kwargs)
    tensors = (t for t in checkpoint.get("state_dict", {}).values() if isinstance(t, torch.Tensor))
    first = next(tensors, None)
    if not isinstance(model, cls):
        raise TypeError(f"{cls.__name__} was built as a {type(model).__name__}")
    return model if first is None else model.to(first.device)


def to_snapshot(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A Lightning checkpoint dict as the tree ckptd snapshots (see the module documentation)."""
    rest = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    tree: dict[str, Any] = {"model": to_tree(dict(checkpoint.get("state_dict", {})), "state_dict")}
    if "optimizer_states" in checkpoint:
        tree["optimizer_states"] = to_tree(list(checkpoint["optimizer_states"]), "optimizer_states")
    tree["lightning"] = to_tree(rest, "checkpoint")
    return tree


def from_snapshot(loaded: Mapping[str, Any], map_location: Any | None = None) -> dict[str, Any]:
    """The Lightning checkpoint dict back from what ``ckptd.load`` returns."""
    if "lightning" not in loaded or "model" not in loaded:
        raise CheckpointError(
            f"not a CkptdCheckpointIO checkpoint: it holds {sorted(loaded)}", code="restore_mismatch"
        )
    checkpoint: dict[str, Any] = from_tree(loaded["lightning"])
    checkpoint["state_dict"] = from_tree(loaded["model"])
    if "optimizer_states" in loaded:
        checkpoint["optimizer_states"] = from_tree(loaded["optimizer_states"])
    if map_location is not None:
        if not isinstance(map_location, str | torch.device):
            raise TypeError("CkptdCheckpointIO.load_checkpoint takes map_location as a device or str")
        checkpoint = _to_device(checkpoint, torch.device(map_location))
    return checkpoint


def read_pointer(path: Path) -> _Key | None:
    """The (root, run, step) a pointer file names, or None when ``path`` is not a pointer."""
    try:
        if not path.is_file() or path.stat().st_size > _POINTER_MAX:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return (str(data["root"]), str(data["run"]), int(data["step"]))


def _write_pointer(path: Path, key: _Key) -> None:
    root, run, step = key
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "root": root, "run": run, "step": step, "note": POINTER_NOTE}, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_step(run_dir: Path, step: int) -> None:
    """Remove a committed step as the daemon's retention does: rename to a temp name first, so a
    half-deleted directory never looks like a checkpoint (``ckptd serve`` sweeps leftovers)."""
    src = run_dir / paths.step_dirname(step)
    doomed = run_dir / paths.temp_dirname(step, f"rm{uuid.uuid4().hex[:8]}")
    try:
        os.rename(src, doomed)
    except FileNotFoundError:
        return
    with contextlib.suppress(OSError):
        unseal_tree(doomed)  # a committed step's directories are read-only
    shutil.rmtree(doomed, ignore_errors=True)
    with contextlib.suppress(OSError):
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    log.info("removed %s", src)


def _local(path: _PATH) -> Path:
    s = os.fspath(path)
    if "://" in s:
        raise ValueError(f"CkptdCheckpointIO writes local paths only, got {s}")
    return Path(s)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value
