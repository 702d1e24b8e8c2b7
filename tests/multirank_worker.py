"""One rank of a ``torchrun`` job for tests/test_multirank.py: DDP (gloo, CPU) on a tiny Qwen2, one
training step, then ckptd under every rank.

    python -m torch.distributed.run --nproc-per-node W tests/multirank_worker.py MODE OUT SOCKET STEP

MODE:
- ``save``: every rank snapshots step STEP, waits for its handle, then restores the newest step
  into a model of other weights;
- ``kill``: every rank snapshots, all pass a barrier (every snapshot() has returned), then every
  rank SIGKILLs itself;
- ``missing``: the last rank exits (status 0) right after connect instead of snapshotting; the
  others snapshot and wait for their handles;

Each rank writes ``OUT/rank-<r>.json`` (what its handle and restore said) and, in ``save``,
``OUT/rank-<r>.safetensors`` (its model and first exp_avg as saved) and
``OUT/rank-<r>-restored.safetensors`` (the same after the restore). Every collective has a timeout.
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
from torch.nn.parallel import DistributedDataParallel
from transformers import Qwen2Config, Qwen2ForCausalLM

from client import CheckpointError, Client

SHARD = "60KB"  # a dozen shards of the tiny model: spread over the ranks
COMMIT_TIMEOUT_S = 4.0


def tiny_qwen2(seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def build_state(seed: int = 0, ddp: bool = False) -> dict[str, Any]:
    """The model (wrapped in DDP when ``ddp``) after one AdamW step, as every rank snapshots it."""
    model = tiny_qwen2(seed)
    wrapped: torch.nn.Module = DistributedDataParallel(model) if ddp else model
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    torch.manual_seed(100 + seed)
    ids = torch.randint(0, 512, (2, 16))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return {"model": model, "optimizer": opt, "step": 0}


def reference(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    model: torch.nn.Module = state["model"]
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first = next(iter(state["optimizer"].state.values()))
    out["optimizer.exp_avg.0"] = first["exp_avg"].clone()
    return out


def main(mode: str, out: Path, socket_path: str, step: int) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict[str, Any] = {"rank": rank, "world_size": world}
    state = build_state(seed=0, ddp=True)
    client = Client.connect(
        socket_path,
        autostart=False,
        run="ddp",
        max_shard_size=SHARD,
        commit_timeout_s=COMMIT_TIMEOUT_S,
        group_timeout_s=60.0,
    )
    if mode == "missing" and rank == world - 1:
        os._exit(0)  # never snapshots; status 0 so that torchrun leaves the others running
    state["step"] = step
    started = time.monotonic()
    handle = client.snapshot(state, step=step)
    result["stall_s"] = time.monotonic() - started
    if mode == "kill":
        dist.barrier()  # every rank's snapshot() has returned
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        info = handle.wait(timeout=60)
        result["path"] = str(info.path) if info is not None else None
        result["bytes"] = info.bytes if info is not None else None
    except CheckpointError as e:
        result["error"], result["code"] = str(e), e.code
    result["waited_s"] = time.monotonic() - started
    if mode == "save" and "error" not in result:
        save_file(reference(state), str(out / f"rank-{rank}.safetensors"))
        fresh = build_state(seed=1, ddp=True)
        result["restored"] = client.restore(fresh)
        save_file(reference(fresh), str(out / f"rank-{rank}-restored.safetensors"))
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    if mode == "missing":
        os._exit(0)  # a peer is gone: no collective (barrier, destroy) can complete
    client.close()
    dist.barrier()  # before destroy_process_group, or gloo may abort (research B2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
