"""The safetensors file format as ckptd writes and reads it.

A shard is ``<u64 little-endian header length><JSON header><data>``. ckptd pads the JSON header
with spaces (which the format allows) so that the data section starts at a 4096-byte boundary of
the file, exactly as it sits in the arena.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ckptd.dtypes import itemsize, numel
from ckptd.layout import ALIGN, round_up

_U64 = struct.Struct("<Q")
#: safetensors refuses headers larger than this; so does ckptd.
MAX_HEADER_BYTES = 100_000_000
METADATA = {"format": "pt"}


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def encode_header(entries: Iterable[HeaderEntry], metadata: Mapping[str, str] = METADATA) -> bytes:
    """The bytes before a shard's data: length prefix and JSON header, padded to 4096."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.start, e.end]}
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    padded = round_up(_U64.size + len(body), ALIGN) - _U64.size
    return _U64.pack(padded) + body + b" " * (padded - len(body))


def header_span(first8: bytes) -> int:
    """Bytes from the start of a file to the end of its header, from its first 8 bytes."""
    if len(first8) < _U64.size:
        return len(first8)
    n: int = _U64.unpack_from(first8)[0]
    return _U64.size + min(n, MAX_HEADER_BYTES + 1)


class ShardFormatError(ValueError):
    """A file is not a well-formed safetensors shard."""


@dataclass(frozen=True)
class ParsedHeader:
    data_start: int
    entries: tuple[HeaderEntry, ...]
    metadata: dict[str, str]


def decode_header(prefix: bytes, file_size: int, what: str) -> ParsedHeader:
    """Parse and check a header read from the start of a file of ``file_size`` bytes.

    ``prefix`` must hold at least the length field and the header. Checks what safetensors checks:
    known dtypes, sizes that match shapes, tensors that cover the data section without gaps.
    """
    if len(prefix) < _U64.size:
        raise ShardFormatError(f"{what}: file is {file_size} bytes, too short for a header")
    (n,) = _U64.unpack_from(prefix)
    if n > MAX_HEADER_BYTES or _U64.size + n > file_size:
        raise ShardFormatError(f"{what}: header length {n} does not fit a {file_size}-byte file")
    if len(prefix) < _U64.size + n:
        raise ShardFormatError(f"{what}: header truncated")
    try:
        raw = json.loads(prefix[_U64.size : _U64.size + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFormatError(f"{what}: header is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ShardFormatError(f"{what}: header is not a JSON object")
    metadata = raw.pop("__metadata__", {}) or {}
    entries = []
    for name, info in raw.items():
        try:
            dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
            size = numel(shape) * itemsize(dtype)
        except (KeyError, TypeError, ValueError) as e:
            raise ShardFormatError(f"{what}: bad header entry for {name!r} ({e})") from e
        if end - start != size:
            raise ShardFormatError(f"{what}: {name!r} spans {end - start} bytes, shape needs {size}")
        entries.append(HeaderEntry(name, dtype, shape, start, end))
    data_start = _U64.size + n
    pos = 0
    for entry in sorted(entries, key=lambda x: (x.start, x.end)):
        if entry.start != pos:
            raise ShardFormatError(f"{what}: data of {entry.name!r} does not start where the last ended")
        pos = entry.end
    if data_start + pos != file_size:
        raise ShardFormatError(f"{what}: header describes {data_start + pos} bytes, file has {file_size}")
    return ParsedHeader(data_start, tuple(entries), {str(k): str(v) for k, v in metadata.items()})
