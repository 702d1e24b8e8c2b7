"""Small helpers shared by the tests (imported as ``helpers``; pytest puts tests/ on the path)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality, also for NaNs, -0.0, fp8 and empty tensors."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.detach().cpu().reshape(-1).view(torch.uint8), b.detach().cpu().reshape(-1).view(torch.uint8)
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "memfd:ckptd-arena" in line)


def wait_until(cond: Callable[[], bool], timeout_s: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout_s}s")
        time.sleep(0.02)


def step_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step-")) if run_dir.exists() else []
