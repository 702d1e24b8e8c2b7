"""One rank of a ``torchrun`` job for tests/test_multirank_noncontig.py: non-contiguous DTensor
placements (gloo, CPU), ckptd under every rank.

    python -m torch.distributed.run --nproc-per-node W tests/multirank_noncontig_worker.py MODE OUT SOCKET
    python tests/multirank_noncontig_worker.py restore OUT SOCKET          # one plain process

The state (the same values on every world size; only the placements follow it):
- ``model``: a tiny Qwen2 whose 2-D parameters are ``Shard(1)`` on a 1-D mesh of W ranks (column
  blocks: not contiguous) and whose 1-D ones are ``Shard(0)``: one component, stored per rank.
- ``aux``: a 3-row ``Shard(0)`` parameter on the 1-D mesh: contiguous, consolidated files.
- ``grid``: on a 2-D mesh (W x 1 when saving with 2 ranks, 2 x 2 with 4): ``hsdp`` is
  ``(Replicate(), Shard(0))`` (each block held by the ranks of a replica group: written once),
  ``tiles`` is ``(Shard(0), Shard(1))``.
- ``optimizer``: AdamW (``foreach=False``: its parameters are on two meshes) over all of them,
  stepped with the same seeded gradients on every world size.

MODE:
- ``save``: one optimizer step (gradients 0), snapshot step 1 and wait; rank 0 writes
  ``OUT/full.safetensors`` (the full state, gathered with ``full_tensor()``); then one more step
  (gradients 1) and rank 0 writes ``OUT/next.safetensors``. Also: a ``Partial`` DTensor (refused).
- ``restore``: the same model of other weights, a fresh AdamW, ``client.restore()``; rank 0
  writes ``OUT/restored-W.safetensors``, then the step of gradients 1 and ``OUT/next-W.safetensors``.
  With W > 1 it also ``dcp.load``s the model with ``HuggingFaceStorageReader`` on the model's
  per-rank directory into a third model, written as ``OUT/dcp-W.safetensors``.

Each rank writes ``OUT/<mode>-W-rank-<r>.json``. Every collective has a timeout.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from client import CheckpointError, Client

RUN = "noncontig"
STEP = 1


class Grid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hsdp = nn.Parameter(torch.randn(6, 4))
        self.tiles = nn.Parameter(torch.randn(5, 6))


class Aux(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(3, 5))


def _distribute(module: nn.Module, mesh: Any, placements_of: Any) -> None:
    from torch.distributed.tensor import distribute_tensor

    for mod in module.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            d = distribute_tensor(p.detach(), mesh, placements_of(name, p))
            mod.register_parameter(name, nn.Parameter(d))


def build(seed: int, world: int) -> dict[str, Any]:
    config = Qwen2Config(
        vocab_size=67,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=24,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model, aux, grid = Qwen2ForCausalLM(config), Aux(), Grid()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard

        mesh = init_device_mesh("cpu", (world,))
        mesh2 = init_device_mesh("cpu", (2, world // 2) if world > 2 else (world, 1))
        _distribute(model, mesh, lambda _, p: [Shard(1)] if p.dim() == 2 else [Shard(0)])
        _distribute(aux, mesh, lambda _, p: [Shard(0)])
        _distribute(
            grid, mesh2, lambda n, p: [Replicate(), Shard(0)] if n == "hsdp" else [Shard(0), Shard(1)]
        )
    params = [*model.parameters(), *aux.parameters(), *grid.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2, foreach=False)
    return {"model": model, "aux": aux, "grid": grid, "optimizer": opt, "step": 0}


def step_with(state: dict[str, Any], seed: int) -> None:
    """One optimizer step with gradients drawn from ``seed`` (the same whole values anywhere)."""
    from torch.distributed.tensor import distribute_tensor

    g = torch.Generator().manual_seed(seed)
    for p in state["optimizer"].param_groups[0]["params"]:
        grad = torch.randn(tuple(p.shape), generator=g)
        p.grad = distribute_tensor(grad, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else grad
    state["optimizer"].step()
    state["optimizer"].zero_grad()


def full(t: Any) -> torch.Tensor:
    whole: torch.Tensor = t.full_tensor() if hasattr(t, "full_tensor") else t
    return whole.detach().clone().contiguous()


def gathered(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The full state (every rank takes part in the gathers)."""
    out: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}
    for key in ("model", "aux", "grid"):
        out.update({f"{key}.{k}": full(v) for k, v in state[key].state_dict().items()})
        names.update({id(p): f"{key}.{n}" for n, p in state[key].named_parameters()})
    for p, s in state["optimizer"].state.items():
        for key, v in s.items():
            out[f"optimizer.{names[id(p)]}.{key}"] = full(v)
    return out


def refused(client: Client, world: int) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial

    mesh = init_device_mesh("cpu", (world,))
    t = DTensor.from_local(torch.ones(2, 2), mesh, [Partial()], run_check=False)
    try:
        client.snapshot({"sums": {"w": t}}, step=9)
    except (ValueError, CheckpointError) as e:
        return str(e)
    return ""


def save(client: Client, out: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    state = build(0, world)
    step_with(state, 0)
    state["step"] = STEP
    handle = client.snapshot(state, step=STEP)
    info = handle.wait(timeout=90)
    result["path"] = str(info.path) if info is not None else None
    result["bytes"] = info.bytes if info is not None else None
    ref = gathered(state)
    if rank == 0:
        save_file(ref, str(out / "full.safetensors"))
    step_with(state, 1)
    ref = gathered(state)
    if rank == 0:
        save_file(ref, str(out / "next.safetensors"))
    result["refused"] = refused(client, world)


def restore(client: Client, out: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    state = build(7, world)
    result["restored"] = client.restore(state, step=STEP)
    result["placements"] = {n: str(getattr(p, "placements", "")) for n, p in state["grid"].named_parameters()}
    ref = gathered(state)
    if rank == 0:
        save_file(ref, str(out / f"restored-{world}.safetensors"))
    step_with(state, 1)
    ref = gathered(state)
    if rank == 0:
        save_file(ref, str(out / f"next-{world}.safetensors"))
    if world > 1:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, load  # type: ignore[attr-defined]

        other = build(11, world)
        sd = other["model"].state_dict()
        load(
            sd,
            storage_reader=HuggingFaceStorageReader(str(Path(client.root) / RUN / "step-000001" / "model")),
        )
        ref = {f"model.{k}": full(v) for k, v in sd.items()}
        if rank == 0:
            save_file(ref, str(out / f"dcp-{world}.safetensors"))


MODES = {"save": save, "restore": restore}


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
        max_shard_size="2KB",
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
