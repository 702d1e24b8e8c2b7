"""The ``ckptd`` commands that work on checkpoints on disk, with no daemon: ``ls``, ``verify``,
``prune``, ``rm``, ``export``. Every deletion goes through ``ckptd.commit``'s retention (renamed
away first, then removed), the same rule as the daemon's ``--keep-last``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ckptd import commit, paths, reading
from ckptd.export import ExportError, export_pretrained
from ckptd.manifest import MANIFEST_NAME, CorruptCheckpoint, ManifestError, read_manifest
from ckptd.sizes import format_size
from ckptd.storage import Storage


def default_root() -> Path:
    """``$CKPTD_ROOT``, else ``./checkpoints``: where the client and ``ckptd serve`` write."""
    return Path(os.environ.get("CKPTD_ROOT") or "checkpoints")


# --- ls ------------------------------------------------------------------------------------------


def ls(root: Path | None, *, as_json: bool, hash_latest: bool) -> int:
    root = root or default_root()
    if not root.is_dir():
        print(
            f"ckptd ls: {root} is not a directory (give a checkpoint root, or set CKPTD_ROOT)",
            file=sys.stderr,
        )
        return 2
    rows: list[dict[str, object]] = []
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        rows += _run_rows(run_dir, hash_latest=hash_latest)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no checkpoints under {root}")
        return 0
    print(f"{'RUN':<20} {'STEP':>10} {'SIZE':>10}  {'COMPONENTS':<30} NOTE")
    for r in rows:
        size = format_size(r["bytes"]) if isinstance(r["bytes"], int) else "?"
        components = ",".join(map(str, r["components"])) if isinstance(r["components"], list) else ""
        print(f"{r['run']!s:<20} {r['step']!s:>10} {size:>10}  {components:<30} {_note(r)}")
    return 0


def _run_rows(run_dir: Path, *, hash_latest: bool) -> list[dict[str, object]]:
    latest = paths.read_latest(run_dir)
    steps = paths.committed_steps(run_dir)
    if latest is not None and latest not in {p.name for _, p in steps}:
        print(f"ckptd ls: {run_dir}/LATEST names {latest}, which is not a committed step", file=sys.stderr)
    rows: list[dict[str, object]] = []
    for step, step_dir in steps:
        is_latest = step_dir.name == latest
        row: dict[str, object] = {
            "run": run_dir.name,
            "step": step,
            "path": str(step_dir),
            "latest": is_latest,
        }
        try:
            m = read_manifest(step_dir)
            row |= {
                "bytes": m.bytes,
                "components": [c.name for c in m.components],
                "created_unix": m.created_unix,
            }
        except ManifestError as e:
            row |= {"bytes": 0, "components": [], "error": str(e)}
        if is_latest and "error" not in row:  # the step a restore starts from (hashed on request)
            row["problems"] = reading.verify(step_dir, checksums=hash_latest)
        rows.append(row)
    return rows


def _note(r: dict[str, object]) -> str:
    if "error" in r:
        note = "NOT A CHECKPOINT: " + str(r["error"])
        return "LATEST " + note if r["latest"] else note
    problems = r.get("problems")
    if isinstance(problems, list) and problems:
        return f"LATEST DOES NOT VERIFY: {problems[0]}" + (
            f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        )
    return "LATEST" if r["latest"] else ""


# --- verify --------------------------------------------------------------------------------------


def verify(path: Path, *, every_step: bool) -> int:
    """A step directory: that step. A run directory: its highest step (or every one). A root:
    the same for every run under it."""
    targets = _verify_targets(path, every_step=every_step)
    if not targets:
        try:
            targets = [reading.resolve(path)]
        except FileNotFoundError as e:
            print(f"ckptd verify: {e}", file=sys.stderr)
            return 2
    failed = 0
    for step_dir in targets:
        problems = reading.verify(step_dir)
        if problems:
            failed += 1
            for p in problems:
                print(f"FAIL {p}")
            print(f"{step_dir}: {len(problems)} problem(s)")
        else:
            print(f"OK {step_dir}")
    if len(targets) > 1:
        print(f"{len(targets) - failed} of {len(targets)} steps verify")
    return 1 if failed else 0


def _verify_targets(path: Path, *, every_step: bool) -> list[Path]:
    if os.path.lexists(path / MANIFEST_NAME):
        return [path]
    runs = [path] if paths.committed_steps(path) else []
    if not runs and path.is_dir():  # a root: every run in it
        runs = sorted(
            p for p in path.iterdir() if p.is_dir() and not p.is_symlink() and paths.committed_steps(p)
        )
    out = []
    for run_dir in runs:
        steps = [p for _, p in paths.committed_steps(run_dir)]
        out += steps if every_step else steps[-1:]  # its highest step, even if that is what broke
    return out


# --- prune / rm ----------------------------------------------------------------------------------


def prune(run_dir: Path, keep_last: int) -> int:
    if keep_last < 1:
        print("ckptd prune: --keep-last must be at least 1 (the newest step is always kept)", file=sys.stderr)
        return 2
    run_dir = Path(os.path.abspath(run_dir))
    steps = paths.committed_steps(run_dir)
    if not steps or run_dir.is_symlink():
        print(f"ckptd prune: {run_dir} is not a run directory (no step-NNNNNN in it)", file=sys.stderr)
        return 2
    newest = reading.latest(run_dir.parent, run_dir.name) if _is_run_name(run_dir) else None
    try:
        removed = commit.apply_retention(Storage(), run_dir, keep_last, newest or steps[-1][1])
    except OSError as e:
        print(f"ckptd prune: {e}", file=sys.stderr)
        return 1
    for p in removed:
        print(f"removed {p}")
    left = len(paths.committed_steps(run_dir))
    print(f"{len(removed)} step(s) removed, {left} kept in {run_dir}")
    return 0


def rm(step_dir: Path, *, latest_too: bool) -> int:
    step_dir = Path(os.path.abspath(step_dir))
    problem = _why_not_removable(step_dir, latest_too=latest_too)
    if problem:
        print(f"ckptd rm: {problem}", file=sys.stderr)
        return 2
    run_dir = step_dir.parent
    storage = Storage()
    try:
        removed = commit.remove_steps(storage, run_dir, [run_dir / step_dir.name])
        if removed and paths.read_latest(run_dir) == step_dir.name:  # --latest-too: move it back
            _repoint_latest(storage, run_dir)
    except OSError as e:
        print(f"ckptd rm: {e}", file=sys.stderr)
        return 1
    print(f"removed {run_dir / step_dir.name}" if removed else f"{step_dir} was already gone")
    return 0


def _why_not_removable(step_dir: Path, *, latest_too: bool) -> str | None:
    name = step_dir.name
    if paths.TEMP_MARKER in name:
        return f"{step_dir} is a step being written (or an unfinished one); the daemon removes it itself"
    if paths.parse_step_dirname(name) is None or step_dir.is_symlink() or not step_dir.is_dir():
        return f"{step_dir} is not a step directory (<root>/<run>/step-NNNNNN)"
    try:
        read_manifest(step_dir)
    except ManifestError as e:
        return (
            f"{step_dir} is not a committed checkpoint ({e}); ckptd rm removes committed steps only "
            "(remove anything else yourself)"
        )
    if not latest_too and paths.read_latest(step_dir.parent) == name:
        return (
            f"{step_dir} is the step LATEST names; give --latest-too to remove it (LATEST then "
            "names the newest step left)"
        )
    return None


def _repoint_latest(storage: Storage, run_dir: Path) -> None:
    newest = reading.latest(run_dir.parent, run_dir.name) if _is_run_name(run_dir) else None
    if newest is not None:
        commit.write_latest(storage, run_dir, newest.name)
    else:
        storage.unlink(run_dir / paths.LATEST)
        storage.fsync_dir(run_dir)


def _is_run_name(run_dir: Path) -> bool:
    try:
        paths.check_name("run", Path(os.path.abspath(run_dir)).name)
    except paths.InvalidName:
        return False
    return True


# --- export --------------------------------------------------------------------------------------


def export(path: Path, out_dir: Path) -> int:
    try:
        step_dir = export_pretrained(path, out_dir)
    except (ExportError, FileNotFoundError, CorruptCheckpoint) as e:
        print(f"ckptd export: {e}", file=sys.stderr)
        return 1 if isinstance(e, CorruptCheckpoint) else 2
    except OSError as e:
        print(f"ckptd export: {e}", file=sys.stderr)
        return 1
    print(f"exported the model of {step_dir} to {out_dir}")
    return 0
