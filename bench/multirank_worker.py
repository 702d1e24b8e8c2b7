"""One rank of the multi-rank benchmark; ``python -m bench.multirank`` runs it under ``torchrun``:

    torchrun --nproc-per-node W bench/multirank_worker.py --workload ddp|fsdp --out DIR ...

Every rank builds the same model and its AdamW state after one training step: ``ddp`` wraps it
in ``DistributedDataParallel`` (every rank holds the whole state), ``fsdp`` shards it with FSDP2
``fully_shard`` (``Shard(0)`` DTensors). Then, rep after rep, each system checkpoints the same
state in turn (the order rotates each rep): all ranks start together (a barrier), each times its
own stall and its time to durable, rank 0 records the bytes on disk and deletes the checkpoint.
The per-rank memcpy floor (its local tensors copied into touched buffers, all ranks at once) is
measured in the same rotation. Each rank writes ``DIR/rank-<r>.json``. Every collective is bounded
by the process group's timeout.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bench.limits import memcpy_floor
from bench.systems import fsync_tree, tree_bytes

log = logging.getLogger("bench.multirank_worker")
SYSTEMS = ("ckptd", "dcp_async", "dcp_save")


class Mlp(nn.Module):
    """``layers`` square fp32 linear layers: 4 H^2 bytes each, 12 H^2 with AdamW's two moments."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def build(
    workload: str, mb_per_rank: float, hidden: int
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """(the module to train, the module whose state is saved, its AdamW) after one step. The
    state is about ``mb_per_rank`` MB per rank: the whole of it on every rank under DDP, 1/W of
    a W times larger model under FSDP2, whose layers are sqrt(W) times wider (not W times more
    of them), so a rank holds about as many tensors and bytes at every world size."""
    world = dist.get_world_size()
    total = mb_per_rank * 1e6 * (world if workload == "fsdp" else 1)
    if workload == "fsdp":
        hidden = max(64, round(hidden * math.sqrt(world) / 64) * 64)
    layers = max(2, round(total / (12 * hidden * (hidden + 1))))
    torch.manual_seed(0)  # the same weights on every rank
    model = Mlp(hidden, layers)
    trained: nn.Module = model
    if workload == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(1))
    trained(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return trained, model, opt


def state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = list(model.state_dict().values())
    for s in opt.state.values():
        out += [v for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # DTensor: this rank's shard


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # a DTensor's numel is the global one


class Checkpointer:
    """One system: ``save(step)`` returns (stall s, durable s, path, extra figures); every rank
    calls it at the same time."""

    def __init__(
        self, name: str, model: nn.Module, opt: torch.optim.Optimizer, args: argparse.Namespace
    ) -> None:
        self.name, self.model, self.opt, self.args = name, model, opt, args
        self.rank = dist.get_rank()
        self.stager: Any = None
        if name == "ckptd":
            from client import Client

            self.client = Client.connect(
                args.socket,
                autostart=False,
                run=f"mr-{args.workload}-w{dist.get_world_size()}",
                max_shard_size=args.shard_size,
                commit_timeout_s=min(args.timeout_s / 4, 120.0),  # below stuck_timeout_s (300)
                group_timeout_s=args.timeout_s,
            )
        elif name == "dcp_async":
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            # async_save's background collectives need a group of their own (torch's advice):
            # on the default group they would interleave with the training thread's.
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=args.timeout_s))
            self.stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=False,  # CPU: no pinned memory, no CUDA streams
                    use_shared_memory=True,  # staging buffers in shared memory, cached across saves
                    use_async_staging=False,
                    use_non_blocking_copy=False,
                )
            )

    def save(self, step: int) -> tuple[float, float, Path, dict[str, float]]:
        if self.name == "ckptd":
            return self._ckptd(step)
        return self._dcp(step)

    def _ckptd(self, step: int) -> tuple[float, float, Path, dict[str, float]]:
        started = time.perf_counter()
        handle = self.client.snapshot({"model": self.model, "optimizer": self.opt}, step=step)
        stall = time.perf_counter() - started
        info = handle.wait(timeout=self.args.timeout_s)
        durable = time.perf_counter() - started
        if info is None:
            raise RuntimeError(f"ckptd skipped step {step}")
        return stall, durable, info.path, {"handle_stall_s": info.stall_s, "handle_durable_s": info.durable_s}

    def _dcp(self, step: int) -> tuple[float, float, Path, dict[str, float]]:
        from torch.distributed.checkpoint.filesystem import FileSystemWriter
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse, async_save, save

        path = checkpoint_dir(self.args, self.name, step)
        started = time.perf_counter()
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        state = {"model": model_sd, "optimizer": optim_sd}
        state_dict_s = time.perf_counter() - started
        writer = FileSystemWriter(path, sync_files=True)  # fsyncs each file and .metadata
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.name == "dcp_save":
                save(state, storage_writer=writer)
                stall = time.perf_counter() - started
            else:
                resp = async_save(
                    state, storage_writer=writer, process_group=self.group, async_stager=self.stager
                )
                future = resp.upload_completion if isinstance(resp, AsyncSaveResponse) else resp
                if isinstance(resp, AsyncSaveResponse):
                    resp.staging_completion.result(timeout=self.args.timeout_s)
                stall = time.perf_counter() - started
                future.result(timeout=self.args.timeout_s)
        fsync_s = 0.0
        if self.rank == 0:  # DCP fsyncs its files but not the directory entries: add that
            synced = time.perf_counter()
            fsync_tree(path)
            fsync_s = time.perf_counter() - synced
        durable = time.perf_counter() - started
        return stall, durable, path, {"state_dict_s": state_dict_s, "fsync_added_s": fsync_s}

    def close(self) -> None:
        if self.name == "ckptd":
            self.client.close(timeout_s=self.args.timeout_s)
        if self.stager is not None:
            self.stager.close()


def checkpoint_dir(args: argparse.Namespace, system: str, step: int) -> Path:
    return Path(args.out) / "scratch" / f"{system}-{step:04d}"


def one_save(ck: Checkpointer, step: int, settle_s: float) -> dict[str, float]:
    rank = dist.get_rank()
    if rank == 0 and ck.name != "ckptd":
        checkpoint_dir(ck.args, ck.name, step).mkdir(parents=True)
    dist.barrier()  # every rank starts together
    stall, durable, path, extra = ck.save(step)
    dist.barrier()  # every rank's checkpoint is durable
    out = {"stall_s": stall, "durable_s": durable, **extra}
    if rank == 0:
        out["bytes_on_disk"] = float(tree_bytes(path))
        shutil.rmtree(path)
        os.sync()
        time.sleep(settle_s)
    dist.barrier()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    started = time.perf_counter()
    _, model, opt = build(args.workload, args.mb_per_rank, args.hidden)
    tensors = state_tensors(model, opt)
    mine = [local(t).detach() for t in tensors]
    result: dict[str, Any] = {
        "rank": rank,
        "world_size": world,
        "workload": args.workload,
        "build_s": time.perf_counter() - started,
        "tensors": len(tensors),
        "local_bytes": sum(nbytes(t) for t in mine),
        "unique_bytes": sum(nbytes(t) for t in tensors),  # DTensors: global sizes, replicas once
        "memcpy_all_s": [],
        "systems": {},
    }
    systems = {name: Checkpointer(name, model, opt, args) for name in args.systems}
    tasks = list(systems.items())
    try:
        for rep in range(args.reps + 1):  # rep 0 is the warm-up
            dist.barrier()
            result["memcpy_all_s"].append(memcpy_floor(mine, reps=2)["memcpy_s"])
            for name, ck in tasks[rep % len(tasks) :] + tasks[: rep % len(tasks)]:
                figures = one_save(ck, rep + 1, args.settle_s)
                runs = result["systems"].setdefault(name, [])
                runs.append(figures)
                log.info("[rank=%d] %s #%d: %s", rank, name, rep, figures)
    finally:
        for ck in systems.values():
            ck.close()
    result["memcpy_s"] = statistics.median(result["memcpy_all_s"])
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("ddp", "fsdp"), required=True)
    p.add_argument("--out", type=Path, required=True, help="rank-<r>.json and scratch/ go here")
    p.add_argument("--socket", type=Path, help="a running ckptd daemon (for the ckptd system)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--mb-per-rank", type=float, default=250.0)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--shard-size", default="32MB", help="ckptd's max_shard_size")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--settle-s", type=float, default=0.5)
    p.add_argument("--timeout-s", type=float, default=300.0, help="bounds every collective and wait")
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout_s))
    try:
        result = run(args)
        (args.out / f"rank-{dist.get_rank()}.json").write_text(json.dumps(result, indent=1))
        dist.barrier()  # before destroy_process_group, or gloo may abort
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
