"""Integrations of ckptd with training frameworks.

Import the one you use (each imports its framework; this package imports none of them):

- ``client.integrations.hf_trainer``: ``CkptdCallback`` for the Hugging Face ``Trainer``;
- ``client.integrations.accelerate``: ``register_ckptd`` for ``Accelerator.save_state`` and
  ``onloaded_state_dict`` for offloaded models;
- ``client.integrations.lightning``: ``CkptdCheckpointIO`` for PyTorch Lightning.

Shared here: ``to_tree``/``from_tree``, a reversible mapping of framework state (dicts with int
keys, numpy arrays and scalars) onto what a snapshot holds, ``capture_rng``/``restore_rng`` for the
RNG states of python, numpy and torch, and ``load_step`` to read a committed checkpoint with the
same fallback as ``Client.restore``. See docs/INTEGRATIONS.md.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ckptd import paths, reading
from ckptd.manifest import ManifestError, read_manifest
from client.client import Client
from client.errors import CheckpointError

log = logging.getLogger(__name__)

#: Key added to a dict whose keys are not all strings: maps each stored (string) key back to the
#: original key. ``{0: a, 1: b}`` is stored as ``{"0": a, "1": b, "__ckptd_keys__": {"0": 0, "1": 1}}``,
#: so tensors inside keep readable names (``state.0.exp_avg``).
KEYS = "__ckptd_keys__"
_KEY_TYPES = (bool, int, float, str, type(None))


def to_tree(value: object, where: str = "") -> Any:
    """``value`` as a snapshot tree: tensors and plain values as they are; dicts with non-string
    keys get a ``__ckptd_keys__`` entry (see ``KEYS``); numpy arrays become tensors and numpy
    scalars python numbers; lists and tuples are converted item by item.

    Raises ``TypeError`` for anything else (nothing is pickled), naming where it was.
    """
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        originals: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, _KEY_TYPES):
                raise TypeError(f"{where or '<root>'}: dict key {k!r} is not a str, int, float, bool or None")
            sk = k if isinstance(k, str) else str(k)
            if sk == KEYS:
                raise TypeError(f"{where or '<root>'}: the dict key {KEYS!r} is reserved by ckptd")
            if sk in out:
                raise TypeError(
                    f"{where or '<root>'}: dict keys {originals[sk]!r} and {k!r} collide as {sk!r}"
                )
            originals[sk] = k
            out[sk] = to_tree(v, f"{where}.{sk}" if where else sk)
        if any(not isinstance(k, str) for k in originals.values()):
            out[KEYS] = {sk: _plain_key(k) for sk, k in originals.items()}
        return out
    if isinstance(value, list | tuple):
        items = [to_tree(v, f"{where}.{i}" if where else str(i)) for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    np = _numpy()
    if np is not None:
        if isinstance(value, np.ndarray):
            return torch.from_numpy(value.copy())
        if isinstance(value, np.generic):
            return to_tree(value.item(), where)
    raise TypeError(
        f"{where or '<root>'}: cannot store a {type(value).__name__} in a ckptd snapshot (nothing is "
        "pickled); convert it to tensors, dicts, lists and int/float/str/bool/None"
    )


def _plain_key(k: object) -> Any:
    if isinstance(k, float) and not math.isfinite(k):
        raise TypeError(f"dict key {k!r} is not finite")
    return k


def from_tree(value: Any) -> Any:
    """The inverse of ``to_tree`` on what ``ckptd.load`` returns: restores non-string dict keys."""
    if isinstance(value, dict):
        keys = value.get(KEYS)
        if isinstance(keys, dict):
            return {keys.get(k, k): from_tree(v) for k, v in value.items() if k != KEYS}
        return {k: from_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_tree(v) for v in value]
    if isinstance(value, tuple):
        return tuple(from_tree(v) for v in value)
    return value


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return None
    return numpy


# --- RNG states ---------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """The RNG states of python ``random``, numpy's global generator, torch (CPU) and every CUDA
    device (when CUDA is initialised), as a snapshot tree (tensors and plain values)."""
    version, internal, gauss_next = random.getstate()
    out: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "torch": torch.get_rng_state(),
    }
    np = _numpy()
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        out["numpy"] = {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the RNG states ``capture_rng`` captured (as ``ckptd.load`` returns them)."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    # clone(): tensors from ckptd.load are views into a shard's buffer, and set_rng_state reads
    # from the start of the view's storage, not from its offset (a view crashes the process).
    torch.set_rng_state(state["torch"].to(torch.uint8).clone())
    np = _numpy()
    if np is not None and "numpy" in state:
        n = state["numpy"]
        keys = np.asarray(n["keys"].numpy(), dtype=np.uint32)
        np.random.set_state(
            (n["name"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"]))
        )
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.to(torch.uint8).clone() for t in cuda])
        else:
            log.warning(
                "checkpoint has RNG states of %d CUDA devices, this process sees %d: CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


# --- reading ------------------------------------------------------------------------------------


def load_step(
    client: Client, *, run: str | None = None, step: int | None = None
) -> tuple[int, Path, dict[str, Any]]:
    """Read a committed checkpoint of ``run`` (the client's by default) from the client's root:
    ``(step, step directory, tree as ckptd.load returns it)``.

    ``step=None`` takes the newest step whose checksums verify, falling back to older ones with a
    warning, as ``Client.restore`` does. Raises ``CheckpointError`` (``not_found``, ``corrupt``).
    """
    run_dir = client.root / paths.check_name("run", run or client.run)
    candidates = [run_dir / paths.step_dirname(step)] if step is not None else reading.candidates(run_dir)
    for step_dir in candidates:
        try:
            manifest = read_manifest(step_dir)
            loaded = reading.load_manifest(step_dir, manifest)
        except (ManifestError, reading.CorruptCheckpoint, OSError) as e:
            if step is not None:
                raise CheckpointError(f"cannot read {step_dir}: {e}", code="corrupt") from e
            log.warning("skipping %s: %s", step_dir, e)
            continue
        return manifest.step, step_dir, loaded
    raise CheckpointError(f"no committed checkpoint that verifies in {run_dir}", code="not_found")


def latest_step(client: Client, run: str | None = None) -> int | None:
    """The newest committed step of ``run`` (by its intact manifest), or None."""
    found = reading.latest(client.root, run or client.run)
    if found is None:
        return None
    return paths.parse_step_dirname(found.name)
