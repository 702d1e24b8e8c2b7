"""What a Hugging Face ``Trainer`` checkpoint holds besides the weights, for ``CkptdCallback``.

- ``processor_files``: the files ``processing_class.save_pretrained`` writes (tokenizer.json,
  tokenizer_config.json, chat_template.jinja, a binary tokenizer.model, preprocessor configs),
  as bytes, so the daemon writes them at the top of the step directory as the stock checkpoint
  has them and ``AutoTokenizer.from_pretrained(step_dir)`` loads the same tokenizer.
- ``link_checkpoint``/``prune_links``: ``output_dir/checkpoint-N``, a directory of symbolic
  links to the files of the committed ckptd step N (its model files, tokenizer files,
  ``trainer_state.json``) and a marker naming the step (``ckptd-step.json``: root, run, step), so
  ``get_last_checkpoint(output_dir)`` and ``trainer.train(resume_from_checkpoint=True)`` find it
  without the weights written twice. Files a callback adds there (``on_save``) stay in
  ``output_dir``; the step itself is read-only. The directories of steps removed by retention go
  with them (removing one never follows its links).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ckptd import paths
from ckptd.daemon.validate import plain_file_name
from ckptd.manifest import ManifestError, read_manifest
from ckptd.reading import model_files

log = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint-"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
MARKER = "ckptd-step.json"  # in output_dir/checkpoint-N: the ckptd step it stands for
_MARKER_FORMAT = "ckptd-hf-checkpoint/1"
#: What a processor's save_pretrained may write that the step directory does not take: weights or
#: pickles (never written by ckptd from a processor), ckptd's own manifest.
_REFUSED = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def processor_files(processing_class: Any, taken: frozenset[str] = frozenset()) -> dict[str, bytes]:
    """The files ``processing_class.save_pretrained(dir)`` writes, by name; {} without one.

    Files named in ``taken`` (the model's config.json) and files the step directory does not take
    (weights, pickles, subdirectories) are left out with a warning."""
    save = getattr(processing_class, "save_pretrained", None)
    if processing_class is None or not callable(save):
        return {}
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="ckptd-processor-") as tmp:
        save(tmp)
        for entry in sorted(os.scandir(tmp), key=lambda e: e.name):
            if not entry.is_file(follow_symlinks=False) or entry.name in taken or entry.name == "ckptd.json":
                log.warning("not saving %s of the processing class: not a plain file, or taken", entry.name)
                continue
            if entry.name.endswith(_REFUSED):
                log.warning("not saving %s of the processing class: weights or a pickle", entry.name)
                continue
            if not plain_file_name(entry.name):
                log.warning(
                    "not saving %s of the processing class: ckptd takes plain names with an "
                    "extension (letters, digits, '_', '-', '.'; at most 128 characters) only",
                    entry.name,
                )
                continue
            files[entry.name] = Path(entry.path).read_bytes()
    return files


def link_checkpoint(
    output_dir: str | os.PathLike[str], step: int, step_dir: Path, root: Path, run: str
) -> Path | None:
    """Make ``output_dir/checkpoint-<step>`` a directory of symbolic links to the weights and
    ``trainer_state.json`` of the committed ``step_dir`` (``fill_checkpoint`` adds the rest) with
    a marker naming the step; it replaces an older one of ckptd's (atomically where there was
    none). None, with a warning, where a directory of the Trainer's own is in the way; None where
    the step is already gone (retention removed it)."""
    out = Path(output_dir)
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    if final.exists() and not final.is_symlink() and read_marker(final) is None:
        log.warning("%s is a directory of its own (the Trainer's?): not linking it to %s", final, step_dir)
        return None
    target = step_dir.resolve()
    try:
        names = model_files(read_manifest(target))  # model, tokenizer, trainer_state.json
    except ManifestError:
        log.info("%s is gone (retention removed it before it was announced): no %s", step_dir, final)
        return None
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{final.name}.ckptd-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for name in names:
            if name.endswith((".safetensors", ".index.json")) or name == "trainer_state.json":
                os.symlink(target / name, tmp / name)
        marker = {"format": _MARKER_FORMAT, "root": str(Path(root).resolve()), "run": run, "step": step}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        if final.is_symlink():  # a link of an older ckptd
            final.unlink()
        elif final.exists():
            shutil.rmtree(final)  # ckptd's (its marker says): never follows the links
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def link_committed(output_dir: str | os.PathLike[str], root: Path, run: str) -> list[Path]:
    """Give every committed step of ``run`` that has none its ``output_dir/checkpoint-N`` (and
    drop those of steps gone): a step the daemon committed after the trainer died (as it does for
    every snapshot that ``snapshot()`` returned for) is then found by ``get_last_checkpoint``, so
    ``train(resume_from_checkpoint=True)`` resumes from it. Returns the entries made."""
    made = []
    run_dir = Path(root) / run
    for step, step_dir in paths.committed_steps(run_dir):
        if os.path.lexists(Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"):
            continue
        link = link_checkpoint(output_dir, step, step_dir, root, run)
        if link is not None:
            fill_checkpoint(link, step_dir)
            made.append(link)
    if os.path.isdir(output_dir):
        prune_links(output_dir, run_dir)
    return made


def fill_checkpoint(checkpoint: Path, step_dir: Path) -> None:
    """Link the step's other files (config.json, tokenizer files, training_args.json) into
    ``checkpoint``, once ``on_save`` callbacks ran: a file a callback wrote there (a processor's
    ``save_pretrained``) is kept, not written through a link into the read-only step."""
    target = step_dir.resolve()
    try:
        names = model_files(read_manifest(target))
    except ManifestError:
        return
    for name in names:
        if not os.path.lexists(checkpoint / name):
            os.symlink(target / name, checkpoint / name)


def read_marker(checkpoint: Path) -> tuple[Path, str, int] | None:
    """(root, run, step) of a ``checkpoint-N`` directory made by ``link_checkpoint``; None for
    anything else (a directory of the Trainer's own, a link, an unreadable marker)."""
    try:
        if checkpoint.is_symlink():
            return None
        data = json.loads((checkpoint / MARKER).read_text())
        if data.get("format") != _MARKER_FORMAT:
            return None
        return Path(data["root"]), str(data["run"]), int(data["step"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def prune_links(output_dir: str | os.PathLike[str], run_dir: Path) -> list[Path]:
    """Remove the ``checkpoint-N`` directories of ``output_dir`` that stand for a step of
    ``run_dir`` that is gone (retention removed it), with what callbacks added to them; links of
    an older ckptd likewise; the Trainer's own directories and other runs' are left alone."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    run = run_dir.resolve()
    removed = []
    for entry in out.iterdir():
        if not _CHECKPOINT.fullmatch(entry.name):
            continue
        if entry.is_symlink():
            target = Path(os.readlink(entry))
            if target.parent == run and not target.is_dir():
                entry.unlink(missing_ok=True)
                removed.append(entry)
            continue
        marker = read_marker(entry)
        if marker is None:
            continue
        root, name, step = marker
        if (root / name).resolve() == run and not (run / paths.step_dirname(step)).is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
