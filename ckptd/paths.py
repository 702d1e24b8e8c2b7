"""Names on disk: runs, step directories, temp directories, the ``LATEST`` pointer, and where
the daemon's socket is by default.

``<root>/<run>/step-000500/`` is a committed checkpoint; ``step-000500.ckptd-tmp-<nonce>/`` is
one being written and is never read as a checkpoint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

LATEST = "LATEST"
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
    """Committed step directories of a run (by name only), ascending by step."""
    try:
        entries = list(run_dir.iterdir())
    except FileNotFoundError:
        return []
    steps = []
    for p in entries:
        step = parse_step_dirname(p.name)
        if step is not None and p.is_dir() and not p.is_symlink():
            steps.append((step, p))
    return sorted(steps)


def read_latest(run_dir: Path) -> str | None:
    try:
        name = (run_dir / LATEST).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
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
