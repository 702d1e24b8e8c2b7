"""Arenas are reused: descriptors, mappings and arenas stay flat; back-pressure policies hold."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from conftest import DaemonProc
from helpers import memfd_mappings, open_fds

import ckptd
from client import CheckpointError, Client


def test_fifty_cycles_keep_descriptors_and_arenas_flat(client: Client) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 128))
    opt = torch.optim.AdamW(model.parameters())

    def cycle(step: int) -> None:
        opt.zero_grad()
        model(torch.randn(8, 128)).sum().backward()
        opt.step()
        client.snapshot({"model": model, "optimizer": opt, "step": step}, step=step).wait(30)

    for step in range(5):  # warm-up: arenas reach their size once optimizer state exists
        cycle(step)
    fds, maps, arenas = open_fds(), memfd_mappings(), client.status().arenas
    for step in range(5, 55):
        cycle(step)
    assert open_fds() == fds
    assert memfd_mappings() == maps <= 2
    assert client.status().arenas == arenas <= 2


def test_busy_slots_block_skip_or_error(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon(faults="slow:0.5")
    c = connect(d, slots=1)
    state = {"w": torch.ones(256)}
    first = c.snapshot(state, step=1)
    skipped = c.snapshot(state, step=2, policy="skip")
    assert skipped.skipped and skipped.wait(1) is None
    with pytest.raises(CheckpointError, match="slots are still being written") as e:
        c.snapshot(state, step=3, policy="error")
    assert e.value.code == "busy"
    t0 = time.monotonic()
    blocked = c.snapshot(state, step=4)  # waits for the slot
    assert first.done_now(), "block returns only once a slot is free"
    assert time.monotonic() - t0 > 0.1
    assert blocked.wait(30) is not None
    assert not (d.root / "default" / "step-000002").exists()


def test_two_slots_let_the_next_snapshot_stage_while_one_is_written(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon(faults="slow:0.5")
    c = connect(d, slots=2)
    h1 = c.snapshot({"w": torch.ones(256)}, step=1)
    h2 = c.snapshot({"w": torch.ones(256)}, step=2)
    # Each write sleeps 0.5 s per pwrite: step 1 cannot be done, so step 2 did not wait for it.
    assert not h1.done_now()
    assert h1.wait(30) is not None and h2.wait(30) is not None


def test_growing_snapshot_replaces_arenas_without_leaking(client: Client) -> None:
    for step, n in enumerate([16, 2**20, 2**21, 16]):
        client.snapshot({"w": torch.ones(n)}, step=step).wait(30)
    assert memfd_mappings() <= 2
    assert client.status().arenas <= 2


def test_close_waits_for_in_flight_snapshots(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon(faults="slow:0.3")
    c = connect(d)
    handle = c.snapshot({"w": torch.ones(8)}, step=1)
    c.close()
    assert handle.done_now() and handle.wait() is not None
    assert memfd_mappings() == 0


def test_prepare_makes_the_slots_before_the_first_snapshot(
    daemon: DaemonProc, connect: Callable[..., Client]
) -> None:
    c = connect(daemon, slots=2)
    state = {"w": torch.randn(1000, 100), "b": torch.randn(7)}
    assert c.prepare(state) == 2
    assert memfd_mappings() == 2 and c.status().arenas == 2, "both slots exist and are registered"
    maps, arenas = memfd_mappings(), c.status().arenas
    for step in (1, 2):
        info = c.snapshot(state, step=step).wait(30)
        assert info is not None
    assert memfd_mappings() == maps and c.status().arenas == arenas, "no slot made after prepare"
    loaded = ckptd.load(info.path)["model"]
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])


def test_prepare_leaves_busy_slots_alone(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon(faults="slow:0.5")
    c = connect(d, slots=2)
    state = {"w": torch.ones(256)}
    busy = c.snapshot(state, step=1)
    assert c.prepare(state) == 1  # the other slot is being written
    assert busy.wait(30) is not None
