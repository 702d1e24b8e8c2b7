"""What a Hugging Face ``Trainer`` checkpoint holds besides the weights, for ``CkptdCallback``.

- ``processor_files``: the files ``processing_class.save_pretrained`` writes (tokenizer.json,
  tokenizer_config.json, chat_template.jinja, a binary tokenizer.model, preprocessor configs),
  as bytes, so the daemon writes them at the top of the step directory as the stock checkpoint
  has them and ``AutoTokenizer.from_pretrained(step_dir)`` loads the same tokenizer.
- ``link_checkpoint``/``prune_links``: ``output_dir/checkpoint-N``, a symbolic link to the
  committed ckptd step N, so ``get_last_checkpoint(output_dir)`` and
  ``trainer.train(resume_from_checkpoint=True)`` find it without the weights written twice; the
  links of steps removed by retention go with them.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint-"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
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
            files[entry.name] = Path(entry.path).read_bytes()
    return files


def link_checkpoint(output_dir: str | os.PathLike[str], step: int, step_dir: Path) -> Path | None:
    """Make ``output_dir/checkpoint-<step>`` a symbolic link to ``step_dir`` (atomically, replacing
    an older link); None, with a warning, where a real directory of that name is in the way."""
    out = Path(output_dir)
    link = out / f"{CHECKPOINT_PREFIX}{step}"
    if link.exists() and not link.is_symlink():
        log.warning("%s is a directory of its own (the Trainer's?): not linking it to %s", link, step_dir)
        return None
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{link.name}.ckptd-link-{secrets.token_hex(4)}"
    os.symlink(step_dir.resolve(), tmp, target_is_directory=True)
    os.replace(tmp, link)
    return link


def prune_links(output_dir: str | os.PathLike[str], run_dir: Path) -> list[Path]:
    """Remove the ``checkpoint-N`` links of ``output_dir`` into ``run_dir`` whose step is gone
    (retention removed it); links elsewhere and real directories are left alone."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    run = run_dir.resolve()
    removed = []
    for entry in out.iterdir():
        if not _CHECKPOINT.fullmatch(entry.name) or not entry.is_symlink():
            continue
        target = Path(os.readlink(entry))
        if target.parent == run and not target.is_dir():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
