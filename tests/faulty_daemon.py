"""A real ckptd daemon whose write layer injects faults: ``faulty_daemon.py FAULT serve-args...``.

FAULT is ``eio-write:STEP`` (EIO from pwrite while writing that step's shards),
``enospc-write:STEP``, ``eio-fsync:STEP``, or ``slow:SECONDS`` (every shard write sleeps first).
The fake subclasses the real ``Storage``; everything else is the real daemon.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from pathlib import Path

from ckptd.cli import main
from ckptd.storage import Storage


class FaultyStorage(Storage):
    def __init__(self, fault: str) -> None:
        self.kind, _, arg = fault.partition(":")
        self.arg = arg
        self.fsynced_files: list[str] = []
        self._names: dict[int, Path] = {}
        self._lock = threading.Lock()

    def _hit(self, fd: int) -> bool:
        path = self._names.get(fd)
        return path is not None and path.parent.name.startswith(f"step-{int(self.arg):06d}.")

    def create(self, path: Path) -> int:
        fd = super().create(path)
        with self._lock:
            self._names[fd] = path
        return fd

    def pwrite(self, fd: int, data: memoryview | bytes, offset: int) -> int:
        if self.kind == "slow":
            time.sleep(float(self.arg))
        elif self.kind in ("eio-write", "enospc-write") and self._hit(fd):
            code = errno.EIO if self.kind == "eio-write" else errno.ENOSPC
            raise OSError(code, os.strerror(code), str(self._names[fd]))
        return super().pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        if self.kind == "eio-fsync" and self._hit(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self._names[fd]))
        super().fsync(fd)

    def close(self, fd: int) -> None:
        with self._lock:
            self._names.pop(fd, None)
        super().close(fd)


if __name__ == "__main__":
    raise SystemExit(main(["serve", *sys.argv[2:]], storage=FaultyStorage(sys.argv[1])))
