"""Review of multi-rank (#11): defects found, each a test that failed before its fix.

- topology: a job of three nodes where two share a root and the third has its own was taken
  for node-local roots (every rank answered only "I do not see every daemon"), so the two
  nodes sharing a root each committed "their own copy" into one run directory.
- topology: a FIFO among the node files of a root hung ``Client.connect()`` (and every other
  rank in the next collective) in ``open()``.
- per-rank ``model`` component (non-contiguous DTensors): the HF Trainer integration linked its
  per-rank files under their ``model/`` subdirectory into ``checkpoint-N/``, which does not
  exist there: ``link_checkpoint`` raised ``FileNotFoundError`` from ``on_save``.

Collectives run for real: plain gloo processes (``init_process_group`` on a file store), a
real daemon where a snapshot is taken.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from ckptd import nodes

TESTS = Path(__file__).parent
REPO = TESTS.parent

_DISCOVER = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from client.errors import CheckpointError
    from client.ranks import Ranks
    from client.topology import discover

    rank, world, store, root, instance, out = sys.argv[1:7]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        topo = discover(Ranks(rank, world, "0123456789abcdef", dist.group.WORLD), f"host{instance}",
                        instance, root)
        result = {"daemons": topo.daemons, "shared_root": topo.shared_root}
    except CheckpointError as e:
        result = {"code": e.code, "error": str(e)}
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    """
)


def _holder(root: Path, node: str, instance: str) -> None:
    d = root / nodes.NODES_DIR
    d.mkdir(parents=True, exist_ok=True)
    record = {"node": node, "instance": instance, "pid": 1, "host": f"host{instance}"}
    (d / f"{node}.lock").write_text(json.dumps(record) + "\n")


def _run_ranks(workdir: Path, placement: list[tuple[Path, str]]) -> list[dict[str, object]]:
    """Run ``discover`` on one gloo process per (root, daemon instance); each rank's answer."""
    store = workdir / "store"
    procs = []
    for rank, (root, instance) in enumerate(placement):
        cmd = [sys.executable, "-c", _DISCOVER, str(rank), str(len(placement)), str(store), str(root)]
        cmd += [instance, str(workdir / f"out-{rank}.json")]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL))
    try:
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads((workdir / f"out-{r}.json").read_text()) for r in range(len(placement))]


def test_two_nodes_sharing_a_root_and_a_third_apart_are_refused(workdir: Path) -> None:
    shared, apart = workdir / "shared", workdir / "apart"
    _holder(shared, "a", "ia")
    _holder(shared, "b", "ib")
    _holder(apart, "c", "ic")
    answers = _run_ranks(workdir, [(shared, "ia"), (shared, "ib"), (apart, "ic")])
    for a in answers:  # refused on every rank, not taken for node-local roots
        assert a.get("code") == "multi_node", answers
        assert "share a checkpoint root and others do not" in str(a["error"]), a


def test_node_local_and_shared_roots_are_still_told_apart(workdir: Path) -> None:
    local0, local1, shared = workdir / "l0", workdir / "l1", workdir / "sh"
    _holder(local0, "a", "ia")
    _holder(local1, "b", "ib")
    _holder(local1, "old", "stale")  # a node file of a daemon gone: not this job's
    assert _run_ranks(workdir, [(local0, "ia"), (local1, "ib")]) == [{"daemons": 2, "shared_root": False}] * 2
    _holder(shared, "a", "ia")
    _holder(shared, "b", "ib")
    answers = _run_ranks(workdir, [(shared, "ia"), (shared, "ib")])
    assert answers == [{"daemons": 2, "shared_root": True}] * 2


def test_a_fifo_among_the_node_files_does_not_hang(workdir: Path) -> None:
    _holder(workdir, "a", "ia")
    os.mkfifo(workdir / nodes.NODES_DIR / "b.lock")
    os.symlink("/dev/zero", workdir / nodes.NODES_DIR / "c.lock")
    found: list[list[nodes.Holder]] = []
    t = threading.Thread(target=lambda: found.append(nodes.read_holders(workdir)), daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader before failing, so nothing is left behind
        fd = os.open(workdir / nodes.NODES_DIR / "b.lock", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(10)
        pytest.fail("read_holders hung on a FIFO among the node files")
    assert [h.node for h in found[0]] == ["a"]


_PER_RANK_SNAPSHOT = textwrap.dedent(
    """
    import sys
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from client import Client

    sock, store, rank = sys.argv[1:4]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=int(rank), world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    w = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)])
    with Client.connect(sock, autostart=False) as c:
        c.snapshot({"model": {"w": w, "b": torch.arange(6.0)}}, step=1, run="pr").wait(60)
    dist.destroy_process_group()
    """
)


def test_hf_outputs_link_a_per_rank_model_step(workdir: Path, start_daemon: Callable[..., object]) -> None:
    from ckptd.manifest import read_manifest
    from client.integrations.hf_outputs import fill_checkpoint, link_checkpoint

    d = start_daemon()
    root = workdir / "root"
    cmd = [sys.executable, "-c", _PER_RANK_SNAPSHOT, str(d.socket), str(workdir / "store")]  # type: ignore[attr-defined]
    procs = [subprocess.Popen([*cmd, str(r)], cwd=REPO, stdin=subprocess.DEVNULL) for r in range(2)]
    try:
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    step_dir = root / "pr" / "step-000001"
    manifest = read_manifest(step_dir)
    assert [c.sharding for c in manifest.components] == ["per-rank"], manifest.components
    out = workdir / "out"
    link = link_checkpoint(out, 1, step_dir, root, "pr")  # raised FileNotFoundError
    assert link is not None
    fill_checkpoint(link, step_dir)
    # No file of checkpoint-1 is a per-rank file a Hugging Face loader would take for weights,
    # and nothing points at a file that is not there.
    for p in link.rglob("*"):
        assert p.exists(), p
        assert "rank-" not in p.name, sorted(link.rglob("*"))
