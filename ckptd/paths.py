"""Names on disk: runs, step directories, temp directories, the ``LATEST`` pointer, and where
the daemon's socket is by default.

``<root>/<run>/step-000500/`` is a committed checkpoint; ``step-000500.ckptd-tmp-<nonce>/`` is
one being written and is never read as a checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ckptd.safeio import read_small

log = logging.getLogger(__name__)
LATEST = "LATEST"
#: ``LATEST`` holds one step directory name; a longer one is not ckptd's.
_MAX_LATEST_BYTES = 4096
TEMP_MARKER = ".ckptd-tmp-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


class InvalidName(ValueError):
    """A run or component name that cannot be used as a path component."""


def check_name(what: str, name: str) -> str:
    """Refuse names that could escape the root or collide with ckptd's own files."""
    if not _NAME.match(name) or ".." in name or TEMP_MARKER in name:
        raise InvalidName(
            f"{what} name {name!r} is not allowed: use 1-128 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without '..'"
        )
    return name


def step_dirname(step: int) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:06d}"


def temp_dirname(step: int, nonce: str) -> str:
    return f"{step_dirname(step)}{TEMP_MARKER}{nonce}"


def parse_step_dirname(name: str) -> int | None:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def committed_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """Committed step directories of a run (by name only), ascending by step. Only real
    directories count: a symlink, FIFO or file under a step's name is not a checkpoint."""
    try:
        with os.scandir(run_dir) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    except (FileNotFoundError, NotADirectoryError):
        return []
    steps = []
    for name, is_dir in entries:
        step = parse_step_dirname(name)
        if step is not None and is_dir:
            steps.append((step, run_dir / name))
    return sorted(steps)


def read_latest(run_dir: Path) -> str | None:
    """The step directory name ``LATEST`` holds, or None if it is missing or not valid.

    Read without following a link, only from a regular file and only a few bytes: a FIFO, a
    link to ``/dev/zero`` or out of the root, or a huge file there is ignored with a warning (the
    next commit's rename replaces the name, never a link's target).
    """
    path = run_dir / LATEST
    try:
        raw = read_small(path, _MAX_LATEST_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        log.warning("ignoring %s: %s (a commit replaces it with a regular file)", path, e.strerror)
        return None
    try:
        name = raw.decode().strip()
    except UnicodeDecodeError:
        return None
    return name if parse_step_dirname(name) is not None else None


# --- where the daemon listens (its directory's checks: ckptd.sockdir) --------------------------


def default_socket() -> Path:
    """``$CKPTD_SOCKET``, else ``$XDG_RUNTIME_DIR/ckptd/ckptd.sock``, else ``/tmp/ckptd-<uid>/ckptd.sock``."""
    env = os.environ.get("CKPTD_SOCKET")
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "ckptd" / "ckptd.sock"
    return Path(f"/tmp/ckptd-{os.getuid()}") / "ckptd.sock"
