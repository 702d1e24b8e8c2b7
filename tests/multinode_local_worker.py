"""One rank of a two-node ``torchrun`` job for tests/test_multinode_local.py: each node has its own
daemon with a root of its own (node-local roots, no shared filesystem); DDP (gloo, CPU) on a tiny
Qwen2 from a config.

    CKPTD_SOCKET=<node's socket> python -m torch.distributed.run --nnodes 2 --node-rank N \
        --nproc-per-node 2 ... tests/multinode_local_worker.py MODE OUT

MODE:
- ``save``: one DDP training step before each of steps 1, 2 and 3; every rank snapshots steps 1
  and 2 and waits for them; before step 3 every rank passes a barrier, then node 1's ranks
  SIGKILL themselves (their snapshot() of step 3 never returns) and node 0's snapshot step 3 and
  wait. Each rank writes ``OUT/save-rank-<r>-step-<s>.safetensors`` (its state as snapshotted).
- ``restore``: into a model of other weights: ``restore()`` (the newest step every node has),
  ``restore(step=3)`` (node 1 lacks it), then node 1's first rank flips a byte of its copy of
  step 2 and every rank restores again (falls back to step 1), the byte is put back; then an
  FSDP2 (``fully_shard``) module is snapshotted (refused on node-local roots).

Each rank writes ``OUT/<mode>-rank-<r>.json`` (what its handles and restores said, the warnings
ckptd logged). Every collective has a timeout.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from client import CheckpointError, Client

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from multirank_worker import SHARD, reference, tiny_qwen2  # noqa: E402

RUN = "ddp"


def build(seed: int) -> dict[str, Any]:
    model = tiny_qwen2(seed)
    wrapped = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    return {"model": model, "ddp": wrapped, "optimizer": opt}


def train(state: dict[str, Any], i: int) -> None:
    torch.manual_seed(100 + i)  # the same batch on every rank
    ids = torch.randint(0, 512, (2, 16))
    state["ddp"](input_ids=ids, labels=ids).loss.backward()
    state["optimizer"].step()
    state["optimizer"].zero_grad()


def snapshotted(state: dict[str, Any], step: int) -> dict[str, Any]:
    return {"model": state["model"], "optimizer": state["optimizer"], "step": step}


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


def attempt(result: dict[str, Any], key: str, call: Any) -> None:
    try:
        result[key] = call()
    except CheckpointError as e:
        result[key] = {"error": str(e), "code": e.code}


def save(client: Client, out: Path, rank: int, node: int) -> dict[str, Any]:
    state = build(seed=0)
    result: dict[str, Any] = {}
    for step in (1, 2, 3):
        train(state, step)
        if step == 3:
            dist.barrier()  # steps 1 and 2 are committed on every node
            if node == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        save_file(reference(snapshotted(state, step)), str(out / f"save-rank-{rank}-step-{step}.safetensors"))
        info = client.snapshot(snapshotted(state, step), step=step).wait(timeout=60)
        result[f"step-{step}"] = None if info is None else str(info.path)
    return result


def flip(path: Path) -> None:
    """Flip one bit of the last byte of ``path`` (tensor data: the header stays valid)."""
    mode = os.stat(path).st_mode & 0o7777  # committed steps are read-only
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte ^ 0x01]))
        os.fsync(f.fileno())
    os.chmod(path, mode)


def corrupt_target(client: Client) -> Path:
    shards = sorted((client.root / RUN / "step-000002").glob("model*.safetensors"))
    return shards[0]


def restore(client: Client, out: Path, rank: int, node: int, local_rank: int) -> dict[str, Any]:
    warnings = Warnings()
    logging.getLogger("client").addHandler(warnings)
    result: dict[str, Any] = {}
    fresh = build(seed=1)
    attempt(result, "newest", lambda: client.restore(snapshotted(fresh, -1)))
    save_file(reference(fresh), str(out / f"restore-rank-{rank}-newest.safetensors"))
    attempt(result, "explicit-3", lambda: client.restore(snapshotted(build(seed=2), -1), step=3))
    dist.barrier()
    if node == 1 and local_rank == 0:
        flip(corrupt_target(client))
    dist.barrier()
    warnings.seen.clear()
    fallback = build(seed=3)
    attempt(result, "fallback", lambda: client.restore(snapshotted(fallback, -1)))
    result["fallback-warnings"] = list(warnings.seen)
    save_file(reference(fallback), str(out / f"restore-rank-{rank}-fallback.safetensors"))
    dist.barrier()
    if node == 1 and local_rank == 0:
        flip(corrupt_target(client))  # put back: the step verifies again
    dist.barrier()
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(5)
    sharded = nn.Linear(16, 8)
    fully_shard(sharded)
    attempt(result, "fsdp", lambda: str(client.snapshot({"model": sharded}, step=9).wait(timeout=60)))
    return result


def main(mode: str, out: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    node, local_rank = int(os.environ["GROUP_RANK"]), int(os.environ["LOCAL_RANK"])
    client = Client.connect(
        os.environ["CKPTD_SOCKET"],
        autostart=False,
        run=RUN,
        max_shard_size=SHARD,
        commit_timeout_s=10.0,
        group_timeout_s=60.0,
    )
    if mode == "save":
        result = save(client, out, rank, node)
    else:
        result = restore(client, out, rank, node, local_rank)
    result.update(rank=rank, node=node, root=str(client.root))
    (out / f"{mode}-rank-{rank}.json").write_text(json.dumps(result))
    if mode == "save":
        os._exit(0)  # node 1 is gone: no collective (barrier, destroy) can complete
    client.close()
    dist.barrier()  # before destroy_process_group, or gloo may abort
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
