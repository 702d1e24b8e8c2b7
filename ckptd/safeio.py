"""Opening a checkpoint's own files: regular files only, never through a link, size-bounded.

ckptd writes only regular files into a run or step directory, so anything else found there (a
FIFO, a symlink to ``/dev/zero`` or out of the root, a device, a socket, a directory) is refused
before a byte is read: opening a FIFO blocks until a writer comes, and reading a device never
ends. Every reader (manifest, shards, checksums, ``LATEST``) opens through ``open_regular``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


class UnsafeFile(OSError):
    """Not a regular file (or larger than allowed); ``strerror`` says what it is instead."""


def kind(mode: int) -> str:
    """What a file is, from its ``st_mode``, for messages: ``"a FIFO"``, ``"a symlink"``..."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "a special file"


def open_regular(path: str | os.PathLike[str], max_bytes: int | None = None) -> int:
    """A read-only descriptor on ``path``, which must be a regular file (not a link to one) of at
    most ``max_bytes``; raises ``UnsafeFile`` otherwise, ``OSError`` if it cannot be opened."""
    try:
        # O_NONBLOCK: a FIFO opens at once instead of waiting for a writer; checked below.
        fd = os.open(path, _FLAGS)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # a link (O_NOFOLLOW), a socket
            try:
                what = kind(os.lstat(path).st_mode)
            except OSError:
                raise e from None
            raise UnsafeFile(e.errno, _not_regular(what), str(path)) from e
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(errno.EINVAL, _not_regular(kind(st.st_mode)), str(path))
        if max_bytes is not None and st.st_size > max_bytes:
            raise UnsafeFile(errno.EFBIG, f"{st.st_size} bytes, more than the {max_bytes} allowed", str(path))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The whole of a regular file of at most ``max_bytes`` (also if it grows while read)."""
    fd = open_regular(path, max_bytes)
    try:
        chunks, total = [], 0
        while chunk := os.read(fd, min(max_bytes + 1 - total, 16 * 2**20) or 1):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise UnsafeFile(errno.EFBIG, f"grew past the {max_bytes} bytes allowed", str(path))
    finally:
        os.close(fd)
    return b"".join(chunks)


def _not_regular(what: str) -> str:
    if what == "a symlink":
        return "a symlink; ckptd writes regular files only, never links, so it does not follow one"
    return f"{what}, not a regular file"


def lstat_kind(path: Path) -> str | None:
    """What is at ``path`` without following a link (``kind``), or None if nothing is."""
    try:
        return kind(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None
