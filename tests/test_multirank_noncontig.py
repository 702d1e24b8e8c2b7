"""Non-contiguous DTensor placements under real ``torchrun`` (gloo, CPU), one daemon.

A component holding a DTensor whose local shard is not a contiguous byte range of the full tensor
(``Shard(1)``, a 2-D mesh, HSDP's ``(Replicate(), Shard(0))``) is stored as per-rank safetensors
files whose headers carry ``DCP_SHARDING_INFO`` (``<component>/rank-0000r.safetensors``, a
directory of their own); a component of ``Shard(0)`` DTensors on a 1-D mesh is still written
straight into consolidated files, in the same step. One job of 2 ranks saves (module fixture);
the step restores bit-exact into 1, 2 and 4 ranks (the next optimizer step equal to the
uninterrupted run's), ``ckptd.load`` gives whole tensors, ``dcp.load`` with torch's
``HuggingFaceStorageReader`` reads the per-rank directory, and ``ckptd export`` writes a
consolidated copy that ``from_pretrained`` loads.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_multirank_fsdp import results
from test_multirank_fsdp import run_worker as run_fsdp_worker

import ckptd
from ckptd.manifest import read_manifest
from ckptd.ranks import PARTS_DIR, PartManifest, part_filename

TESTS = Path(__file__).parent
WORKER = TESTS / "multirank_noncontig_worker.py"
STEP_DIR = "noncontig/step-000001"


@dataclass
class Job:
    root: Path
    sock: Path
    out: Path
    saved: list[dict[str, Any]]

    @property
    def step_dir(self) -> Path:
        return self.root / STEP_DIR

    def full(self, name: str = "full") -> dict[str, torch.Tensor]:
        return load_file(str(self.out / f"{name}.safetensors"))


def run_worker(world: int, mode: str, out: Path, sock: Path) -> str:
    return run_fsdp_worker(world, mode, out, sock, worker=WORKER, timeout_s=240)


@pytest.fixture(scope="module")
def job() -> Iterator[Job]:
    """One daemon, and one job of 2 ranks that saved step 1."""
    d = Path(tempfile.mkdtemp(prefix="ckptd-"))
    root, sock, out = d / "root", d / "d.sock", d / "out"
    out.mkdir()
    log = open(d / "d.log", "wb")  # noqa: SIM115 - closed below, after the daemon
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ckptd", "serve", "--root", str(root), "--socket", str(sock)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        from conftest import wait_for_socket

        wait_for_socket(sock, daemon)
        run_worker(2, "save", out, sock)
        yield Job(root, sock, out, results(out, "save", 2))
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)
        log.close()
        (d / "d.log").exists() and print((d / "d.log").read_text(errors="replace")[-3000:])
        shutil.rmtree(d, ignore_errors=True)


def test_each_component_takes_its_path(job: Job, record_property: Callable[[str, object], None]) -> None:
    """The manifest says which path each component took; per-rank files hold each block once."""
    assert all(r["path"] == str(job.step_dir) for r in job.saved), job.saved
    manifest = read_manifest(job.step_dir)
    assert manifest.format == "ckptd/3"
    paths = {c.name: c.sharding for c in manifest.components}
    assert paths == {"model": "per-rank", "aux": "consolidated", "grid": "per-rank", "optimizer": "per-rank"}
    line = ", ".join(f"{k}: {v}" for k, v in paths.items())
    print(f"paths taken: {line}")
    record_property("paths", line)
    files = {c.name: [s.file for s in c.shards] for c in manifest.components}
    assert files["model"] == ["model/rank-00000.safetensors", "model/rank-00001.safetensors"]
    assert files["aux"] == ["aux/aux.safetensors"]
    # No Hugging Face loader takes the per-rank files for the model: nothing at the top.
    assert not list(job.step_dir.glob("*.safetensors*")), sorted(p.name for p in job.step_dir.iterdir())
    assert sorted(p.name for p in (job.step_dir / "model").iterdir()) == [
        "rank-00000.safetensors",
        "rank-00001.safetensors",
    ]
    full = job.full()
    # Each header carries DCP_SHARDING_INFO: every tensor's saved_offsets, its local block.
    seen: dict[str, list[tuple[list[int], list[int]]]] = {}
    for c in manifest.components:
        if c.sharding != "per-rank":
            continue
        for s in c.shards:
            with safe_open(str(job.step_dir / s.file), framework="pt") as f:
                info = json.loads(f.metadata()["DCP_SHARDING_INFO"])
                keys = list(f.keys())
                assert sorted(info) == sorted(keys)
                for key in keys:
                    block = f.get_tensor(key)
                    off = info[key]["saved_offsets"]
                    seen.setdefault(f"{c.name}.{key}", []).append((off, list(block.shape)))
                    whole = full[f"{c.name}.{key}"] if c.name != "optimizer" else None
                    if whole is not None:
                        box = whole[tuple(slice(o, o + n) for o, n in zip(off, block.shape, strict=True))]
                        assert torch.equal(block, box), key
    # Shard(1) on 2 ranks: two column blocks; HSDP's replicas: one block, written once.
    embed = sorted(seen["model.model.embed_tokens.weight"])
    assert embed == [([0, 0], [67, 8]), ([0, 8], [67, 8])], embed
    assert seen["grid.hsdp"] == [([0, 0], [6, 4])], seen["grid.hsdp"]
    assert len(seen["grid.tiles"]) == 2
    # Every byte written once: the parts add up to the unique bytes of the state.
    parts = [
        PartManifest.model_validate_json((job.step_dir / PARTS_DIR / part_filename(r)).read_bytes())
        for r in range(2)
    ]
    unique = sum(t.numel() * t.element_size() for t in full.values())
    assert sum(p.bytes for p in parts) == unique == job.saved[0]["bytes"]
    assert ckptd.verify(job.step_dir) == []


def test_load_gives_whole_tensors(job: Job) -> None:
    full, loaded = job.full(), ckptd.load(job.step_dir)
    assert loaded["step"] == 1
    for key in ("model", "aux", "grid"):
        for name, t in loaded[key].items():
            assert torch.equal(t, full[f"{key}.{name}"]), (key, name)
    for key, t in full.items():
        if key.startswith("optimizer."):
            fqn, _, what = key[len("optimizer.") :].rpartition(".")
            assert torch.equal(loaded["optimizer"]["state"][fqn][what], t), key


@pytest.mark.parametrize("world", [1, 2, 4])
def test_restore_at_any_world_size(job: Job, world: int) -> None:
    """Into a fresh model + AdamW of ``world`` ranks (1: plain, one process; 4: a 2 x 2 mesh):
    bit-exact, the next optimizer step equal to the uninterrupted run's; with 2 and 4 ranks,
    ``dcp.load`` with ``HuggingFaceStorageReader`` on the model's per-rank directory too."""
    run_worker(0 if world == 1 else world, "restore", job.out, job.sock)
    got = results(job.out, "restore", world)
    assert all(r["restored"] == 1 for r in got), got
    if world == 4:
        assert "Replicate(), Shard(dim=0)" in got[0]["placements"]["hsdp"], got[0]
    for name in ("restored", "next"):
        want, have = job.full("full" if name == "restored" else "next"), job.full(f"{name}-{world}")
        assert sorted(have) == sorted(want)
        for key, t in want.items():
            assert torch.equal(have[key], t), (name, key)
    if world > 1:
        full, dcp = job.full(), job.full(f"dcp-{world}")
        assert dcp and all(torch.equal(t, full[k]) for k, t in dcp.items())


def test_export_is_a_consolidated_pretrained_copy(job: Job, tmp_path: Path) -> None:
    from transformers import Qwen2ForCausalLM

    out = tmp_path / "exported"
    done = subprocess.run(
        [sys.executable, "-m", "ckptd", "export", str(job.step_dir), str(out)],
        check=False,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    model = Qwen2ForCausalLM.from_pretrained(out)
    full = job.full()
    state = model.state_dict()
    assert state
    for name, t in state.items():
        assert torch.equal(t, full[f"model.{name}"]), name
    assert load_file(str(out / "model.safetensors")).keys() == {
        k[len("model.") :] for k in full if k.startswith("model.")
    }


def test_partial_placement_is_refused(job: Job) -> None:
    for r in job.saved:
        message = r["refused"]
        assert "Partial" in message and "redistribute" in message, message


def _block_file(path: Path, blocks: dict[str, tuple[torch.Tensor, list[int]]]) -> None:
    from safetensors.torch import save_file

    info = {k: {"saved_offsets": off} for k, (_, off) in blocks.items()}
    save_file(
        {k: t for k, (t, _) in blocks.items()}, str(path), metadata={"DCP_SHARDING_INFO": json.dumps(info)}
    )


def test_blocks_that_overlap_or_leave_a_gap_are_named(workdir: Path) -> None:
    """A per-rank component whose blocks do not tile their tensor once is a damaged step."""
    from ckptd import perrank
    from ckptd.manifest import ComponentRecord, CorruptCheckpoint, FileRecord

    a, b = torch.arange(12.0).reshape(3, 4), torch.arange(12.0, 24.0).reshape(3, 4)
    _block_file(workdir / "r0.safetensors", {"w": (a, [0, 0])})
    comp = ComponentRecord(
        name="m",
        shards=[FileRecord(file=f"r{i}.safetensors", bytes=0, xxh3_128="") for i in range(2)],
        tensors=2,
        total_size=96,
        sharding="per-rank",
    )
    _block_file(workdir / "r1.safetensors", {"w": (b, [0, 4])})
    whole = perrank.assemble(workdir, comp, verify=False)["w"]
    assert torch.equal(whole, torch.cat([a, b], dim=1))
    assert torch.equal(perrank.read_box(perrank.blocks(workdir, comp)["w"], (1, 3), (2, 2)), whole[1:3, 3:5])
    _block_file(workdir / "r1.safetensors", {"w": (b, [0, 5])})  # column 4 missing
    with pytest.raises(CorruptCheckpoint, match="do not cover"):
        perrank.blocks(workdir, comp)
    # As many elements as the whole, but two blocks overlap (and leave a gap).
    _block_file(workdir / "r0.safetensors", {"v": (torch.ones(2), [0])})
    _block_file(workdir / "r1.safetensors", {"v": (torch.ones(2), [1])})
    _block_file(workdir / "r2.safetensors", {"v": (torch.ones(1), [4])})
    three = comp.model_copy(
        update={"shards": [*comp.shards, comp.shards[0].model_copy(update={"file": "r2.safetensors"})]}
    )
    with pytest.raises(CorruptCheckpoint, match="overlap"):
        perrank.blocks(workdir, three)


def test_daemon_refuses_a_malformed_per_rank_layout() -> None:
    from ckptd.daemon.layouts import prepare
    from ckptd.daemon.rows import ComponentRows, ShardRows
    from ckptd.daemon.validate import InvalidRequest

    def comp(*shards: ShardRows) -> ComponentRows:
        return ComponentRows("m", list(shards), {})

    ok = ShardRows(0, 16, [("w", "F32", (2, 2), 0, 16)], 0, [(0, 0)])
    layout = prepare([comp(ok, ok._replace(offset=4096, rank=1, offsets=[(0, 2)]))])
    assert layout.components[0].files.shard(1) == "m/rank-00001.safetensors"
    assert layout.components[0].files.index is None
    assert b'"DCP_SHARDING_INFO":"{\\"w\\":{\\"saved_offsets\\":[0,2]}}"' in layout.headers[0][1]
    with pytest.raises(InvalidRequest, match="each once"):
        prepare([comp(ok, ok._replace(offset=4096))])  # rank 0 twice
    with pytest.raises(InvalidRequest, match="has offset"):
        prepare([comp(ok._replace(offsets=[(0,)]))])  # one index for two dimensions
    with pytest.raises(InvalidRequest, match="names a rank"):
        prepare([comp(ok._replace(rank=None, offsets=None), ok._replace(offset=4096))])
