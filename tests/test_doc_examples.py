"""Every ```python example of README.md and docs/*.md runs (issue 12, item 16), and what the
README's "Using it" example relies on: a done callback alone does not hide a failure.

Each markdown file's examples run in order in one fresh interpreter (``tests/doc_harness.py``),
in a fresh directory, against a daemon of their own (``CKPTD_SOCKET``, ``CKPTD_ROOT`` =
``./checkpoints``); the names the documentation leaves to the reader (model, optimizer, data)
are supplied by the harness. README.md runs twice in the same directory: its examples must be
correct to copy and rerun. An example is skipped only with ``<!-- doc-test: skip REASON -->``
right above its fence.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import DaemonProc

from client import CheckpointError, Client, SnapshotHandle

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO / "tests" / "doc_harness.py"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNS = {("README.md", "Using it"): 2}  # copy-and-rerun: the second run must work too
TIMEOUT_S = 900

sys.path.insert(0, str(REPO / "tests"))
from doc_harness import examples  # noqa: E402


def sections() -> list[tuple[Path, str]]:
    """Every (markdown file, ``##`` section) with a python example, in document order."""
    found: dict[tuple[Path, str], None] = {}
    for md in DOCS:
        for ex in examples(md):
            found[(md, ex.section)] = None
    return list(found)


def run_section(
    md: Path, section: str, workdir: Path, start_daemon: Callable[..., DaemonProc], runs: int
) -> list[str]:
    """Run the section's examples ``runs`` times in one fresh directory with a daemon of its own
    (root ``./checkpoints``); returns each run's stdout."""
    cwd = workdir / "reader"
    cwd.mkdir()
    d = start_daemon(root=cwd / "checkpoints", sock=workdir / "s.sock")
    env = {
        **os.environ,
        "CKPTD_SOCKET": str(d.socket),
        "CKPTD_ROOT": str(d.root),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    outs = []
    for n in range(runs):
        proc = subprocess.run(
            [sys.executable, str(HARNESS), str(md), section],
            check=False,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{md.name} {section!r}, run {n + 1} of {runs}:\n{out[-6000:]}"
        assert "Traceback" not in proc.stderr, out[-6000:]
        outs.append(proc.stdout)
    return outs


@pytest.mark.parametrize(("md", "section"), sections(), ids=[f"{m.name}#{s}" for m, s in sections()])
def test_doc_examples_run(
    md: Path,
    section: str,
    workdir: Path,
    start_daemon: Callable[..., DaemonProc],
    record_property: Callable[..., None],
) -> None:
    runs = RUNS.get((md.name, section), 1)
    run_section(md, section, workdir, start_daemon, runs)
    record_property("runs", runs)


def test_the_readme_example_resumes_when_rerun(
    workdir: Path, start_daemon: Callable[..., DaemonProc]
) -> None:
    """README "Using it" twice (``steps`` = 501): the second run restores step 500 and saves
    1000; the callback prints where each step is durable."""
    outs = run_section(REPO / "README.md", "Using it", workdir, start_daemon, runs=2)
    steps = workdir / "reader" / "checkpoints" / "default"
    assert sorted(p.name for p in steps.glob("step-*")) == [f"step-{s:06d}" for s in (0, 500, 1000)]
    assert f"step 500: durable at {steps / 'step-000500'}" in outs[0]
    assert f"step 1000: durable at {steps / 'step-001000'}" in outs[1]


# --- the observation rule the example's callback relies on -------------------------------------


def _wait_done(handle: SnapshotHandle, calls: list[object]) -> None:
    deadline = time.monotonic() + 30
    while (not handle.done_now() or not calls) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handle.done_now() and calls


def test_a_done_callback_alone_does_not_hide_a_failure(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    c = connect(start_daemon(faults="eio-write:2"))
    assert c.snapshot({"w": torch.ones(4)}, step=1).wait(30) is not None
    seen: list[object] = []
    failed = c.snapshot({"w": torch.ones(4)}, step=2, on_done=lambda h: seen.append(h.path))
    _wait_done(failed, seen)
    assert seen == [None]
    with pytest.raises(CheckpointError, match=r"step 2 .* failed and nobody checked") as e:
        c.snapshot({"w": torch.ones(4)}, step=3)
    assert e.value.code == "io_error" and e.value.handle is not None
    assert e.value.handle.wait(30) is not None  # step 3 was taken all the same


def test_a_callback_that_reads_the_error_observes_it(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    c = connect(start_daemon(faults="eio-write:2"))
    seen: list[object] = []
    failed = c.snapshot({"w": torch.ones(4)}, step=2, on_done=lambda h: seen.append(h.error))
    _wait_done(failed, seen)
    assert isinstance(seen[0], CheckpointError) and seen[0].code == "io_error"
    assert c.snapshot({"w": torch.ones(4)}, step=3).wait(30) is not None  # not raised again
    c.close(timeout_s=30)


def test_close_raises_a_failure_only_a_callback_saw_the_path_of(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    c = connect(start_daemon(faults="eio-write:2"))
    seen: list[object] = []
    failed = c.snapshot({"w": torch.ones(4)}, step=2, on_done=lambda h: seen.append(h.path))
    _wait_done(failed, seen)
    with pytest.raises(CheckpointError, match=r"step 2 .* failed and nobody checked"):
        c.close(timeout_s=30)
