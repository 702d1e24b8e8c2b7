"""One rank of a job for tests/test_multirank_stall.py (gloo; FSDP2 from tests/multirank_fsdp_worker.py).

    python -m torch.distributed.run --nproc-per-node W tests/multirank_stall_worker.py stall OUT SOCKET
    python -m torch.distributed.run --nproc-per-node W tests/multirank_stall_worker.py local DEVICE OUT SOCKET
    python tests/multirank_stall_worker.py one DEVICE OUT SOCKET                 # one process, world 1

- ``stall``: FSDP2 + AdamW (``FSDP_WORKER_HIDDEN``); after one warm snapshot, every rank but 0
  SIGSTOPs itself and rank 0 times a snapshot() while they are stopped (a collective on its
  thread would wait for them), then wakes them and every rank snapshots that step; then the
  stall of three more steps against a copy of the same local bytes (wall and thread CPU time),
  and how many DTensor layouts (``compute_local_shape_and_global_offset``) a second flatten
  computed.
- ``local``: ``Shard(0)`` DTensors made with ``DTensor.from_local`` whose local tensors are on
  DEVICE (``cuda``: every rank on this node's one device, gloo needs no NCCL), snapshot, and
  ``ckptd.load`` of the step against the full tensors.
- ``one``: a world of one process with a DTensor on a 1-device mesh of DEVICE: snapshot, restore
  into another DTensor, bit-exact.

Each rank writes ``OUT/<mode>-rank-<r>.json``. Every collective and wait has a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import ckptd
from client import Client

RUN = "stall"


def connect(socket_path: str) -> Client:
    return Client.connect(socket_path, autostart=False, run=RUN, commit_timeout_s=60.0, group_timeout_s=120.0)


def stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP): state T in /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] in "Tt"


def stall(out: Path, socket_path: str, rank: int, world: int) -> dict[str, Any]:
    from multirank_fsdp_worker import build, train_step

    from client.tree import flatten

    client = connect(socket_path)
    state = build(0, sharded=True)
    train_step(state, 0)
    client.snapshot(state, step=1).wait(120)  # a slot made and touched, the layout registered
    pids = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(pids, torch.tensor([os.getpid()]))
    dist.barrier()
    result: dict[str, Any] = {}
    if rank != 0:
        os.kill(os.getpid(), signal.SIGSTOP)  # until rank 0's snapshot() returned
    else:
        peers = [int(p.item()) for p in pids[1:]]
        deadline = time.monotonic() + 60
        while not all(stopped(p) for p in peers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"peers {peers} did not stop")
            time.sleep(0.01)
        started = time.perf_counter()
        handle = client.snapshot(state, step=2)
        result["peers_stopped_s"] = time.perf_counter() - started
        result["peers_still_stopped"] = all(stopped(p) for p in peers)
        for p in peers:
            os.kill(p, signal.SIGCONT)
    if rank != 0:
        handle = client.snapshot(state, step=2)
    info = handle.wait(120)
    result["step2"] = None if info is None else str(info.path)

    from torch.distributed.tensor import _utils

    original, calls = _utils.compute_local_shape_and_global_offset, [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    _utils.compute_local_shape_and_global_offset = counted  # type: ignore[assignment]
    try:
        flat = flatten(state)
    finally:
        _utils.compute_local_shape_and_global_offset = original
    result["layouts_computed"] = calls[0]
    result["sharded_tensors"] = sum(len(c.shards) for c in flat.components)
    result.update(timed(client, state, [t for c in flat.components for _, t in c.tensors]))
    client.close()
    return result


def timed(client: Client, state: dict[str, Any], locals_: list[torch.Tensor]) -> dict[str, Any]:
    """snapshot() of steps 3-8 (the fastest of three, by wall and by thread CPU time) against a copy
    of the same local tensors into buffers already touched."""
    result: dict[str, Any] = {}
    dsts = [torch.empty_like(t) for t in locals_]

    def copy() -> None:
        for d, t in zip(dsts, locals_, strict=True):
            d.copy_(t)

    copy()  # the destinations' pages touched
    for clock in ("wall", "cpu"):
        now = time.perf_counter if clock == "wall" else time.thread_time
        copies, stalls = [], []
        for step in (3, 4, 5) if clock == "wall" else (6, 7, 8):
            started = now()
            copy()
            copies.append(now() - started)
            started = now()
            handle = client.snapshot(state, step=step)
            stalls.append(now() - started)
            handle.wait(120)
        result[f"copy_{clock}_s"], result[f"snapshot_{clock}_s"] = min(copies), min(stalls)
    result["local_bytes"] = sum(t.numel() * t.element_size() for t in locals_)
    return result


def local(device: str, out: Path, socket_path: str, rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    client = connect(socket_path)
    mesh = init_device_mesh(device, (world,))
    rows = 4  # per rank
    full = {
        "w": torch.arange(world * rows * 6, dtype=torch.float32).reshape(world * rows, 6),
        "b": (torch.arange(world * rows, dtype=torch.float64) * 0.5).reshape(world * rows),
    }
    state = {
        k: DTensor.from_local(
            v[rank * rows : (rank + 1) * rows].to(device), mesh, [Shard(0)], run_check=False
        )
        for k, v in full.items()
    }
    handle = client.snapshot({"model": state}, step=1)
    returned_before_copy = not handle.staged
    if device == "cuda":  # in place, queued after snapshot(): the copy must have read the old bytes
        with torch.no_grad():
            for t in state.values():
                t.to_local().mul_(0).add_(7)
    info = handle.wait(120)
    saved = ckptd.load(info.path)["model"] if info is not None else {}
    # Restored into a plain dict of DTensors (not a module's): each rank reads its own rows.
    target = {
        k: DTensor.from_local(torch.zeros(rows, *v.shape[1:], dtype=v.dtype, device=device), mesh, [Shard(0)])
        for k, v in full.items()
    }
    restored = client.restore({"model": target})
    client.close()
    return {
        "restored": restored,
        "restored_same": {
            k: bool(torch.equal(target[k].to_local().cpu(), v[rank * rows : (rank + 1) * rows]))
            for k, v in full.items()
        },
        "returned_before_copy": returned_before_copy,
        "on_device": all(t.to_local().device.type == device for t in state.values()),
        "same": {
            k: bool(k in saved and torch.equal(saved[k].view(torch.uint8), v.view(torch.uint8)))
            for k, v in full.items()
        },
    }


def one(device: str, out: Path, socket_path: str) -> dict[str, Any]:
    """A world of one: a DTensor on a mesh of one device is held whole, snapshotted and restored."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    client = connect(socket_path)
    mesh = init_device_mesh(device, (1,))
    full = torch.randn(8, 5, generator=torch.Generator().manual_seed(3))

    def module(values: torch.Tensor) -> nn.Module:
        m = nn.Module()
        m.w = nn.Parameter(DTensor.from_local(values.to(device), mesh, [Shard(0)], run_check=False))
        return m

    info = client.snapshot({"model": module(full)}, step=1).wait(120)
    saved = ckptd.load(info.path)["model"]["w"] if info is not None else torch.empty(0)
    target = module(torch.zeros(8, 5))
    restored = client.restore({"model": target})
    client.close()
    local_w = target.w.to_local()  # type: ignore[operator]
    back = local_w.detach().cpu()
    return {
        "saved_same": bool(torch.equal(saved, full)),
        "restored": restored,
        "restored_same": bool(torch.equal(back, full)),
        "restored_device": str(local_w.device.type),
    }


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "one":
        device, out, socket_path = argv[1], Path(argv[2]), argv[3]
        backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        try:
            result = one(device, out, socket_path)
        finally:
            dist.destroy_process_group()
        (out / "one-rank-0.json").write_text(json.dumps(result))
        return
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "stall":
        result = stall(Path(argv[1]), argv[2], rank, world)
    else:
        result = local(argv[1], Path(argv[2]), argv[3], rank, world)
    out = Path(argv[1] if mode == "stall" else argv[2])
    (out / f"{mode}-rank-{rank}.json").write_text(json.dumps({"rank": rank, "world_size": world, **result}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
