"""The daemon's read-only mappings of client arenas (memfds received over SCM_RIGHTS).

An arena stays mapped while any snapshot still reads from it, even after its client released it
or died: that is what lets a snapshot commit after the trainer is gone.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat


class ArenaError(ValueError):
    """An arena descriptor the daemon refuses to map."""


class Arena:
    """A client's memfd, mapped read-only, with a count of the snapshots reading from it."""

    def __init__(self, arena_id: int, fd: int, declared_size: int) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArenaError(f"arena {arena_id}: descriptor is not a memfd or regular file")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as e:
            raise ArenaError(f"arena {arena_id}: descriptor does not support sealing ({e})") from e
        if not seals & fcntl.F_SEAL_SHRINK:
            raise ArenaError(
                f"arena {arena_id}: memfd is not sealed against shrinking; "
                "add F_SEAL_SHRINK before registering it"
            )
        if st.st_size != declared_size or st.st_size <= 0:
            raise ArenaError(
                f"arena {arena_id}: declared {declared_size} bytes but the memfd has {st.st_size}"
            )
        self.id = arena_id
        self.size = st.st_size
        self._fd = fd
        self._map = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self._readers = 0
        self._released = False
        self.closed = False

    def view(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ArenaError(
                f"range [{offset}, {offset + nbytes}) outside arena {self.id} of {self.size} bytes"
            )
        return memoryview(self._map)[offset : offset + nbytes]

    def acquire(self) -> None:
        self._readers += 1

    def release_reader(self) -> None:
        self._readers -= 1
        self._maybe_close()

    def release(self) -> None:
        """The client is done with this arena; unmap once no snapshot reads from it."""
        self._released = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._released and self._readers == 0 and not self.closed:
            self.closed = True
            try:
                self._map.close()
            except BufferError:  # a view is still alive somewhere; the GC unmaps it later
                pass
            os.close(self._fd)
