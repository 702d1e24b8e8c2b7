"""The filesystem operations of the daemon's write path, behind one small interface.

Every write, fsync, rename and removal the daemon makes goes through a ``Storage``. The real one
calls the OS; fault-injection tests subclass it to return ENOSPC, EIO, or to forget what was not
fsynced. Methods are called from the daemon's writer threads and must be thread-safe.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import cast

# O_DIRECT transfers must start at, and be a multiple of, the device's logical block size; 4096
# covers both 512-byte and 4K-native devices.
DIRECT_ALIGN = 4096


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


_sync_file_range = _libc_sync_file_range()
FILE_MODE = 0o444  # the files of a step: never written again once closed
SEALED_DIR_MODE = 0o555  # the directories of a sealed step
_SYNC_FILE_RANGE_WRITE = 2


class Storage:
    """POSIX file operations with the durability calls ckptd's commit protocol needs."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o755)

    def create(self, path: Path) -> int:
        """Open a new file for writing; it must not exist. It is created read-only (0444; the
        returned descriptor stays writable): a committed step is never written again, and a
        process of another user that follows a link into it gets ``PermissionError``."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)

    def create_shared(self, path: Path) -> int:
        """Open a new file that several writers will open again (a consolidated file of a sharded
        step, which every rank's part writes its own ranges of): owner-writable (0600) until
        ``seal_file`` once every part is durable. A daemon that is not root could not reopen a
        0444 file for writing."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def seal_file(self, path: Path) -> None:
        """Make a finished file read-only (0444), as ``create`` makes the others; a link is not
        followed."""
        os.chmod(path, FILE_MODE, follow_symlinks=False)

    def open_write(self, path: Path) -> int:
        """Open an existing file for writing (a consolidated file of a sharded step, which every
        rank's part writes its own ranges of); a link is not followed."""
        return os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def set_direct(self, fd: int, on: bool) -> bool:
        """Turn ``O_DIRECT`` on or off for an open file: writes then go from the caller's
        (aligned) buffer to the device without the page cache. False when the filesystem does not
        support it (tmpfs, some FUSE and network filesystems), in which case nothing changed."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return False
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, (flags | flag) if on else (flags & ~flag))
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return False
            raise
        return True

    def start_writeback(self, fd: int, offset: int, nbytes: int) -> None:
        """Ask the kernel to start writing this range to the device now, without waiting
        (``sync_file_range(SYNC_FILE_RANGE_WRITE)``). A hint: durability still comes from
        ``fsync``; a no-op where the call is missing."""
        if _sync_file_range is not None:
            _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)

    def drop_cache(self, fd: int) -> None:
        """Let the kernel drop this (fsynced, so clean) file from the page cache: a checkpoint
        is not read back soon, and training's own cached files should not make way for it."""
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def pwrite(self, fd: int, data: memoryview | bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        """Rename; ``dst`` is replaced if it is a file (used for LATEST)."""
        os.rename(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def seal_dir(self, path: Path) -> None:
        """Make a finished step's directory read-only (0555): nothing is added to it again."""
        os.chmod(path, SEALED_DIR_MODE)

    def remove_tree(self, path: Path) -> None:
        unseal_tree(path)
        shutil.rmtree(path)

    def write_all(self, fd: int, data: memoryview | bytes, offset: int) -> int:
        """pwrite until every byte is written; returns the offset after the data."""
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = self.pwrite(fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(f"pwrite wrote {n} bytes")
            done += n
        return offset + done


def unseal_tree(path: Path) -> None:
    """Give the owner write permission back on every directory of a (sealed) step, so that it can
    be removed; links are never followed (a real directory's mode only)."""
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        return
    for dirpath, _dirs, _files in os.walk(path, followlinks=False):
        mode = os.lstat(dirpath).st_mode
        if stat.S_ISDIR(mode) and not mode & stat.S_IWUSR:
            os.chmod(dirpath, stat.S_IMODE(mode) | stat.S_IWUSR)
