"""Streamed snapshots: the daemon writes the first shards while the client still copies the rest.

With ``stream=True``, a host snapshot larger than one copy batch (``client.plan.STREAM_BATCH_BYTES``)
is sent before it is copied; ``Staged`` frames move its copied watermark. What must hold: it commits only once
whole and loads bit-exact; a client that stops copying (fails, is killed, abandons, or goes
silent past ``--stage-timeout``) leaves nothing visible and the daemon serving.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import DaemonProc
from helpers import same_bits, step_dirs, wait_until
from safetensors.torch import load_file
from test_hostile import WEIGHT, registered, snapshot

import ckptd
from ckptd.protocol import Abandon, Accepted, Committed, Failed, Staged
from client import Client
from client import client as client_mod
from client.plan import STREAM_BATCH_BYTES

ELEMENTS = STREAM_BATCH_BYTES // 4 // 2  # fp32: a batch holds two such tensors


def big_state(seed: int, tensors: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {f"w{i}": torch.randn(ELEMENTS, generator=g) for i in range(tensors)}
    state["small"] = torch.randn(7, 3, generator=g)
    return state


def loaded(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for shard in sorted(path.glob("model*.safetensors")) for k, v in load_file(shard).items()}


def assert_same(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert sorted(want) == sorted(got)
    for k, v in want.items():
        assert same_bits(v, got[k]), k


def idle(c: Client) -> None:
    wait_until(lambda: c.status().jobs == [], timeout_s=60, what="the daemon to finish its jobs")


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".ckptd-tmp-" in p.name]


def test_a_large_snapshot_is_streamed_and_loads_bit_exact(
    daemon: DaemonProc, connect: Callable[..., Client]
) -> None:
    c = connect(daemon, max_shard_size="100MB", stream=True)  # shards written while later ones copy
    state = big_state(1)
    for step in (1, 2):  # the second reuses the first one's plan
        if step == 2:
            with torch.no_grad():
                for t in state.values():
                    t.mul_(-1)
        want = {k: v.clone() for k, v in state.items()}
        info = c.snapshot(state, step=step).wait(120)
        assert info is not None
        assert "staged_s" in info.timings, "the daemon saw the copy arrive in parts"
        plain = connect(daemon, run="plain", max_shard_size="100MB").snapshot(state, step=step).wait(120)
        assert plain is not None and "staged_s" not in plain.timings, "whole unless asked"
        assert info.timings["staged_s"] <= info.timings["committed_s"]
        assert len(list(info.path.glob("model*.safetensors"))) > 1
        assert_same(want, loaded(info.path))
        assert ckptd.verify(info.path) == []


def test_a_copy_that_fails_midway_commits_nothing_and_the_step_can_be_retried(
    daemon: DaemonProc, connect: Callable[..., Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = connect(daemon, stream=True)
    real_copy = client_mod.copy_host
    batches: list[int] = []

    def failing_copy(*args: object, **kwargs: object) -> None:
        batches.append(1)
        if len(batches) == 2:
            raise RuntimeError("injected: the copy failed halfway")
        real_copy(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(client_mod, "copy_host", failing_copy)
    state = big_state(2)
    with pytest.raises(RuntimeError, match="injected"):
        c.snapshot(state, step=5)
    monkeypatch.setattr(client_mod, "copy_host", real_copy)
    info = c.snapshot(state, step=5).wait(120)  # at once: the abandoned attempt only unwinds
    assert info is not None
    assert_same(state, loaded(info.path))
    idle(c)
    assert step_dirs(daemon.root / "default") == ["step-000005"]
    assert leftovers(daemon.root) == []
    assert "abandoned" in daemon.log_text()


TRAINER = textwrap.dedent(
    """
    import os, sys, torch
    from client import Client
    from client import client as client_mod
    from client.plan import STREAM_BATCH_BYTES

    real_copy, calls = client_mod.copy_host, []
    def dying_copy(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os._exit(3)  # the trainer dies with half its snapshot copied
        real_copy(*args, **kwargs)
    client_mod.copy_host = dying_copy
    c = Client.connect(sys.argv[1], autostart=False, stream=True)
    n = STREAM_BATCH_BYTES // 4 // 2
    c.snapshot({f"w{i}": torch.ones(n) for i in range(6)}, step=1)
    sys.exit("the snapshot returned")
    """
)


def test_a_trainer_killed_mid_copy_leaves_nothing_visible(
    daemon: DaemonProc, connect: Callable[..., Client]
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", TRAINER, str(daemon.socket)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    observer = connect(daemon)
    idle(observer)
    assert step_dirs(daemon.root / "default") == []
    assert leftovers(daemon.root) == []
    assert "disconnected before it finished copying" in daemon.log_text()
    info = observer.snapshot({"w": torch.arange(4.0)}, step=1).wait(30)  # the step is free again
    assert info is not None and ckptd.verify(info.path) == []


# --- the protocol, from a raw client ---------------------------------------------------------------


def test_the_daemon_writes_only_what_is_staged_and_commits_once_whole(daemon: DaemonProc) -> None:
    raw = registered(daemon)
    req = snapshot(id=1, step=1).model_copy(update={"ready": 0})
    raw.msg(req)
    assert isinstance(raw.recv(), Accepted)
    raw.msg(Staged(id=1, ready=512))  # half the tensor
    raw.sock.settimeout(1.0)
    with pytest.raises(TimeoutError):  # nothing is committed while part of it is not copied
        raw.until(lambda m: isinstance(m, Committed | Failed))
    raw.sock.settimeout(30)
    raw.msg(Staged(id=1, ready=100))  # a watermark never moves back
    raw.msg(Staged(id=1, ready=1024))
    m = raw.until(lambda m: isinstance(m, Committed | Failed))
    assert isinstance(m, Committed), m
    assert "staged_s" in m.timings
    path = Path(m.path)
    assert load_file(path / "model.safetensors")["w"].numpy().tobytes() == WEIGHT
    raw.msg(Staged(id=1, ready=2048))  # about a finished snapshot: ignored
    raw.msg(Staged(id=77, ready=10))  # about no snapshot: ignored
    raw.msg(Abandon(id=78))
    raw.msg(snapshot(id=2, step=2))  # the connection still works
    m = raw.until(lambda m: isinstance(m, Committed | Failed) and m.id == 2)
    assert isinstance(m, Committed), m


@pytest.mark.parametrize("how", ["abandon", "disconnect", "silence", "trickle"])
def test_a_stream_that_stops_is_discarded(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client], how: str
) -> None:
    d = start_daemon("--stage-timeout", "1")
    raw = registered(d)
    raw.msg(snapshot(id=1, run="r", step=1).model_copy(update={"ready": 0}))
    assert isinstance(raw.recv(), Accepted)
    started = time.monotonic()
    if how == "abandon":
        raw.msg(Abandon(id=1))
    elif how == "disconnect":
        raw.close()
    elif how == "trickle":  # progress, but never whole: the timeout counts from acceptance
        for ready in range(1, 8):
            raw.msg(Staged(id=1, ready=ready))
            time.sleep(0.2)
    if how != "disconnect":
        m = raw.until(lambda m: isinstance(m, Committed | Failed))
        assert isinstance(m, Failed) and m.code == "abandoned", m
        assert "nothing was committed" in m.message
        if how in ("silence", "trickle"):
            assert time.monotonic() - started >= 0.9
            assert "within 1 s" in m.message
    idle(connect(d))
    assert not (d.root / "r").exists() or step_dirs(d.root / "r") == []
    assert leftovers(d.root) == []
    probe = registered(d)
    probe.msg(snapshot(id=9, run="r", step=1))  # the same step commits afterwards
    m = probe.until(lambda m: isinstance(m, Committed | Failed) and m.id == 9)
    assert isinstance(m, Committed), m


def test_a_negative_watermark_is_refused(daemon: DaemonProc) -> None:
    raw = registered(daemon)
    raw.msg(snapshot(id=1, step=1).model_copy(update={"ready": -1}))
    m = raw.until(lambda m: isinstance(m, Committed | Failed))
    assert isinstance(m, Failed) and m.code == "invalid_request" and "ready" in m.message, m


def test_one_stream_at_a_time_per_connection(daemon: DaemonProc) -> None:
    raw = registered(daemon)
    raw.msg(snapshot(id=1, step=1).model_copy(update={"ready": 0}))
    assert isinstance(raw.recv(), Accepted)
    raw.msg(snapshot(id=2, step=2).model_copy(update={"ready": 0}))
    m = raw.until(lambda m: isinstance(m, Committed | Failed) and m.id == 2)
    assert isinstance(m, Failed) and m.code == "invalid_request" and "still being streamed" in m.message
    raw.msg(Staged(id=1, ready=1024))
    assert isinstance(raw.until(lambda m: isinstance(m, Committed | Failed) and m.id == 1), Committed)
    raw.msg(snapshot(id=3, step=3).model_copy(update={"ready": 1024}))  # the first is done: allowed
    assert isinstance(raw.until(lambda m: isinstance(m, Committed | Failed) and m.id == 3), Committed)
