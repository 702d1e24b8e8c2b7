"""Layouts a hostile client registers cannot exhaust the daemon's memory or stall its loop.

- A shard must hold a tensor (each costs a 4096-byte header): a layout of empty shards is refused.
- Layouts sent in parts are bounded as the parts arrive: the part past the limit fails the
  layout (aliases count like tensors), and parts still arriving count against the daemon-wide
  limit of every connection's layouts.
- A layout frame over 1 MiB is refused before it is decoded (send it in parts).
- Held layouts are plain rows the garbage collector does not track; nothing is frozen.
"""

from __future__ import annotations

import gc
import json
import struct
import time
from collections.abc import Callable

import pytest
from conftest import DaemonProc
from test_handoff_faults import _big_layout, _Raw, _register_arena

from ckptd import layout as planner
from ckptd.daemon.connection import MAX_LAYOUT_FRAME_BYTES
from ckptd.daemon.layouts import LayoutParts, prepare
from ckptd.protocol import (
    ComponentEntry,
    DaemonMessage,
    Failed,
    RegisterLayout,
    ShardEntry,
    StatusReply,
    StatusRequest,
    TensorEntry,
    encode,
    encode_snapshot,
)


def _shard(names: list[str], offset: int = 0) -> ShardEntry:
    ts = [
        TensorEntry(name=n, dtype="F32", shape=[1], start=4 * i, end=4 * i + 4) for i, n in enumerate(names)
    ]
    return ShardEntry(offset=offset, nbytes=4 * len(names), tensors=ts)


def _outcome(raw: _Raw, layout: int) -> DaemonMessage:
    raw.sock.sendall(encode_snapshot(1, "r", 1, arena=1, layout=layout, tree=None, files={}))
    m = raw.recv()
    while m.kind not in ("committed", "failed"):
        m = raw.recv()
    return m


def test_a_layout_of_empty_shards_is_refused(daemon: DaemonProc) -> None:
    raw = _Raw(daemon.socket)
    try:
        _register_arena(raw, 8192, b"")
        empty = [ShardEntry(offset=0, nbytes=0, tensors=[]) for _ in range(1000)]
        raw.sock.sendall(
            encode(RegisterLayout(layout=1, components=[ComponentEntry(name="model", shards=empty)]))
        )
        m = _outcome(raw, 1)
        assert isinstance(m, Failed) and m.code == "invalid_request", m
        assert "holds no tensors" in m.message
    finally:
        raw.sock.close()


def test_the_planner_never_makes_an_empty_shard() -> None:
    with pytest.raises(ValueError, match="no tensors"):
        planner.plan([("model", [])], 2**20)
    lay = planner.plan([("model", [planner.TensorSpec("w", "F32", (0,))])], 2**20)
    assert [len(s.tensors) for s in lay.components[0].shards] == [1]


@pytest.mark.parametrize("how", ["tensors", "aliases", "empty shards"])
def test_layout_parts_fail_at_the_first_part_past_the_limit(
    start_daemon: Callable[..., DaemonProc], how: str
) -> None:
    d = start_daemon(faults="layout-limit:100")
    raw = _Raw(d.socket)
    try:
        _register_arena(raw, 8192, b"")
        frames = b""
        for p in range(20):  # 60 entries each: the second part passes the limit of 100
            names = [f"p{p}.t{i}" for i in range(60 if how == "tensors" else 1)]
            aliases = {f"p{p}.a{i}": names[0] for i in range(59)} if how == "aliases" else {}
            shards = (
                [_shard(names)] if how != "empty shards" else [ShardEntry(offset=0, nbytes=0, tensors=[])]
            )
            comp = ComponentEntry(name=f"c{p}", shards=shards, aliases=aliases)
            frames += encode(RegisterLayout(layout=1, components=[comp], more=p < 19))
        raw.sock.sendall(frames)
        m = _outcome(raw, 1)
        assert isinstance(m, Failed) and m.code == "invalid_request", m
        want = (
            "part 1: component 'c0' has a shard without tensors" if how == "empty shards" else "part 2 takes"
        )
        assert want in m.message, m.message
        if how != "empty shards":
            assert "limit of one layout" in m.message and "fewer, larger tensors" in m.message
    finally:
        raw.sock.close()


def test_unfinished_parts_count_against_the_daemon_wide_limit(
    start_daemon: Callable[..., DaemonProc],
) -> None:
    """Limit 100 per connection, 200 for the daemon: two connections hold 90 tensors each in
    unfinished parts; a third one's 90-tensor layout is refused with ``layout_limit``."""
    d = start_daemon(faults="layout-limit:100")
    holders = [_Raw(d.socket) for _ in range(2)]
    raw = _Raw(d.socket)
    try:
        for k, h in enumerate(holders):
            comp = ComponentEntry(name="model", shards=[_shard([f"t{i}" for i in range(90)])])
            h.sock.sendall(
                encode(RegisterLayout(layout=1, components=[comp], more=True)) + encode(StatusRequest())
            )
            assert h.recv().kind == "status_reply", k  # the part was read
        _register_arena(raw, 8192, b"")
        comp = ComponentEntry(name="model", shards=[_shard([f"t{i}" for i in range(90)])])
        raw.sock.sendall(encode(RegisterLayout(layout=1, components=[comp])))
        m = _outcome(raw, 1)
        assert isinstance(m, Failed) and m.code == "layout_limit", m
        assert "limit of 200" in m.message and "close idle clients" in m.message
        holders.pop().sock.close()  # its parts are dropped with it: room again
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the daemon has seen it close
            raw.sock.sendall(encode(StatusRequest()))
            reply = raw.recv()
            if isinstance(reply, StatusReply) and reply.clients == 2:
                break
            time.sleep(0.05)
        raw.sock.sendall(encode(RegisterLayout(layout=2, components=[comp])))
        assert _outcome(raw, 2).kind == "committed"
    finally:
        for h in [*holders, raw]:
            h.sock.close()


def test_a_large_layout_frame_is_refused_before_decoding(daemon: DaemonProc) -> None:
    raw = _Raw(daemon.socket)
    try:
        body = json.dumps(
            {"kind": "register_layout", "layout": 3, "components": json.loads(_big_layout(20_000))}
        ).encode()
        assert len(body) > MAX_LAYOUT_FRAME_BYTES
        raw.sock.sendall(struct.pack(">I", len(body)) + body)
        m = raw.recv()
        assert isinstance(m, Failed) and m.code == "bad_frame", m
        assert "in parts" in m.message and str(MAX_LAYOUT_FRAME_BYTES) in m.message
    finally:
        raw.sock.close()


def test_held_layouts_are_untracked_rows_and_nothing_is_frozen() -> None:
    parts = LayoutParts(1)
    names = [f"t{i}" for i in range(5000)]
    for k in range(5):
        chunk = names[1000 * k : 1000 * (k + 1)]
        comp = ComponentEntry(name="model", shards=[_shard(chunk, offset=4096 * k)])
        parts.add(RegisterLayout(layout=1, components=[comp], more=k < 4))
    assert parts.error is None and parts.tensors == 5000
    frozen = gc.get_freeze_count()
    prepared = prepare(parts.components())
    gc.collect()
    assert gc.get_freeze_count() == frozen
    rows = [t for s in parts.components()[0].shards for t in s.tensors]
    assert not any(gc.is_tracked(t) for t in rows)
    assert prepared.tensors == 5000 and sum(s.tensors for s in prepared.components[0].shards) == 5000
