"""What is saved is what the tensors held when snapshot() returned, even if the trainer then
changes them or dies."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable

import torch
from conftest import DaemonProc
from helpers import same_bits, wait_until

import ckptd
from client import Client


def test_changes_after_snapshot_returns_are_not_saved(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon(faults="slow:0.3")  # the write happens well after the changes below
    c = connect(d)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    handle = c.snapshot(model, step=1)
    with torch.no_grad():
        model.weight.add_(1.0)
        model.bias.zero_()
    info = handle.wait(30)
    assert info is not None
    saved = ckptd.load(info.path)["model"]
    for k, v in expected.items():
        assert same_bits(saved[k], v), k


TRAINER = textwrap.dedent(
    """
    import os, signal, sys, torch
    from client import Client
    c = Client.connect(sys.argv[1], autostart=False)
    torch.manual_seed(int(sys.argv[2]))
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    c.snapshot({"model": model, "step": int(sys.argv[2])}, step=int(sys.argv[2]))
    print("returned", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_trainer_killed_right_after_snapshot_returns_is_still_committed(
    start_daemon: Callable[..., DaemonProc],
) -> None:
    d = start_daemon(faults="slow:0.2")  # still writing when the trainer is already dead
    for step in (1, 2, 3):
        out = subprocess.run(
            [sys.executable, "-c", TRAINER, str(d.socket), str(step)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == -9 and "returned" in out.stdout, out.stderr
    manifest = d.root / "default" / "step-000003" / "ckptd.json"
    wait_until(manifest.exists, what="step 3 committed")
    for step in (1, 2, 3):
        torch.manual_seed(step)
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
        loaded = ckptd.load(d.root / "default" / f"step-{step:06d}")
        assert loaded["step"] == step
        for k, v in model.state_dict().items():
            assert same_bits(loaded["model"][k], v), (step, k)
