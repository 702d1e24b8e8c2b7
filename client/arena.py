"""Arenas: large memfd buffers shared with the daemon, reused across snapshots.

An arena is created once (``memfd_create``, sized, sealed against shrinking and growing, mapped
with ``MAP_POPULATE`` so no page faults land on the first snapshot) and its descriptor is sent to
the daemon once. Each arena is one slot: a snapshot is copied into a free slot, and the slot is
free again when the daemon reports the snapshot committed or failed. With CUDA the mapping is
page-locked once with ``cudaHostRegister`` so device-to-host copies run asynchronously.
"""

from __future__ import annotations

import fcntl
import itertools
import mmap
import os
from typing import Any

import torch

_ids = itertools.count(1)


class Arena:
    def __init__(self, size: int) -> None:
        self.id = next(_ids)
        self.size = size
        self.fd = os.memfd_create(f"ckptd-arena-{self.id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self._map = mmap.mmap(
                self.fd,
                size,
                flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except BaseException:
            os.close(self.fd)
            raise
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self.address: int = self.bytes.data_ptr()
        self._cuda_registered = False
        self.busy = False
        self.generation = 0  # snapshots copied into this arena so far
        self.quarantine: Any = None  # a slots.Quarantine while a lost daemon may still read it
        self.views_key: object = None
        self.views: list[torch.Tensor] = []

    def pin_for_cuda(self) -> None:
        """Page-lock the mapping once so device-to-host copies into it run asynchronously."""
        if self._cuda_registered:
            return
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        err = cudart.cudaHostRegister(self.bytes.data_ptr(), self.size, 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of a {self.size}-byte arena failed with error {int(err)}")
        self._cuda_registered = True

    def close(self) -> None:
        if self._cuda_registered:
            torch.cuda.cudart().cudaHostUnregister(self.bytes.data_ptr())  # type: ignore[no-untyped-call]
            self._cuda_registered = False
        self.views = []
        del self.bytes
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view; the mapping goes with it
            pass
        os.close(self.fd)
