"""Hostile tests of what issue #12 added: the ckptd/2 step layout, the operator's ``ckptd stop``,
``ckptd ls`` and ``ckptd export``, and ``checkpoint-N`` links for ``resume_from_checkpoint=True``.

Each test is a defect found by a tester: it fails on the code it was written against. Real
daemons (``start_daemon``), real faults (SIGSTOP, a daemon of another user, SIGKILL-like death
of the trainer with ``os._exit``), real loaders (``torch.distributed.checkpoint``'s
``HuggingFaceStorageReader``, accelerate). Children run with timeouts.

The trainer child is this file run as a script: ``python tests/test_hostile_i12.py SOCK OUT MODE``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from conftest import DaemonProc, wait_for_socket
from helpers import wait_until

from client import CheckpointError, Client

TESTS = Path(__file__).parent
CKPTD = [sys.executable, "-m", "ckptd"]
Connect = Callable[..., Client]
NOBODY = 65534


def _ckptd(*args: str, timeout_s: float = 60) -> tuple[int, str, float]:
    started = time.monotonic()
    r = subprocess.run([*CKPTD, *args], check=False, capture_output=True, text=True, timeout=timeout_s)
    return r.returncode, r.stdout + r.stderr, time.monotonic() - started


# --- (1) step layout: a component's directory a loader reads as weights ------------------------


def test_component_named_like_a_shard_is_not_read_as_weights_by_dcp(
    daemon: DaemonProc, connect: Connect
) -> None:
    """{"model": m, "teacher.safetensors": t}: the component's directory ``teacher.safetensors/``
    sits at the top of the step, and ``HuggingFaceStorageReader`` opens every ``*.safetensors``
    there: loading the model fails (ENODEV on a directory). Either refuse the name or keep the
    top of the step loadable."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    c = connect(daemon)
    torch.manual_seed(0)
    model, teacher = torch.nn.Linear(4, 4), torch.nn.Linear(3, 3)
    try:
        handle = c.snapshot({"model": model, "teacher.safetensors": teacher}, step=1)
        handle.wait(30)
    except CheckpointError:
        return  # refused: fine
    assert handle.path is not None
    state = {"weight": torch.zeros(4, 4), "bias": torch.zeros(4)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(handle.path)))
    assert torch.equal(state["weight"], model.weight.detach())


def test_component_named_model_safetensors_is_not_read_as_weights_by_accelerate(
    daemon: DaemonProc, connect: Connect
) -> None:
    """A snapshot without ``model`` may name a component ``model.safetensors``: the step then has
    a *directory* ``model.safetensors`` at its top, which accelerate's
    ``load_checkpoint_in_model`` (and ``safetensors.load_file``) open as the model's weights."""
    from accelerate import load_checkpoint_and_dispatch

    c = connect(daemon)
    try:
        handle = c.snapshot(
            {"teacher": torch.nn.Linear(3, 3), "model.safetensors": torch.nn.Linear(4, 4)}, step=1
        )
        handle.wait(30)
    except CheckpointError:
        return  # refused: fine
    assert handle.path is not None
    top = handle.path / "model.safetensors"
    if not top.exists():
        return
    assert top.is_file(), (
        f"{top} is a directory at the top of the step, where loaders expect the model's weights"
    )
    load_checkpoint_and_dispatch(torch.nn.Linear(4, 4), str(handle.path))


# --- (4) ckptd stop on a daemon that does not answer --------------------------------------------


def _stop_unresponsive(sock: Path) -> tuple[int, str, float]:
    return _ckptd("stop", "--socket", str(sock), "--timeout", "5", timeout_s=90)


def test_stop_of_a_sigstopped_daemon_does_not_claim_it_is_draining(
    start_daemon: Callable[..., DaemonProc],
) -> None:
    """A hung daemon (SIGSTOP: a wedged process) is reported as "already stopping; waiting for it
    to finish its drain", and ``ckptd stop`` then waits its whole --timeout (630 s by default);
    with ``--timeout 5`` it takes 10.5 s (the connect timeout is not bounded by --timeout)."""
    d = start_daemon()
    d.proc.send_signal(signal.SIGSTOP)
    try:
        rc, out, elapsed = _stop_unresponsive(d.socket)
    finally:
        d.proc.send_signal(signal.SIGCONT)
    assert rc != 0
    assert "already stopping" not in out and "draining" not in out, out
    assert elapsed < 8, f"ckptd stop --timeout 5 took {elapsed:.1f} s"


def test_stop_of_another_users_daemon_says_it_was_refused(workdir: Path) -> None:
    """A daemon of uid 65534 refuses root's connection (peer uid check). ``ckptd stop`` says
    "the daemon is already stopping; waiting for it to finish its drain", waits its --timeout,
    and blames a drain; the daemon was never stopping."""
    home = workdir / "nobody"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    os.chmod(workdir, 0o755)
    sock = home / "s.sock"
    proc = subprocess.Popen(
        [
            "setpriv",
            "--reuid",
            str(NOBODY),
            "--regid",
            str(NOBODY),
            "--clear-groups",
            # The checkout may be in a directory only root can read (mktemp -d): let the other
            # user read the code it runs, nothing more.
            "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search",
            *CKPTD,
            "serve",
            "--root",
            str(home / "root"),
            "--socket",
            str(sock),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        cwd=str(TESTS.parent),
    )
    try:
        wait_for_socket(sock, proc)
        rc, out, elapsed = _stop_unresponsive(sock)
        assert proc.poll() is None  # not stopped: it refused us
        assert rc != 0
        assert "already stopping" not in out and "draining" not in out, out
        assert elapsed < 4, f"a refused ckptd stop still waited {elapsed:.1f} s"
    finally:
        proc.kill()
        proc.wait(30)


# --- (4) ckptd ls / export ----------------------------------------------------------------------


def test_ls_to_a_full_stdout_prints_no_traceback(daemon: DaemonProc, connect: Connect) -> None:
    """``ckptd ls > /dev/full`` (a full disk under a redirected log) prints a Python traceback."""
    c = connect(daemon)
    c.snapshot(torch.nn.Linear(2, 2), step=1).wait(30)
    with open("/dev/full", "w") as full:
        r = subprocess.run(
            [*CKPTD, "ls", str(daemon.root)],
            check=False,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr


def test_export_into_the_step_directory_leaves_the_committed_step_alone(
    daemon: DaemonProc, connect: Connect
) -> None:
    """``ckptd export STEP STEP/exported`` writes a second copy of the model into the committed
    step directory (it succeeds, rc 0): the checkpoint on disk is no longer what was committed."""
    c = connect(daemon)
    handle = c.snapshot(torch.nn.Linear(2, 2), step=1)
    handle.wait(30)
    assert handle.path is not None
    before = sorted(os.listdir(handle.path))
    _ckptd("export", str(handle.path), str(handle.path / "exported"))
    assert sorted(os.listdir(handle.path)) == before


# --- (3) resume_from_checkpoint=True after the trainer died ---------------------------------------


def _child(sock: str, out: str, mode: str) -> None:
    from test_hf_trainer_expectations import make_trainer
    from transformers import TrainerCallback

    from client.integrations.hf_trainer import CkptdCallback

    class Die(TrainerCallback):  # type: ignore[misc]
        """The trainer dies (OOM-killed, preempted) right after the step-2 snapshot() returned."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:
                os._exit(3)

    c = Client.connect(sock, autostart=False)
    trainer = make_trainer(Path(out), save_strategy="steps", save_steps=2, max_steps=4)
    CkptdCallback.attach(trainer, c)
    if mode == "crash":
        trainer.add_callback(Die())
        trainer.train()
        return
    try:
        trainer.train(resume_from_checkpoint=True)
    except ValueError as e:
        print(f"RESUME-ERROR {e}", flush=True)
        os._exit(4)
    print(f"RESUMED {trainer.state.global_step}", flush=True)
    c.close()


def test_resume_from_checkpoint_true_finds_a_step_committed_after_the_trainer_died(
    workdir: Path, daemon: DaemonProc
) -> None:
    """The trainer dies right after ``snapshot()`` of step 2 returned; the daemon commits step 2
    (ckptd's own promise), but ``output_dir/checkpoint-2`` is only linked later, on the training
    thread, so it never is: ``trainer.train(resume_from_checkpoint=True)`` then raises "No valid
    checkpoint found in output directory" although ckptd holds a committed step 2."""
    out = workdir / "out"
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{TESTS.parent}"}
    me = str(Path(__file__).resolve())
    crash = subprocess.run(
        [sys.executable, me, str(daemon.socket), str(out), "crash"],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert crash.returncode == 3, crash.stdout + crash.stderr
    from client.integrations.hf_trainer import default_run

    step2 = daemon.root / default_run(out) / "step-000002"  # the callback's run: one per output_dir
    wait_until((step2 / "ckptd.json").exists, 30, "step 2 committed")
    resume = subprocess.run(
        [sys.executable, me, str(daemon.socket), str(out), "resume"],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert "RESUMED 4" in resume.stdout, resume.stdout + resume.stderr[-2000:]


if __name__ == "__main__":
    _child(*sys.argv[1:4])


# --- (6) README "Using it", run twice ---------------------------------------------------------------


_README_PRELUDE = """
import torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
batch = torch.ones(2, 4)
steps = {steps}
def train_step(model, optimizer, batch):
    optimizer.zero_grad()
    model(batch).sum().backward()
    optimizer.step()
"""


def _readme_using_it() -> str:
    text = (TESTS.parent / "README.md").read_text()
    section = text.split("## Using it", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_using_it_reruns_with_fewer_than_500_steps(workdir: Path, daemon: DaemonProc) -> None:
    """The README example with ``steps = 100`` (a first try): run 1 saves step 0; run 2 restores
    it, trains steps 1..100, takes no snapshot, and ``handle.wait()`` raises
    ``NameError: name 'handle' is not defined``."""
    script = workdir / "using_it.py"
    script.write_text(_README_PRELUDE.format(steps=100) + _readme_using_it())
    env = {
        **os.environ,
        "CKPTD_SOCKET": str(daemon.socket),
        "CKPTD_ROOT": str(daemon.root),
        "PYTHONPATH": str(TESTS.parent),
    }
    for run in (1, 2):
        r = subprocess.run(
            [sys.executable, str(script)],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=str(workdir),
        )
        assert r.returncode == 0, f"run {run}: {r.stderr[-1500:]}"


# --- (3) save_total_limit with metric_for_best_model ---------------------------------------------


def test_save_total_limit_1_with_a_best_metric_trains_to_the_end_and_keeps_the_best(
    workdir: Path, daemon: DaemonProc, connect: Connect
) -> None:
    """``save_total_limit=1`` and ``metric_for_best_model`` (the best step is an early one): the
    Trainer keeps the best checkpoint under its limit, ckptd's ``keep_last`` removes it and its
    link, and ``trainer.train()`` then raises ``FileNotFoundError: .../checkpoint-1`` in
    ``_finalize_training`` (``os.path.samefile`` on ``best_model_checkpoint``) after training."""
    from test_hf_trainer_expectations import make_trainer

    from client.integrations.hf_trainer import CkptdCallback

    c = connect(daemon)
    trainer = make_trainer(
        workdir / "out",
        max_steps=4,
        save_strategy="steps",
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        metric_for_best_model="eval_loss",
        greater_is_better=True,  # the loss falls: step 1 is the "best"
        save_total_limit=1,
    )
    CkptdCallback.attach(trainer, c)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and Path(best).is_dir(), best
