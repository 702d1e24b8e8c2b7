"""One daemon per node and root: the per-node lock that lets several nodes share a root."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import DaemonProc
from torch import nn

import ckptd
from ckptd import nodes
from client import Client


def _serve(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptd", "serve", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _commit(client: Client, step: int) -> Path:
    torch.manual_seed(step)
    info = client.snapshot(nn.Linear(16, 8), step=step).wait(30)
    assert info is not None
    assert ckptd.verify(info.path) == []
    return info.path


def test_second_daemon_of_one_node_on_a_root_is_refused(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client], workdir: Path
) -> None:
    first = start_daemon("--node-id", "n0")
    done = _serve("--root", first.root, "--socket", workdir / "x.sock", "--node-id", "n0")
    assert done.returncode != 0
    assert "for node 'n0'" in done.stderr and "--node-id" in done.stderr, done.stderr
    assert first.proc.poll() is None
    _commit(connect(first), 1)


def test_daemons_of_two_nodes_share_a_root_and_say_who_holds_each_node(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    a = start_daemon("--node-id", "n0")
    b = start_daemon("--node-id", "n1", root=a.root)
    ca, cb = connect(a, run="a"), connect(b, run="b")
    assert _commit(ca, 1).parent.name == "a"
    assert _commit(cb, 1).parent.name == "b"
    held = {h.node: h for h in nodes.read_holders(a.root)}
    assert set(held) == {"n0", "n1"}
    assert held["n0"].pid == a.proc.pid and held["n1"].pid == b.proc.pid
    assert held["n0"].instance == ca._channel.welcome.instance  # type: ignore[union-attr]
    assert ca._channel.welcome.node == "n0"  # type: ignore[union-attr]
    raw = json.loads((a.root / nodes.NODES_DIR / "n1.lock").read_text())
    assert raw["instance"] == cb._channel.welcome.instance  # type: ignore[union-attr]


def test_node_id_that_cannot_name_a_file_is_refused(workdir: Path) -> None:
    done = _serve("--root", workdir / "r", "--socket", workdir / "s.sock", "--node-id", "../x")
    assert done.returncode == 2
    assert "node id '../x' is not usable" in done.stderr
    assert not (workdir / "r" / nodes.NODES_DIR).exists()


def test_default_node_id_is_the_host_name_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTD_NODE_ID", raising=False)
    assert nodes.default_node_id() == nodes.check_node_id(nodes.default_node_id())
    if socket.gethostname().replace("-", "").isalnum():
        assert nodes.default_node_id() == socket.gethostname()
    monkeypatch.setenv("CKPTD_NODE_ID", "rack7-node3")
    assert nodes.default_node_id() == "rack7-node3"
