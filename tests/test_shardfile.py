"""The safetensors bytes ckptd writes: golden header bytes, and files the real loader accepts."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import same_bits
from safetensors import safe_open
from safetensors.torch import load_file

from ckptd import checksum
from ckptd.commit import write_shard
from ckptd.layout import ALIGN, TensorSpec, plan
from ckptd.shardfile import HeaderEntry, ShardFormatError, decode_header, encode_header
from ckptd.storage import Storage
from ckptd.torch_dtypes import FROM_SAFETENSORS, TO_SAFETENSORS


def test_header_golden_bytes() -> None:
    header = encode_header([HeaderEntry("w", "F32", (2,), 0, 8)])
    body = b'{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    assert len(header) == ALIGN, "data starts at a 4096-byte boundary"
    assert header[:8] == struct.pack("<Q", ALIGN - 8)
    assert header[8 : 8 + len(body)] == body
    assert set(header[8 + len(body) :]) == {ord(" ")}, "padding is spaces, as the format allows"


def _all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for dtype, name in TO_SAFETENSORS.items():
        base = torch.randint(0, 100, (3, 4), generator=g)
        if dtype == torch.complex64:
            out[name] = torch.complex(base.float(), -base.float())
        elif dtype.is_floating_point:
            out[name] = (base.float() / 7).to(dtype)
        else:
            out[name] = base.to(dtype)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.empty(0, 5)
    return out


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors exactly as the daemon does: planned layout, header, one data range."""
    specs = [TensorSpec(n, TO_SAFETENSORS[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    lay = plan([("model", specs)], 10**12)
    shard = lay.components[0].shards[0]
    arena = torch.zeros(lay.slot_bytes, dtype=torch.uint8)
    for p in shard.tensors:
        dst = arena[shard.offset + p.start : shard.offset + p.end].view(FROM_SAFETENSORS[p.spec.dtype])
        dst.view(p.spec.shape).copy_(tensors[p.spec.name])
    header = encode_header(
        HeaderEntry(p.spec.name, p.spec.dtype, p.spec.shape, p.start, p.end) for p in shard.tensors
    )
    data = memoryview(arena.numpy()).cast("B")[shard.offset : shard.offset + shard.nbytes]  # type: ignore[arg-type]
    record = write_shard(Storage(), path, header, data)
    assert record.bytes == path.stat().st_size
    assert record.xxh3_128 == checksum.of_file(path)[0]


def test_safetensors_loads_every_dtype_bit_exact(tmp_path: Path) -> None:
    tensors = _all_dtypes()
    path = tmp_path / "s.safetensors"
    _write(path, tensors)
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert same_bits(loaded[name], t), name
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_decode_header_refuses_gaps_and_bad_sizes() -> None:
    good = encode_header([HeaderEntry("a", "F32", (2,), 0, 8), HeaderEntry("b", "U8", (1,), 8, 9)])
    parsed = decode_header(good, len(good) + 9, "x")
    assert parsed.data_start == ALIGN and {e.name for e in parsed.entries} == {"a", "b"}
    with pytest.raises(ShardFormatError, match="file has"):
        decode_header(good, len(good) + 10, "x")
    gap = encode_header([HeaderEntry("a", "F32", (2,), 0, 8), HeaderEntry("b", "U8", (1,), 9, 10)])
    with pytest.raises(ShardFormatError, match="does not start"):
        decode_header(gap, len(gap) + 10, "x")
    n = len(json.dumps({"a": 1}))
    bad = struct.pack("<Q", n) + b'{"a": 1}'[:n]
    with pytest.raises(ShardFormatError):
        decode_header(bad, len(bad), "x")
