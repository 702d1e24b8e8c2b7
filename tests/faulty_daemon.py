"""A real ckptd daemon whose write layer injects faults: ``faulty_daemon.py FAULT serve-args...``.

FAULT is one of

- ``eio-write:STEP`` (EIO from pwrite while writing that step's shards), ``enospc-write:STEP``,
  ``eio-fsync:STEP``;
- ``slow:SECONDS`` (every pwrite sleeps first);
- ``hang-write:STEP``: pwrite on that step's shards blocks (for 10 minutes), as on a hung NFS
  mount, while the event loop goes on;
- ``kill-at:OP:N[:STEP]``: SIGKILL the daemon *before* the N-th call of the Storage operation OP;
- ``kill-after:OP:N[:STEP]``: SIGKILL it right *after* the N-th call of OP returned;
- ``eio-at:OP:N[:STEP]``: the N-th call of OP fails with EIO instead (nothing is done);
- ``layout-limit:N``: no storage fault; a connection may hold layouts of N tensors and the
  daemon 2N (instead of millions), so the limits can be reached with small frames;
- ``connections:N:SECONDS``: no storage fault; the daemon serves at most N clients and closes
  a connection that has not said hello within SECONDS.
- ``pending-frames:TOTAL:BLAMED``: no storage fault; unfinished frames of all connections may
  hold TOTAL bytes, past which one holding over BLAMED bytes is refused (instead of 1 GiB/16 MiB);
- ``slow-snapshot:SECONDS:STEP``: no storage fault; a ``Snapshot`` frame of STEP takes SECONDS
  more to decode on the layout thread (every frame over 300 bytes goes there), as a frame queued
  behind a huge layout does: its connection is not read meanwhile, while others are served.
- ``stall-loop:N:SECONDS``: no storage fault; the N-th heartbeat blocks the event loop for
  SECONDS (a ``time.sleep`` on the loop, as a long computation there would).

In a faulty daemon ``/healthz`` declares the loop stalled after 1 s and the writers wedged after
2 s (instead of 10 s and 60 s), so tests see it quickly.

OP is a ``Storage`` method (``mkdir``, ``create``, ``pwrite``, ``fsync``, ``close``, ``fsync_dir``,
``rename``, ``remove_tree``) or ``any``, optionally followed by ``@GLOB`` to count only calls on a
path whose name matches (for ``pwrite``/``fsync``/``close``, the name the descriptor was created
with; for ``rename``, the source or the destination name): ``create@ckptd.json`` is the manifest,
``rename@LATEST*`` moves ``LATEST``, ``create@*.index.json`` writes an index. With STEP, calls are
only counted once the temp directory of that step was created (so step 1 can be committed first
and the fault hits step 2). The daemon prints ``faulty_daemon: <what>`` to stderr when it fires.

The fake subclasses the real ``Storage``; everything else is the real daemon.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ckptd.cli import main
from ckptd.storage import Storage

T = TypeVar("T")
OPS = ("mkdir", "create", "pwrite", "fsync", "close", "fsync_dir", "rename", "remove_tree", "any")
COUNTED = ("kill-at", "kill-after", "eio-at")


class FaultyStorage(Storage):
    def __init__(self, fault: str) -> None:
        self.kind, _, arg = fault.partition(":")
        self.arg = arg
        self.fsynced_files: list[str] = []
        self._names: dict[int, Path] = {}
        self._lock = threading.Lock()
        self._calls = 0
        self.op = ""
        self.glob: str | None = None
        self.n = 0
        self.step: int | None = None
        if self.kind in COUNTED:
            parts = arg.split(":")
            if len(parts) not in (2, 3):
                raise SystemExit(f"faulty_daemon: {self.kind} needs OP:N[:STEP], got {arg!r}")
            op, _, glob = parts[0].partition("@")
            if op not in OPS:
                raise SystemExit(f"faulty_daemon: unknown operation {op!r}; one of {OPS}")
            self.op, self.glob, self.n = op, glob or None, int(parts[1])
            self.step = int(parts[2]) if len(parts) == 3 else None
        self._armed = self.step is None
        #: Until when a ``stat`` of the root fails with EIO (``eio-glitch``).
        self.glitch_until = 0.0

    # --- the counted faults ----------------------------------------------------------------------

    def _counted(self, op: str, names: tuple[str, ...], fn: Callable[[], T]) -> T:
        """Run ``fn`` (the real operation), dying or failing around the N-th matching call."""
        hit = False
        if self.kind in COUNTED:
            with self._lock:
                if (
                    self._armed
                    and self.op in (op, "any")
                    and (self.glob is None or any(fnmatch.fnmatchcase(n, self.glob) for n in names))
                ):
                    self._calls += 1
                    hit = self._calls == self.n
        if hit and self.kind == "kill-at":
            _die(f"SIGKILL before {op} {names} (call {self.n})")
        if hit and self.kind == "eio-at":
            sys.stderr.write(f"faulty_daemon: EIO from {op} {names} (call {self.n})\n")
            sys.stderr.flush()
            raise OSError(errno.EIO, os.strerror(errno.EIO), names[0] if names else None)
        result = fn()
        if hit and self.kind == "kill-after":
            _die(f"SIGKILL after {op} {names} (call {self.n})")
        return result

    def _name(self, fd: int) -> tuple[str, ...]:
        path = self._names.get(fd)
        return (path.name,) if path is not None else ()

    # --- the legacy per-step faults --------------------------------------------------------------

    def _hit(self, fd: int) -> bool:
        path = self._names.get(fd)
        return path is not None and path.parent.name.startswith(f"step-{int(self.arg):06d}.")

    # --- Storage ---------------------------------------------------------------------------------

    def mkdir(self, path: Path) -> None:
        if self.step is not None and path.name.startswith(f"step-{self.step:06d}.ckptd-tmp-"):
            with self._lock:
                self._armed = True
        self._counted("mkdir", (path.name,), lambda: super(FaultyStorage, self).mkdir(path))

    def create(self, path: Path) -> int:
        fd = self._counted("create", (path.name,), lambda: super(FaultyStorage, self).create(path))
        with self._lock:
            self._names[fd] = path
        return fd

    def open_write(self, path: Path) -> int:  # a sharded step's consolidated file, by each part
        fd = self._counted("open_write", (path.name,), lambda: super(FaultyStorage, self).open_write(path))
        with self._lock:
            self._names[fd] = path
        return fd

    def pwrite(self, fd: int, data: memoryview | bytes, offset: int) -> int:
        if self.kind == "slow":
            time.sleep(float(self.arg))
        elif self.kind == "hang-write" and self._hit(fd):
            sys.stderr.write(f"faulty_daemon: pwrite on {self._names[fd]} hangs\n")
            sys.stderr.flush()
            threading.Event().wait(600)
        elif self.kind in ("eio-write", "enospc-write", "eio-glitch") and self._hit(fd):
            code = errno.ENOSPC if self.kind == "enospc-write" else errno.EIO
            if self.kind == "eio-glitch":
                self.glitch_until = time.monotonic() + 2.0
            raise OSError(code, os.strerror(code), str(self._names[fd]))
        return self._counted(
            "pwrite", self._name(fd), lambda: super(FaultyStorage, self).pwrite(fd, data, offset)
        )

    def fsync(self, fd: int) -> None:
        if self.kind == "eio-fsync" and self._hit(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self._names[fd]))
        self._counted("fsync", self._name(fd), lambda: super(FaultyStorage, self).fsync(fd))

    def close(self, fd: int) -> None:
        names = self._name(fd)
        with self._lock:
            self._names.pop(fd, None)
        self._counted("close", names, lambda: super(FaultyStorage, self).close(fd))

    def fsync_dir(self, path: Path) -> None:
        self._counted("fsync_dir", (path.name,), lambda: super(FaultyStorage, self).fsync_dir(path))

    def rename(self, src: Path, dst: Path) -> None:
        self._counted("rename", (src.name, dst.name), lambda: super(FaultyStorage, self).rename(src, dst))

    def remove_tree(self, path: Path) -> None:
        self._counted("remove_tree", (path.name,), lambda: super(FaultyStorage, self).remove_tree(path))


class _GlitchyOs:
    """``os`` as the root guard sees it under ``eio-glitch``: ``stat`` of a path fails with EIO
    while the storage's glitch lasts; everything else is the real ``os``."""

    def __init__(self, storage: FaultyStorage) -> None:
        self._storage = storage

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def stat(self, path: object, *args: object, **kwargs: object) -> os.stat_result:
        if time.monotonic() < self._storage.glitch_until:
            sys.stderr.write(f"faulty_daemon: EIO from stat {path}\n")
            sys.stderr.flush()
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return os.stat(path, *args, **kwargs)  # type: ignore[arg-type]


def _die(what: str) -> None:
    sys.stderr.write(f"faulty_daemon: {what}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    if sys.argv[1].startswith("layout-limit:"):
        from ckptd.daemon import layouts

        layouts.MAX_LAYOUT_TENSORS = int(sys.argv[1].split(":")[1])
        layouts.MAX_DAEMON_LAYOUT_TENSORS = 2 * layouts.MAX_LAYOUT_TENSORS
    if sys.argv[1].startswith("connections:"):
        from ckptd.daemon import connection

        _, limit, hello_s = sys.argv[1].split(":")
        connection.MAX_CONNECTIONS = int(limit)
        connection.HELLO_TIMEOUT_S = float(hello_s)
    if sys.argv[1].startswith("pending-frames:"):
        from ckptd.daemon import connection

        _, total, blamed = sys.argv[1].split(":")
        connection.MAX_PENDING_FRAME_BYTES = int(total)
        connection.FRAME_BYTES_BLAMED = int(blamed)
    if sys.argv[1].startswith("slow-snapshot:"):
        from ckptd.daemon import connection
        from ckptd.protocol import Snapshot

        _, seconds, slow_step = sys.argv[1].split(":")
        decode = connection._decode_large

        def slow_decode(body: bytes) -> tuple[object, object]:
            out = decode(body)
            if isinstance(out[0], Snapshot) and out[0].step == int(slow_step):
                time.sleep(float(seconds))
            return out

        connection.HEAVY_FRAME_BYTES = 300
        connection._decode_large = slow_decode  # type: ignore[assignment]
    if sys.argv[1].startswith("stall-loop:"):
        from ckptd.daemon import heartbeat

        _, nth, stall_s = sys.argv[1].split(":")
        beats = [0]
        real_beat = heartbeat.beat

        def stalling_beat(*args: object) -> None:
            beats[0] += 1
            if beats[0] == int(nth):
                sys.stderr.write(f"faulty_daemon: the event loop stalls for {stall_s} s\n")
                sys.stderr.flush()
                time.sleep(float(stall_s))
            real_beat(*args)  # type: ignore[arg-type]

        heartbeat.beat = stalling_beat  # type: ignore[assignment]
    from ckptd.daemon import health

    health.LOOP_STALL_S, health.WRITER_STALL_S = 1.0, 2.0
    storage = FaultyStorage(sys.argv[1])
    if storage.kind == "eio-glitch":
        from ckptd.daemon import rootguard

        rootguard.os = _GlitchyOs(storage)  # type: ignore[assignment]
    raise SystemExit(main(["serve", *sys.argv[2:]], storage=storage))
