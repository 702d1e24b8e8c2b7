"""Review of multi-rank (#11): defects found, each a test that failed before its fix.

- topology: a job of three nodes where two share a root and the third has its own was taken
  for node-local roots (every rank answered only "I do not see every daemon"), so the two
  nodes sharing a root each committed "their own copy" into one run directory.
- topology: a FIFO among the node files of a root hung ``Client.connect()`` (and every other
  rank in the next collective) in ``open()``.
- per-rank ``model`` component (non-contiguous DTensors): the HF Trainer integration linked its
  per-rank files under their ``model/`` subdirectory into ``checkpoint-N/``, which does not
  exist there: ``link_checkpoint`` raised ``FileNotFoundError`` from ``on_save``.
- per-rank: an empty ``Shard(1)`` DTensor ((0, 6) on 2 ranks) came back as (0, 3).
- node-local restore where one node holds none of the others' steps (a replaced node) said
  nothing of what to do.
- a daemon of an older ckptd (root-wide ``.ckptd.lock``) and a new one served one root together.
- a daemon of another node starting on a shared root keeps this node's in-flight step (the
  root-wide sweep removed it: its handle failed with ENOENT; the per-node sweep of ckptd/shared.py
  keeps it).

Collectives run for real: plain gloo processes (``init_process_group`` on a file store), a
real daemon where a snapshot is taken.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

from ckptd import nodes, paths

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
    e = distribute_tensor(torch.empty(0, 6), mesh, [Shard(1)])  # empty: its shape must survive
    u = distribute_tensor(torch.randn(5, 3), mesh, [Shard(1)])  # uneven: 2 columns and 1
    with Client.connect(sock, autostart=False) as c:
        c.snapshot({"model": {"w": w, "e": e, "u": u, "b": torch.arange(6.0)}}, step=1, run="pr").wait(60)
    full = {"w": w.full_tensor(), "e": e.full_tensor(), "u": u.full_tensor(), "b": torch.arange(6.0)}
    if int(rank) == 0:  # full_tensor() is a collective: every rank makes them
        from safetensors.torch import save_file
        save_file(full, sys.argv[4])
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def per_rank_step() -> Iterator[tuple[Path, Path]]:
    """(root, step directory) of a step of 2 gloo ranks whose ``model`` holds ``Shard(1)``
    DTensors (per-rank files), committed by a real daemon; the whole tensors in ``full.safetensors``."""
    d = Path(tempfile.mkdtemp(prefix="ckptd-"))
    root, sock = d / "root", d / "d.sock"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ckptd", "serve", "--root", str(root), "--socket", str(sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        from conftest import wait_for_socket

        wait_for_socket(sock, daemon)
        cmd = [sys.executable, "-c", _PER_RANK_SNAPSHOT, str(sock), str(d / "store")]
        procs = [
            subprocess.Popen([*cmd, str(r), str(d / "full.safetensors")], cwd=REPO, stdin=subprocess.DEVNULL)
            for r in range(2)
        ]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        yield root, root / "pr" / "step-000001"
    finally:
        for p in [*procs, daemon]:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(d, ignore_errors=True)


def test_hf_outputs_link_a_per_rank_model_step(per_rank_step: tuple[Path, Path], workdir: Path) -> None:
    from ckptd.manifest import read_manifest
    from client.integrations.hf_outputs import fill_checkpoint, link_checkpoint

    root, step_dir = per_rank_step
    manifest = read_manifest(step_dir)
    assert [c.sharding for c in manifest.components] == ["per-rank"], manifest.components
    assert manifest.format == "ckptd/3"  # an older reader refuses it rather than misread it
    out = workdir / "out"
    link = link_checkpoint(out, 1, step_dir, root, "pr")  # raised FileNotFoundError
    assert link is not None
    fill_checkpoint(link, step_dir)
    # No file of checkpoint-1 is a per-rank file a Hugging Face loader would take for weights,
    # and nothing points at a file that is not there.
    for p in link.rglob("*"):
        assert p.exists(), p
        assert "rank-" not in p.name, sorted(link.rglob("*"))


def test_a_daemon_of_another_node_starting_keeps_this_nodes_inflight_step(
    workdir: Path, start_daemon: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    import torch

    a = start_daemon("--node-id", "a", faults="slow:1.5")  # every pwrite sleeps: still writing below
    client = connect(a)
    handle = client.snapshot({"model": {"w": torch.arange(4096.0)}}, step=1, run="x")
    run_dir = workdir / "root" / "x"
    wait_until(
        lambda: run_dir.is_dir() and any(paths.TEMP_MARKER in p.name for p in run_dir.iterdir()),
        what="step 1's temp dir",
    )
    start_daemon("--node-id", "b")  # the other node's daemon (re)starts on the shared root
    handle.wait(60)  # snapshot() returned: the step must be committed
    assert (run_dir / "step-000001" / "model.safetensors").is_file()


def test_per_rank_empty_and_uneven_tensors_load_with_their_shapes(per_rank_step: tuple[Path, Path]) -> None:
    from safetensors.torch import load_file

    import ckptd

    _, step_dir = per_rank_step
    full = load_file(str(step_dir.parent.parent.parent / "full.safetensors"))
    loaded = ckptd.load(step_dir)["model"]
    for name, t in full.items():
        assert tuple(loaded[name].shape) == tuple(t.shape), (name, loaded[name].shape, t.shape)
        assert torch_equal(loaded[name], t), name
    import torch
    import torch.distributed.checkpoint as dcp

    got = {name: torch.zeros_like(t) for name, t in full.items()}  # torch's reader, too
    dcp.load(got, storage_reader=dcp.HuggingFaceStorageReader(str(step_dir / "model")), no_dist=True)
    for name, t in full.items():
        assert torch_equal(got[name], t), name


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(a.dtype == b.dtype and torch.equal(a, b))


_AGREE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch.distributed as dist
    from client.errors import CheckpointError
    from client.noderoots import NodeLocal, agree_restore
    from client.ranks import Ranks

    rank, store, run_dir, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    local = NodeLocal(rank, True, (0, 1), ("n0", "n1"), ((0,), (1,)))
    try:
        got = agree_restore(Ranks(rank, 2, "0123456789abcdef", dist.group.WORLD), local, run_dir,
                            lambda s: s, step=None, fallback=True)
        result = {"step": got}
    except CheckpointError as e:
        result = {"code": e.code, "error": str(e)}
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    """
)


def test_a_node_without_the_steps_of_the_others_is_told_what_to_do(workdir: Path) -> None:
    """A node replaced by a fresh one (node-local roots: its disk is empty) has none of the steps
    the other nodes hold: every rank fails alike, and the error says how to get a step back."""
    runs = [workdir / "n0" / "run", workdir / "n1" / "run"]
    (runs[0] / "step-000003").mkdir(parents=True)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _AGREE,
                str(r),
                str(workdir / "store"),
                str(runs[r]),
                str(workdir / f"o{r}"),
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
        )
        for r in range(2)
    ]
    try:
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    answers = [json.loads((workdir / f"o{r}").read_text()) for r in range(2)]
    for a in answers:
        assert a.get("code") == "not_found", answers
        assert "node n1 (ranks [1]) holds none of them" in a["error"], a
        assert "copy" in a["error"] and "step-000003" in a["error"], a


def test_a_daemon_of_an_older_version_on_the_root_is_not_served_alongside(workdir: Path) -> None:
    """An older ckptd daemon (one root, one daemon: it holds ``<root>/.ckptd.lock``) still
    serving a root, as a detached daemon does after an upgrade: a new one must not serve that
    root beside it (each would sweep the other's in-flight steps), nor the old one beside a new."""
    import fcntl

    root = workdir / "root"
    root.mkdir()
    fd = os.open(root / ".ckptd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the older daemon holds it
        cmd = [
            sys.executable,
            "-m",
            "ckptd",
            "serve",
            "--root",
            str(root),
            "--socket",
            str(workdir / "d.sock"),
        ]
        proc = subprocess.run(cmd, capture_output=True, timeout=20, stdin=subprocess.DEVNULL, check=False)
        assert proc.returncode != 0, proc.stderr.decode()
        assert "older ckptd" in proc.stderr.decode() and "stop it" in proc.stderr.decode(), proc.stderr
    finally:
        os.close(fd)
