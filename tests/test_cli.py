"""The ``ckptd`` command as a user runs it: ``ls``, ``verify`` and ``status``, as real subprocesses
against checkpoints written by a real daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import DaemonProc
from torch import nn

import ckptd
from ckptd.manifest import ManifestError, read_manifest
from ckptd.sizes import format_size
from client import Client


def run_cli(*args: str | Path, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """``ckptd ARGS...`` in a subprocess, as a user would type it."""
    return subprocess.run(
        [sys.executable, "-m", "ckptd", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))


def commit_step(client: Client, step: int, model: nn.Module | None = None) -> Path:
    info = client.snapshot(model or small_model(step), step=step).wait(30)
    assert info is not None
    return info.path


def output(done: subprocess.CompletedProcess[str]) -> str:
    return done.stdout + done.stderr


# --- ckptd ls ------------------------------------------------------------------------------------


def _ls_line(text: str, run: str, step: int) -> str:
    lines = [ln for ln in text.splitlines() if ln.split()[:2] == [run, str(step)]]
    assert len(lines) == 1, f"expected one row for {run} step {step} in:\n{text}"
    return lines[0]


def test_ls_shows_runs_steps_sizes_and_latest(daemon: DaemonProc, client: Client) -> None:
    paths = {step: commit_step(client, step) for step in (1, 2, 3)}
    other = client.snapshot(small_model(7), step=10, run="other").wait(30)
    assert other is not None

    done = run_cli("ls", daemon.root)
    assert done.returncode == 0, output(done)
    for step, path in paths.items():
        line = _ls_line(done.stdout, "default", step)
        assert format_size(read_manifest(path).bytes) in line
        assert "model" in line
        assert ("LATEST" in line) == (step == 3), line
    assert "LATEST" in _ls_line(done.stdout, "other", 10)


def test_ls_json_lists_steps(daemon: DaemonProc, client: Client) -> None:
    paths = {step: commit_step(client, step) for step in (1, 2)}

    done = run_cli("ls", daemon.root, "--json")
    assert done.returncode == 0, output(done)
    rows = json.loads(done.stdout)
    assert [(r["run"], r["step"]) for r in rows] == [("default", 1), ("default", 2)]
    for r in rows:
        assert Path(r["path"]) == paths[r["step"]]
        assert r["bytes"] == read_manifest(paths[r["step"]]).bytes > 0
        assert r["components"] == ["model"]
        assert r["latest"] is (r["step"] == 2)
        assert "error" not in r


def test_step_dir_without_manifest_is_not_a_checkpoint(daemon: DaemonProc, client: Client) -> None:
    good = commit_step(client, 3)
    bogus = daemon.root / "default" / "step-000009"
    bogus.mkdir()
    (bogus / "model.safetensors").write_bytes(b"not a checkpoint")

    done = run_cli("ls", daemon.root)
    assert done.returncode == 0, output(done)
    line = _ls_line(done.stdout, "default", 9)
    assert "NOT A CHECKPOINT" in line
    assert "LATEST" in _ls_line(done.stdout, "default", 3)

    rows = {r["step"]: r for r in json.loads(run_cli("ls", daemon.root, "--json").stdout)}
    assert set(rows) == {3, 9}
    assert rows[9]["latest"] is False
    assert "ckptd.json" in rows[9]["error"]
    assert rows[3]["latest"] is True

    # Never the newest checkpoint, even though its step is higher ...
    assert ckptd.latest(daemon.root, "default") == good
    # ... and even if LATEST names it.
    (daemon.root / "default" / "LATEST").write_text("step-000009\n")
    assert ckptd.latest(daemon.root, "default") == good
    assert ckptd.verify(bogus) != []


def test_ls_empty_and_missing_root(workdir: Path) -> None:
    empty = workdir / "empty"
    empty.mkdir()
    done = run_cli("ls", empty)
    assert done.returncode == 0, output(done)
    assert "no checkpoints" in done.stdout
    assert json.loads(run_cli("ls", empty, "--json").stdout) == []

    done = run_cli("ls", workdir / "missing")
    assert done.returncode != 0
    assert "not a directory" in done.stderr


# --- ckptd verify --------------------------------------------------------------------------------


def test_verify_good_checkpoint(daemon: DaemonProc, client: Client) -> None:
    path = commit_step(client, 4)
    for target in (path, path.parent):  # a step directory, or a run directory (its newest step)
        done = run_cli("verify", target)
        assert done.returncode == 0, output(done)
        assert "OK" in done.stdout
        assert str(path) in done.stdout


def test_verify_nothing_there(workdir: Path) -> None:
    done = run_cli("verify", workdir)
    assert done.returncode != 0
    assert "no committed ckptd checkpoint" in done.stderr


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # in the data section: shards put data after a 4096-byte-aligned header
    path.write_bytes(bytes(data))


def _corrupt(step_dir: Path, how: str) -> tuple[str, str]:
    """Damage a committed checkpoint; return (the file that verify must name, a word of the reason)."""
    manifest = read_manifest(step_dir)
    shard = step_dir / manifest.components[0].shards[0].file
    if how == "flip":
        assert shard.stat().st_size > 4096
        _flip_last_byte(shard)
        return shard.name, "checksum"
    if how == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 100)
        return shard.name, "truncated"
    if how == "delete":
        shard.unlink()
        return shard.name, "cannot read"
    if how == "index":
        index = step_dir / manifest.components[0].index
        doc = json.loads(index.read_text())
        doc["metadata"]["total_size"] += 1
        index.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return index.name, "checksum"
    if how == "manifest":
        mpath = step_dir / "ckptd.json"
        doc = json.loads(mpath.read_text())
        doc["step"] += 1
        mpath.write_text(json.dumps(doc, indent=1) + "\n")
        return "ckptd.json", "checksum"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["flip", "truncate", "delete", "index", "manifest"])
def test_verify_and_load_detect_corruption(
    daemon: DaemonProc, connect: Callable[..., Client], how: str
) -> None:
    client = connect(daemon, max_shard_size="10KB")  # several shards: Linear(64, 64) is 16 KiB
    path = commit_step(client, 5)
    assert len(read_manifest(path).components[0].shards) > 1
    assert ckptd.verify(path) == []
    assert ckptd.load(path)["model"]

    file, reason = _corrupt(path, how)

    done = run_cli("verify", path)
    assert done.returncode != 0, output(done)
    assert "OK" not in done.stdout
    assert file in done.stdout, done.stdout
    assert reason in done.stdout.lower(), done.stdout
    problems = ckptd.verify(path)
    assert problems and any(file in p for p in problems)

    # Never handed back as if it were good.
    with pytest.raises((ckptd.CorruptCheckpoint, ManifestError)):
        ckptd.load(path)


# --- ckptd status --------------------------------------------------------------------------------


def test_status_text(daemon: DaemonProc) -> None:
    done = run_cli("status", "--socket", daemon.socket)
    assert done.returncode == 0, output(done)
    assert f"pid {daemon.proc.pid}" in done.stdout
    assert str(daemon.root) in done.stdout
    assert "committed 0" in done.stdout


def test_status_json_counts_commits(daemon: DaemonProc, client: Client) -> None:
    before = json.loads(run_cli("status", "--socket", daemon.socket, "--json").stdout)
    assert before["pid"] == daemon.proc.pid
    assert Path(before["root"]) == daemon.root
    assert before["committed"] == 0
    assert before["clients"] == 1  # our client (the status command is not counted)

    commit_step(client, 1)
    commit_step(client, 2)

    after = json.loads(run_cli("status", "--socket", daemon.socket, "--json").stdout)
    assert after["committed"] == 2
    assert after["failed"] == 0
    assert after["bytes_written"] > 0
    assert after["jobs"] == []


def test_status_without_daemon(workdir: Path) -> None:
    sock = workdir / "nobody.sock"
    done = run_cli("status", "--socket", sock)
    assert done.returncode != 0
    assert "no daemon answers" in done.stderr
    assert str(sock) in done.stderr


# --- retention -----------------------------------------------------------------------------------


def test_keep_last_keeps_newest_steps(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon("--keep-last", "2")
    client = connect(d)
    for step in range(1, 6):
        commit_step(client, step)

    run_dir = d.root / "default"
    assert sorted(p.name for p in run_dir.iterdir()) == ["LATEST", "step-000004", "step-000005"]
    assert (run_dir / "LATEST").read_text().strip() == "step-000005"
    assert ckptd.latest(d.root) == run_dir / "step-000005"
    for step in (4, 5):
        assert ckptd.verify(run_dir / f"step-{step:06d}") == []
    rows = json.loads(run_cli("ls", d.root, "--json").stdout)
    assert [r["step"] for r in rows] == [4, 5]
