"""The CUDA path: page-locked arenas, non_blocking copies on a side stream, stream ordering.

Skipped without a CUDA device (see conftest.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import same_bits

import ckptd
from client import Client

pytestmark = pytest.mark.gpu


def test_cuda_model_round_trip_and_in_place_updates_after_return(client: Client) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024)).cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(16, 1024, device="cuda")).sum().backward()
    opt.step()
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    handle = client.snapshot({"model": model, "optimizer": opt}, step=1)
    with torch.no_grad():  # queued on the current stream: must run after the copy
        for p in model.parameters():
            p.mul_(0).add_(7)
    info = handle.wait(60)
    assert info is not None and handle.staged
    saved = ckptd.load(info.path)["model"]
    for k, v in expected.items():
        assert same_bits(saved[k], v), k
    fresh = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024)).cuda()
    client.restore({"model": fresh, "optimizer": torch.optim.AdamW(fresh.parameters())})
    for k, v in expected.items():
        assert same_bits(fresh.state_dict()[k], v), k


def test_snapshot_does_not_wait_for_the_device_to_host_copy(client: Client) -> None:
    big = {"w": torch.randn(64, 2**20, device="cuda")}  # 256 MiB
    client.snapshot(big, step=0).wait(60)  # warm: arena allocated and registered
    torch.cuda.synchronize()
    handle = client.snapshot(big, step=1)
    returned_before_copy = not handle.staged
    info = handle.wait(60)
    assert info is not None
    assert same_bits(ckptd.load(info.path)["model"]["w"], big["w"])
    assert returned_before_copy or handle.stall_s < 0.05


def test_prepare_pins_cuda_slots_so_the_first_snapshot_does_not_wait_for_the_copy(
    client: Client,
) -> None:
    big = {"w": torch.randn(64, 2**20, device="cuda")}  # 256 MiB
    assert client.prepare(big) == client.options.slots
    torch.cuda.synchronize()
    handle = client.snapshot(big, step=1)  # the first: slots pinned and views made by prepare
    returned_before_copy = not handle.staged
    info = handle.wait(60)
    assert info is not None
    assert same_bits(ckptd.load(info.path)["model"]["w"], big["w"])
    assert returned_before_copy or handle.stall_s < 0.05
