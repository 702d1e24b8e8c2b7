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

    ``prefix`` must hold at least the length field and the header. Checks what safetensors checks,
    and everything a reader relies on before it allocates: a JSON object of entries, known dtypes,
    shapes of non-negative integers that a tensor can have, sizes that match shapes, tensors that
    cover the data section without gaps. Anything else is a ``ShardFormatError``.
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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        # RecursionError: nesting deeper than any header has (the C parser stops safely).
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ShardFormatError(f"{what}: header is not valid JSON ({reason})") from e
    if not isinstance(raw, dict):
        raise ShardFormatError(f"{what}: header is not a JSON object")
    metadata = raw.pop("__metadata__", None)  # absent or null (as safetensors reads it): none
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ShardFormatError(
            f"{what}: __metadata__ is {type(metadata).__name__} {_short(metadata)}; it must be a JSON "
            "object mapping strings to strings"
        )
    data_start = _U64.size + n
    entries = [_entry(name, info, file_size - data_start, what) for name, info in raw.items()]
    pos = 0
    for entry in sorted(entries, key=lambda x: (x.start, x.end)):
        if entry.start != pos:
            raise ShardFormatError(f"{what}: data of {entry.name!r} does not start where the last ended")
        pos = entry.end
    if data_start + pos != file_size:
        raise ShardFormatError(f"{what}: header describes {data_start + pos} bytes, file has {file_size}")
    return ParsedHeader(data_start, tuple(entries), dict(metadata))


#: Strides (products of trailing dimensions, a zero counted as one) and byte sizes must fit int64.
_MAX_EXTENT = 2**62


def _entry(name: str, info: object, data_bytes: int, what: str) -> HeaderEntry:
    """One tensor's entry, checked so that allocating it cannot fail or exceed the file."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ShardFormatError(f"{what}: entry {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    try:
        size = itemsize(dtype) if isinstance(dtype, str) else itemsize(repr(dtype))
    except ValueError as e:
        raise ShardFormatError(f"{what}: entry {name!r}: {e}") from e
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ShardFormatError(f"{what}: entry {name!r} has shape {shape!r}; dimensions are integers >= 0")
    extent = size
    for d in shape:
        extent *= max(d, 1)
        if extent > _MAX_EXTENT:
            raise ShardFormatError(f"{what}: entry {name!r} has shape {shape!r}, larger than any tensor")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) for x in offsets)):
        raise ShardFormatError(f"{what}: entry {name!r} has data_offsets {offsets!r}; expected [start, end]")
    start, end = offsets
    if not 0 <= start <= end <= data_bytes:
        raise ShardFormatError(
            f"{what}: entry {name!r} has data_offsets {offsets!r} outside the {data_bytes}-byte data section"
        )
    nbytes = numel(shape) * size
    if end - start != nbytes:
        raise ShardFormatError(f"{what}: {name!r} spans {end - start} bytes, shape needs {nbytes}")
    return HeaderEntry(name, dtype, tuple(shape), start, end)


def _short(x: object) -> str:
    text = json.dumps(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
