"""The filesystem operations of the daemon's write path, behind one small interface.

Every write, fsync, rename and removal the daemon makes goes through a ``Storage``. The real one
calls the OS; fault-injection tests subclass it to return ENOSPC, EIO, or to forget what was not
fsynced. Methods are called from the daemon's writer threads and must be thread-safe.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


class Storage:
    """POSIX file operations with the durability calls ckptd's commit protocol needs."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o755)

    def create(self, path: Path) -> int:
        """Open a new file for writing; it must not exist."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def pwrite(self, fd: int, data: memoryview | bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def start_writeback(self, fd: int, offset: int, nbytes: int) -> None:
        """Hint: start writing this range to the device now (``sync_file_range``), so writing
        overlaps filling the page cache. No durability promise (fsync still follows); errors are
        left for that fsync to report."""
        if _sync_file_range is not None:
            _sync_file_range(fd, offset, nbytes, _WRITE)

    def wait_writeback(self, fd: int, offset: int, nbytes: int) -> None:
        """Hint: wait until this range has been written, bounding dirty pages per writer."""
        if _sync_file_range is not None:
            _sync_file_range(fd, offset, nbytes, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)

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

    def remove_tree(self, path: Path) -> None:
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
