"""The operator's commands (issue 12, items 11 and 12), run as a user runs them: the installed
``ckptd`` script of the venv, as a real subprocess, against real daemons (some with injected
write delays) and the checkpoints they commit."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import DaemonProc
from torch import nn

import ckptd
from ckptd.manifest import read_manifest
from client import Client

CKPTD = Path(sys.executable).parent / "ckptd"
#: One tensor of 24 MiB: one shard, written in six 4 MiB chunks.
BIG_ELEMENTS = 6 * 2**20


def run_cli(
    *args: str | Path, timeout_s: float = 60, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``ckptd ARGS...`` as a user types it (the venv's console script)."""
    return subprocess.run(
        [str(CKPTD), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def output(done: subprocess.CompletedProcess[str]) -> str:
    return done.stdout + done.stderr


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))


def commit_steps(client: Client, steps: range | list[int], run: str = "default") -> dict[int, Path]:
    out = {}
    for step in steps:
        info = client.snapshot(small_model(step), step=step, run=run).wait(30)
        assert info is not None
        out[step] = info.path
    return out


def big_tree() -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    return {"model": {"w": torch.randn(BIG_ELEMENTS)}}


def wait_exit(d: DaemonProc, timeout_s: float = 10) -> int:
    return d.proc.wait(timeout_s)


# --- ckptd --version -----------------------------------------------------------------------------


def test_version_is_the_package_version() -> None:
    done = run_cli("--version")
    assert done.returncode == 0, output(done)
    assert done.stdout.strip() == f"ckptd {importlib.metadata.version('ckptd')}"


# --- ckptd stop ----------------------------------------------------------------------------------


def test_stop_drains_then_exits(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon(faults="slow:0.3")  # a 24 MiB shard takes ~2 s
    client = connect(d)
    tree = big_tree()
    handle = client.snapshot(tree, step=1)
    # Found by the client's socket default ($CKPTD_SOCKET), as the client finds it.
    done = run_cli("stop", env={"CKPTD_SOCKET": str(d.socket)})
    assert done.returncode == 0, output(done)
    assert "draining 1 snapshot" in done.stdout
    assert "stopped" in done.stdout
    assert wait_exit(d) == 0  # gone (or about to be) once stop returned
    assert not d.socket.exists()
    info = handle.wait(10)  # the in-flight snapshot was drained, not dropped
    assert info is not None
    assert torch.equal(ckptd.load(info.path)["model"]["w"], tree["model"]["w"])


def test_stop_now_exits_without_draining(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon(faults="slow:2")  # the snapshot would take 12 s and more
    client = connect(d)
    handle = client.snapshot(big_tree(), step=1)
    t0 = time.monotonic()
    done = run_cli("stop", "--now", "--socket", d.socket)
    assert done.returncode == 0, output(done)
    assert time.monotonic() - t0 < 8
    assert "exiting now" in done.stdout
    wait_exit(d)
    with pytest.raises(Exception, match=r"(?i)daemon|connection|closed"):
        handle.wait(15)
    assert ckptd.latest(d.root) is None  # nothing committed; its temp directory is swept later
    d2 = start_daemon(root=d.root)
    assert not [p for p in (d.root / "default").iterdir() if ".ckptd-tmp-" in p.name]
    d2.stop()


def test_stop_times_out_with_a_clear_message(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon(faults="hang-write:1")
    client = connect(d)
    client.snapshot(small_model(), step=1)
    time.sleep(0.5)
    done = run_cli("stop", "--socket", d.socket, "--timeout", "2")
    assert done.returncode == 1, output(done)
    assert f"pid {d.proc.pid}" in done.stderr
    assert "still running after 2 s" in done.stderr
    assert "SIGTERM once more" in done.stderr
    assert d.proc.poll() is None  # still draining: the fixture kills it


def test_stop_without_a_daemon(workdir: Path) -> None:
    done = run_cli("stop", "--socket", workdir / "none.sock")
    assert done.returncode == 1
    assert f"no daemon answers on {workdir / 'none.sock'}" in done.stderr


# --- ckptd prune / rm ----------------------------------------------------------------------------


def _steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step-"))


def test_prune_keeps_the_newest_and_latest(daemon: DaemonProc, client: Client) -> None:
    paths = commit_steps(client, range(1, 6))
    run_dir = daemon.root / "default"
    being_written = run_dir / "step-000009.ckptd-tmp-abcd"  # a write in progress is never touched
    being_written.mkdir()
    (run_dir / "LATEST").write_text("step-000002\n")  # LATEST lagging behind (its move failed)

    done = run_cli("prune", run_dir, "--keep-last", "2")
    assert done.returncode == 0, output(done)
    assert _steps(run_dir) == ["step-000002", "step-000004", "step-000005", being_written.name]
    assert "2 step(s) removed" in done.stdout
    for step in (2, 4, 5):
        assert ckptd.verify(paths[step]) == []

    (run_dir / "LATEST").write_text("step-000005\n")
    done = run_cli("prune", run_dir, "--keep-last", "1")
    assert done.returncode == 0, output(done)
    assert _steps(run_dir) == ["step-000005", being_written.name]

    done = run_cli("prune", run_dir, "--keep-last", "0")
    assert done.returncode == 2
    assert "at least 1" in done.stderr


def test_rm_removes_committed_steps_only(daemon: DaemonProc, client: Client) -> None:
    paths = commit_steps(client, range(1, 4))
    run_dir = daemon.root / "default"

    done = run_cli("rm", paths[1])
    assert done.returncode == 0, output(done)
    assert _steps(run_dir) == ["step-000002", "step-000003"]
    assert not [p for p in run_dir.iterdir() if ".ckptd-tmp-" in p.name]  # nothing half-deleted left

    done = run_cli("rm", paths[3])  # LATEST's step: only when told
    assert done.returncode == 2
    assert "LATEST" in done.stderr and "--latest-too" in done.stderr
    assert paths[3].is_dir()

    being_written = run_dir / "step-000007.ckptd-tmp-abcd"
    being_written.mkdir()
    done = run_cli("rm", being_written)
    assert done.returncode == 2
    assert "being written" in done.stderr
    assert being_written.is_dir()

    no_manifest = run_dir / "step-000008"
    no_manifest.mkdir()
    (no_manifest / "model.safetensors").write_bytes(b"not ours")
    done = run_cli("rm", no_manifest)
    assert done.returncode == 2
    assert "not a committed checkpoint" in done.stderr
    assert no_manifest.is_dir()

    link = run_dir / "step-000010"
    link.symlink_to(paths[2])
    done = run_cli("rm", link)
    assert done.returncode == 2
    assert paths[2].is_dir()
    link.unlink()
    shutil.rmtree(no_manifest)

    done = run_cli("rm", paths[3], "--latest-too")
    assert done.returncode == 0, output(done)
    assert _steps(run_dir) == ["step-000002", being_written.name]
    assert (run_dir / "LATEST").read_text().strip() == "step-000002"
    assert ckptd.latest(daemon.root) == paths[2]


# --- ckptd export --------------------------------------------------------------------------------


def _hf_model() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=300)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("max_shard", ["5GB", "40KB"])
def test_export_loads_with_from_pretrained(
    max_shard: str, start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client], workdir: Path
) -> None:
    import transformers

    model = _hf_model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    optimizer.step()
    d = start_daemon("--max-shard-size", max_shard)
    info = connect(d).snapshot({"model": model, "optimizer": optimizer}, step=3).wait(30)
    assert info is not None
    shards = next(c for c in read_manifest(info.path).components if c.name == "model").shards

    out = workdir / "exported"
    done = run_cli("export", info.path, out)
    assert done.returncode == 0, output(done)
    names = sorted(p.name for p in out.iterdir())
    if len(shards) == 1:
        assert names == ["config.json", "generation_config.json", "model.safetensors"]
    else:
        n = len(shards)
        expected = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        assert names == sorted(
            ["config.json", "generation_config.json", "model.safetensors.index.json", *expected]
        )
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(expected)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied

    done = run_cli("export", info.path, out)  # never over an existing model
    assert done.returncode == 2
    assert "not an empty directory" in done.stderr


def test_export_refuses_corrupt_or_model_less_steps(
    daemon: DaemonProc, client: Client, workdir: Path
) -> None:
    info = client.snapshot({"optimizer": {"w": torch.ones(4)}}, step=1).wait(30)
    assert info is not None
    done = run_cli("export", info.path, workdir / "out1")
    assert done.returncode == 2
    assert "no 'model' component" in done.stderr
    assert not (workdir / "out1").exists()

    path = commit_steps(client, [2])[2]
    shard = path / read_manifest(path).components[0].shards[0].file
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    done = run_cli("export", path, workdir / "out2")
    assert done.returncode == 1
    assert "checksum" in done.stderr
    assert not (workdir / "out2").exists()
    assert not [p for p in workdir.iterdir() if "ckptd-export" in p.name]


# --- ckptd ls / verify ---------------------------------------------------------------------------


def test_ls_defaults_to_ckptd_root_then_checkpoints(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client], workdir: Path
) -> None:
    d = start_daemon(root=workdir / "checkpoints")
    commit_steps(connect(d), [4])
    done = run_cli("ls", cwd=workdir)  # ./checkpoints, as the client and `ckptd serve`
    assert done.returncode == 0, output(done)
    assert re.search(r"default\s+4\s", done.stdout)
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    done = run_cli("ls", cwd=elsewhere, env={"CKPTD_ROOT": str(workdir / "checkpoints")})
    assert done.returncode == 0, output(done)
    assert re.search(r"default\s+4\s", done.stdout)


def test_ls_shows_latest_that_does_not_verify(daemon: DaemonProc, client: Client) -> None:
    paths = commit_steps(client, [1, 2])
    shard = paths[2] / read_manifest(paths[2]).components[0].shards[0].file
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))

    done = run_cli("ls", daemon.root, "--verify")
    assert done.returncode == 0, output(done)
    line = next(ln for ln in done.stdout.splitlines() if re.match(r"default\s+2\s", ln))
    assert "LATEST DOES NOT VERIFY" in line and "checksum mismatch" in line
    rows = json.loads(run_cli("ls", daemon.root, "--json", "--verify").stdout)
    assert next(r["problems"] for r in rows if r["step"] == 2)
    # By default nothing is hashed (a flipped bit is not seen) but a truncated file is.
    assert "LATEST DOES NOT VERIFY" not in run_cli("ls", daemon.root).stdout
    shard.write_bytes(bytes(data[:-1]))
    line = next(ln for ln in run_cli("ls", daemon.root).stdout.splitlines() if re.match(r"default\s+2\s", ln))
    assert "LATEST DOES NOT VERIFY" in line and "manifest says" in line


def test_ls_into_head_prints_no_traceback(workdir: Path) -> None:
    run_dir = workdir / "root" / "default"
    for i in range(3000):  # far more than a pipe holds
        (run_dir / f"step-{i:06d}").mkdir(parents=True)
    done = subprocess.run(
        [
            "bash",
            "-c",
            f"set -o pipefail; '{CKPTD}' ls '{workdir / 'root'}' 2>'{workdir / 'err'}' | head -n 2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert len(done.stdout.splitlines()) == 2
    err = (workdir / "err").read_text()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert done.returncode == 0, err


def test_verify_root_checks_every_run(daemon: DaemonProc, client: Client) -> None:
    a = commit_steps(client, [1, 2], run="a")
    b = commit_steps(client, [5], run="b")
    done = run_cli("verify", daemon.root)
    assert done.returncode == 0, output(done)
    assert f"OK {a[2]}" in done.stdout and f"OK {b[5]}" in done.stdout
    assert "2 of 2 steps verify" in done.stdout

    shard = b[5] / read_manifest(b[5]).components[0].shards[0].file
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    done = run_cli("verify", daemon.root)
    assert done.returncode == 1
    assert f"OK {a[2]}" in done.stdout
    assert "FAIL" in done.stdout and str(shard) in done.stdout
    assert "1 of 2 steps verify" in done.stdout
    done = run_cli("verify", daemon.root, "--all")
    assert "2 of 3 steps verify" in done.stdout
    assert run_cli("verify", daemon.root / "a").returncode == 0  # a run: its newest step
    assert run_cli("verify", b[5]).returncode == 1  # a step: that step


# --- ckptd status --------------------------------------------------------------------------------


def test_status_does_not_count_itself(daemon: DaemonProc, client: Client) -> None:
    commit_steps(client, [1])
    reply = json.loads(run_cli("status", "--json", "--socket", daemon.socket).stdout)
    assert reply["clients"] == 1  # the trainer's client, not the status command


def _watch(d: DaemonProc, *args: str, seconds: float) -> str:
    """``ckptd status --watch`` into a pipe (not a terminal) for ``seconds``."""
    proc = subprocess.Popen(
        [str(CKPTD), "status", "--socket", str(d.socket), "--watch", "0.1", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        time.sleep(seconds)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    return out


def test_status_watch_shows_bytes_of_one_shard_as_written(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon(faults="slow:0.4")  # six 4 MiB chunks of one shard: ~2.4 s of writing
    client = connect(d)
    handle = client.snapshot(big_tree(), step=1)
    out = _watch(d, "--json", seconds=2.0)
    assert "\x1b" not in out  # no terminal control codes into a pipe
    decoder, pos, replies = json.JSONDecoder(), 0, []
    while (pos := out.find("{", pos)) >= 0:
        reply, pos = decoder.raw_decode(out, pos)
        replies.append(reply)
    assert replies
    assert all(r["clients"] == 1 for r in replies)
    written = [j["bytes_written"] for r in replies for j in r["jobs"] if j["stage"] == "writing"]
    total = BIG_ELEMENTS * 4
    partial = [w for w in written if 0 < w < total]
    assert partial, f"no partial progress of the one-shard snapshot seen: {written}"
    info = handle.wait(30)
    assert info is not None
    # Counted as whole chunks (header and data) reach the file, not before they are written.
    shard = info.path / read_manifest(info.path).components[0].shards[0].file
    data_start = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
    assert all((w + data_start) % (4 * 2**20) == 0 for w in partial), (partial, data_start)

    handle = client.snapshot(big_tree(), step=2)
    text = _watch(d, seconds=1.5)
    assert "\x1b" not in text
    percents = [float(p) for p in re.findall(r"writing\s+\[#*\s*\]\s+([\d.]+)%", text)]
    assert any(0 < p < 100 for p in percents), text
    assert handle.wait(30) is not None
