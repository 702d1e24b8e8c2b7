"""Checksums of written files: xxh3-128, computed while the bytes are written or read."""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

from ckptd.safeio import open_regular

ALGORITHM = "xxh3_128"
_CHUNK = 16 * 2**20


def new() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def of_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def of_file(path: Path) -> tuple[str, int]:
    """(hex digest, size) of a regular file (never a link, FIFO or device: ``UnsafeFile``)."""
    fd = open_regular(path)
    try:
        return of_fd(fd)
    finally:
        os.close(fd)


def of_fd(fd: int) -> tuple[str, int]:
    """(hex digest, size) of an open regular file from offset 0, read in large chunks."""
    h = new()
    size = 0
    view = memoryview(bytearray(max(1, min(_CHUNK, os.fstat(fd).st_size))))
    while n := os.preadv(fd, [view], size):
        h.update(view[:n])
        size += n
    return h.hexdigest(), size
