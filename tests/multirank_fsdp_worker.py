"""One rank of a ``torchrun`` job for tests/test_multirank_fsdp.py: FSDP2 (``fully_shard``, gloo,
CPU) on a tiny Qwen2 with an odd vocabulary (513 rows: uneven shards) and a 3-row extra module,
AdamW, ckptd under every rank.

    python -m torch.distributed.run --nproc-per-node W tests/multirank_fsdp_worker.py MODE OUT SOCKET
    python tests/multirank_fsdp_worker.py restore OUT SOCKET          # one plain process, no FSDP

MODE:
- ``save``: one training step (batch 0), snapshot step 1 and wait; rank 0 writes
  ``OUT/full.safetensors`` (the full state, gathered with ``full_tensor()``); then the
  uninterrupted run goes on: the loss of batch 1, one more step, the loss of batch 2. It also
  tries a ``Partial`` DTensor (refused) and times snapshot() against a full-model copy.
- ``restore``: a model of other weights and a fresh AdamW, ``client.restore()``, rank 0 writes
  ``OUT/restored-W.safetensors`` (gathered), then the same losses as ``save``.
- ``bench``: ``save``'s snapshot and timings only, of a larger model when ``FSDP_WORKER_HIDDEN``
  is set (e.g. 512: about 400 MB of model and optimizer state).
- ``kill``: snapshot step 1, a barrier (every snapshot() returned), then every rank SIGKILLs itself.
- ``fail``: snapshot step 1 and record how its handle ended (the daemon injects a fault).
- ``dcp``: ``dcp.load`` with ``HuggingFaceStorageReader(step dir)`` into an FSDP2 model's state
  dict; rank 0 writes ``OUT/dcp-W.safetensors`` (the model, gathered).

Each rank writes ``OUT/<mode>-W-rank-<r>.json``. Every collective has a timeout.
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
from safetensors.torch import save_file
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from client import CheckpointError, Client

SHARD = os.environ.get("FSDP_WORKER_SHARD", "40KB")  # several shard files, each written by both ranks
RUN = "fsdp"
STEP = 1


class Aux(nn.Module):
    """A 3-row parameter: 2 + 1 rows on 2 ranks, 1 + 1 + 1 + 0 on 4."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(3, 5))

    def forward(self) -> torch.Tensor:
        return (self.table**2).sum() * 1e-3


def build(seed: int, sharded: bool) -> dict[str, Any]:
    hidden = int(os.environ.get("FSDP_WORKER_HIDDEN", "32"))  # larger for a measurement (bench)
    config = Qwen2Config(
        vocab_size=513 if hidden == 32 else 8193,
        hidden_size=hidden,
        num_hidden_layers=2 if hidden == 32 else 8,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    aux = Aux()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        fully_shard(aux)
    opt = torch.optim.AdamW([*model.parameters(), *aux.parameters()], lr=1e-2)
    return {"model": model, "aux": aux, "optimizer": opt, "step": 0}


def batch(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(0, 513, (2, 12), generator=g)


def train_step(state: dict[str, Any], i: int) -> float:
    ids = batch(i)  # the same batch on every rank: the loss does not depend on the world size
    loss = state["model"](input_ids=ids, labels=ids).loss + state["aux"]()
    loss.backward()
    state["optimizer"].step()
    state["optimizer"].zero_grad()
    return float(loss.detach())


def loss_of(state: dict[str, Any], i: int) -> float:
    with torch.no_grad():
        ids = batch(i)
        loss = state["model"](input_ids=ids, labels=ids).loss + state["aux"]()
    return float(loss)


def full(t: Any) -> torch.Tensor:
    whole: torch.Tensor = t.full_tensor() if hasattr(t, "full_tensor") else t
    return whole.detach().clone().contiguous()


def gathered(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The full state (every rank takes part in the gathers)."""
    out = {f"model.{k}": full(v) for k, v in state["model"].state_dict().items()}
    out.update({f"aux.{k}": full(v) for k, v in state["aux"].state_dict().items()})
    names = {id(p): f"model.{n}" for n, p in state["model"].named_parameters()}
    names.update({id(p): f"aux.{n}" for n, p in state["aux"].named_parameters()})
    for p, s in state["optimizer"].state.items():
        for key, v in s.items():
            out[f"optimizer.{names[id(p)]}.{key}"] = full(v)
    return out


def timings(state: dict[str, Any], client: Client, rank: int) -> dict[str, float]:
    """snapshot() of steps 2-4 (the fastest) against copies of its local bytes and of the model."""
    sd = {**state["model"].state_dict(), **{f"x.{k}": v for k, v in state["aux"].state_dict().items()}}
    locals_ = [v.to_local() if hasattr(v, "to_local") else v for v in sd.values()]
    for s in state["optimizer"].state.values():
        locals_ += [v.to_local() if hasattr(v, "to_local") else v for v in s.values()]
    local_bytes = sum(t.numel() * t.element_size() for t in locals_)
    full_bytes = sum(t.numel() * t.element_size() for t in gathered(state).values())
    # Copies into buffers already touched (no page faults): the memcpy floors.
    buf = torch.zeros(full_bytes, dtype=torch.uint8)
    src = torch.ones(full_bytes, dtype=torch.uint8)
    started = time.perf_counter()
    buf.copy_(src)
    full_copy = time.perf_counter() - started
    del buf, src
    dsts = [torch.zeros_like(t) for t in locals_]
    started = time.perf_counter()
    for d, t in zip(dsts, locals_, strict=True):
        d.copy_(t)
    local_copy = time.perf_counter() - started
    from client.tree import flatten

    started = time.perf_counter()
    flatten(state)
    flatten_s = time.perf_counter() - started
    stalls = []
    for step in (2, 3, 4):  # each slot is touched once before: its pages are there
        started = time.perf_counter()
        handle = client.snapshot(state, step=step)
        stalls.append(time.perf_counter() - started)
        handle.wait(timeout=120)
    return {
        "snapshot_s": min(stalls),
        "snapshot_all_s": stalls,
        "flatten_s": flatten_s,  # of that: flattening the state (state_dict() calls, checks)
        "local_copy_s": local_copy,
        "full_copy_s": full_copy,
        "local_bytes": local_bytes,
        "full_bytes": full_bytes,
        "rank": rank,
    }


def refused(client: Client) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    t = DTensor.from_local(torch.ones(4, 6), mesh, [Partial()], run_check=False)
    try:
        client.snapshot({"cols": {"w": t}}, step=9)
    except (ValueError, CheckpointError) as e:
        return str(e)
    return ""


def save(client: Client, out: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    state = build(0, sharded=True)
    result["loss0"] = train_step(state, 0)
    state["step"] = STEP
    started = time.perf_counter()
    handle = client.snapshot(state, step=STEP)
    result["stall_s"] = time.perf_counter() - started
    info = handle.wait(timeout=60)
    result["path"] = str(info.path) if info is not None else None
    result["bytes"] = info.bytes if info is not None else None
    ref = gathered(state)
    if rank == 0:
        save_file(ref, str(out / "full.safetensors"))
    result["loss1"] = loss_of(state, 1)
    train_step(state, 1)
    result["loss2"] = loss_of(state, 2)
    result["refused"] = refused(client)
    result["timings"] = timings(state, client, rank)


def bench(client: Client, out: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    """The stall and time to durable of a larger model (``FSDP_WORKER_HIDDEN``)."""
    state = build(0, sharded=True)
    train_step(state, 0)
    started = time.perf_counter()
    handle = client.snapshot(state, step=STEP)
    result["stall_s"] = time.perf_counter() - started
    handle.wait(timeout=300)
    result["durable_s"] = time.perf_counter() - started
    result["timings"] = timings(state, client, rank)


def restore(client: Client, out: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    state = build(7, sharded=world > 1 or "RANK" in os.environ)
    result["restored"] = client.restore(state, step=STEP)
    ref = gathered(state)
    if rank == 0:
        save_file(ref, str(out / f"restored-{world}.safetensors"))
    result["loss1"] = loss_of(state, 1)
    train_step(state, 1)
    result["loss2"] = loss_of(state, 2)


def dcp_load(client: Client, out: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load  # type: ignore[attr-defined]
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = build(7, sharded=True)
    sd = get_model_state_dict(state["model"])
    step_dir = Path(client.root) / RUN / f"step-{STEP:06d}"
    load(sd, storage_reader=HuggingFaceStorageReader(str(step_dir)))
    set_model_state_dict(state["model"], sd)
    ref = {f"model.{k}": full(v) for k, v in state["model"].state_dict().items()}
    if rank == 0:
        save_file(ref, str(out / f"dcp-{world}.safetensors"))


def kill(client: Client, out: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    """Snapshot step 1; once every rank's snapshot() has returned (a barrier), SIGKILL itself."""
    state = build(0, sharded=True)
    train_step(state, 0)
    state["step"] = STEP
    client.snapshot(state, step=STEP)
    dist.barrier()
    os.kill(os.getpid(), signal.SIGKILL)


def fail(client: Client, out: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    """Snapshot step 1 and report how the handle ended (the daemon injects a fault)."""
    state = build(0, sharded=True)
    train_step(state, 0)
    try:
        client.snapshot(state, step=STEP).wait(timeout=60)
        result["error"] = None
    except CheckpointError as e:
        result["error"], result["code"] = str(e), e.code


MODES = {"save": save, "kill": kill, "fail": fail, "bench": bench, "restore": restore, "dcp": dcp_load}


def main(mode: str, out: Path, socket_path: str) -> None:
    plain = "RANK" not in os.environ
    if not plain:
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = (0, 1) if plain else (dist.get_rank(), dist.get_world_size())
    result: dict[str, Any] = {"rank": rank, "world_size": world}
    client = Client.connect(
        socket_path,
        autostart=False,
        run=RUN,
        max_shard_size=SHARD,
        commit_timeout_s=20.0,
        group_timeout_s=60.0,
    )
    MODES[mode](client, out, rank, world, result)
    (out / f"{mode}-{world}-rank-{rank}.json").write_text(json.dumps(result))
    client.close()
    if not plain:
        dist.barrier()  # before destroy_process_group, or gloo may abort (research B2)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
