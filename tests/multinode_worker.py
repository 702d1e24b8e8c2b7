"""One rank of a two-node ``torchrun`` job for tests/test_multinode.py: DDP (gloo, CPU) on the tiny
Qwen2 of tests/multirank_worker.py, each node's ranks talking to that node's daemon (SOCKET), both
daemons serving one shared root.

    python -m torch.distributed.run --nnodes 2 --node-rank N --nproc-per-node 1 \\
        --master-addr 127.0.0.1 --master-port P tests/multinode_worker.py MODE OUT SOCKET STEP

MODE:
- ``save``: snapshot STEP, wait, then restore the newest step into a model of other weights;
- ``kill-all``: snapshot STEP, a barrier (every snapshot() returned), then SIGKILL itself;
- ``kill-before``: rank 1 SIGKILLs itself right before its snapshot(); rank 0 snapshots and waits;
- ``kill-rank0``: rank 0 SIGKILLs itself as soon as its snapshot() returned; the others wait;
- ``wait``: snapshot STEP and wait (a fault is injected from outside: a daemon killed, a trainer
  stopped, ENOSPC);
- ``restart``: commit STEP, then snapshot STEP+1 and wait (its node 1 daemon is killed and started
  again meanwhile), a barrier, then wait for ``OUT/go`` and snapshot STEP+2.

Before each wait a rank writes ``OUT/snapshotted-<r>-<step>`` (its pid), after it
``OUT/rank-<r>[-<step>].json`` (what its handle said). A rank whose peer may be dead leaves with
``os._exit`` (no collective could complete). Every collective has a timeout.
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

import torch.distributed as dist
from multirank_worker import SHARD, build_state, reference
from safetensors.torch import save_file

from client import CheckpointError, Client

COMMIT_TIMEOUT_S = 4.0


def snapshot_and_wait(
    client: Client, state: dict[str, Any], out: Path, rank: int, step: int
) -> dict[str, Any]:
    state["step"] = step
    started = time.monotonic()
    result: dict[str, Any] = {"rank": rank, "step": step}
    try:
        handle = client.snapshot(state, step=step)
    except CheckpointError as e:
        result["error"], result["code"] = str(e), e.code
        return result
    (out / f"snapshotted-{rank}-{step}").write_text(str(os.getpid()))
    try:
        info = handle.wait(timeout=90)
        result["path"] = str(info.path) if info is not None else None
        result["bytes"] = info.bytes if info is not None else None
    except CheckpointError as e:
        result["error"], result["code"] = str(e), e.code
    result["waited_s"] = time.monotonic() - started
    return result


def main(mode: str, out: Path, socket_path: str, step: int) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    rank = dist.get_rank()
    state = build_state(seed=0, ddp=True)
    client = Client.connect(
        socket_path,
        autostart=False,
        run="ddp",
        max_shard_size=SHARD,
        commit_timeout_s=COMMIT_TIMEOUT_S,
        group_timeout_s=60.0,
    )
    dist.barrier()
    state["step"] = step
    if mode == "kill-all":
        client.snapshot(state, step=step)
        dist.barrier()  # every rank's snapshot() has returned
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "kill-before" and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "kill-rank0" and rank == 0:
        client.snapshot(state, step=step)
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "restart":
        results = [snapshot_and_wait(client, state, out, rank, step)]
        results.append(snapshot_and_wait(client, state, out, rank, step + 1))
        dist.barrier()  # both handles of step+1 resolved
        deadline = time.monotonic() + 60
        while not (out / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        results.append(snapshot_and_wait(client, state, out, rank, step + 2))
        (out / f"rank-{rank}.json").write_text(json.dumps(results))
        os._exit(0)
    result = snapshot_and_wait(client, state, out, rank, step)
    if mode == "save" and "error" not in result:
        save_file(reference(state), str(out / f"rank-{rank}.safetensors"))
        fresh = build_state(seed=1, ddp=True)
        result["restored"] = client.restore(fresh)
        save_file(reference(fresh), str(out / f"rank-{rank}-restored.safetensors"))
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    if mode != "save":
        os._exit(0)  # a peer may be dead or stopped: no collective can complete
    client.close()
    dist.barrier()  # before destroy_process_group, or gloo may abort (research B2)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
