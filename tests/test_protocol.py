"""Frames and messages: strict, typed, bounded, and never pickled."""

from __future__ import annotations

import json
import struct

import pytest

from ckptd.protocol import (
    Committed,
    FrameReader,
    Hello,
    ProtocolError,
    Snapshot,
    decode_client,
    decode_daemon,
    encode,
)


def test_round_trip_through_frames_split_anywhere() -> None:
    msgs = [
        Hello(version=1, pid=7),
        Snapshot(id=1, run="r", step=3, arena=1, components=[], tree={"$dict": {}}),
    ]
    stream = b"".join(encode(m) for m in msgs)
    reader = FrameReader()
    bodies = []
    for i in range(len(stream)):  # one byte at a time: frames reassemble across reads
        bodies += reader.feed(stream[i : i + 1])
    assert [decode_client(b) for b in bodies] == msgs
    assert reader.pending_bytes == 0


def test_frames_are_length_prefixed_json() -> None:
    frame = encode(Committed(id=1, run="r", step=2, path="/x", bytes=3, checksums={}, timings={}))
    (n,) = struct.unpack(">I", frame[:4])
    assert n == len(frame) - 4
    assert json.loads(frame[4:])["kind"] == "committed"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"kind": "launch_missiles"}', "kind"),
        (b'{"kind": "hello", "version": 1, "pid": 1, "extra": 1}', "extra"),
        (b'{"kind": "hello", "version": "1", "pid": 1}', "version"),
        (b"not json", "json"),
        (b'{"kind": "snapshot", "id": 1}', "run"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(body: bytes, why: str) -> None:
    with pytest.raises(ProtocolError) as e:
        decode_client(body)
    assert why.lower() in str(e.value).lower() or "invalid" in str(e.value)


def test_oversized_frame_is_refused_before_it_is_buffered() -> None:
    reader = FrameReader(max_frame_bytes=1024)
    with pytest.raises(ProtocolError, match="exceeds"):
        reader.feed(struct.pack(">I", 1025))


def test_daemon_messages_are_not_client_messages() -> None:
    frame = encode(Committed(id=1, run="r", step=2, path="/x", bytes=3, checksums={}, timings={}))
    assert decode_daemon(frame[4:]).kind == "committed"
    with pytest.raises(ProtocolError):
        decode_client(frame[4:])
