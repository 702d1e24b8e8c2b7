"""Checksums of written files: xxh3-128, computed while the bytes are written or read."""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

ALGORITHM = "xxh3_128"
_CHUNK = 16 * 2**20


def new() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def of_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def of_file(path: Path) -> tuple[str, int]:
    """(hex digest, size) of a file, read in large chunks."""
    h = new()
    size = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        view = memoryview(bytearray(max(1, min(_CHUNK, os.fstat(fd).st_size))))
        while n := os.readv(fd, [view]):
            h.update(view[:n])
            size += n
    finally:
        os.close(fd)
    return h.hexdigest(), size
