"""``SnapshotHandle``: what ``snapshot()`` returns, completed when the daemon commits or fails."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from dataclasses import dataclass
from pathlib import Path

from client.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommitInfo:
    """A committed snapshot: where it is and what it cost. Times in seconds."""

    path: Path
    step: int
    run: str
    bytes: int
    stall_s: float  # how long snapshot() blocked the caller
    durable_s: float  # from the snapshot() call to the commit being reported
    checksums: dict[str, str]
    timings: dict[str, float]


class SnapshotHandle:
    """A snapshot on its way to disk.

    >>> handle = client.snapshot(model, step=100)      # doctest: +SKIP
    >>> handle.add_done_callback(lambda h: print(h.error or h.path))  # doctest: +SKIP
    >>> info = handle.wait()                            # or: await handle.done()  # doctest: +SKIP
    """

    def __init__(self, snapshot_id: int, run: str, step: int, started: float) -> None:
        self.id = snapshot_id
        self.run = run
        self.step = step
        self.started = started
        self.stall_s = 0.0
        self.skipped = False
        self._future: concurrent.futures.Future[CommitInfo | None] = concurrent.futures.Future()
        # Running futures cannot be cancelled: a timed-out ``await handle.done()`` must not cancel
        # the snapshot's outcome for everyone else.
        self._future.set_running_or_notify_cancel()
        self._staged = threading.Event()  # also set when it fails: nobody waits on a dead snapshot
        self._copied = threading.Event()  # only once no copy into its slot can still be running
        # Set once the outcome is set and the done callbacks added so far have run: a callback
        # that reads ``error`` has then had its chance to observe the failure.
        self._settled = threading.Event()
        self._observed = False

    # --- for users -------------------------------------------------------------------------------

    @property
    def staged(self) -> bool:
        """True once the snapshot's bytes are in the arena (for GPU tensors, once the copy ran)."""
        return self._staged.is_set()

    @property
    def path(self) -> Path | None:
        """The committed checkpoint directory, once committed."""
        if self._future.done() and not self._future.exception():
            info = self._future.result()
            return info.path if info else None
        return None

    @property
    def error(self) -> CheckpointError | None:
        """The failure, once failed (None while pending or when committed). Reading it counts as
        having seen the failure: the next ``snapshot()`` does not raise it again."""
        if not self._future.done():
            return None
        self._observed = True
        exc = self._future.exception()
        return exc if isinstance(exc, CheckpointError) else None

    def wait(self, timeout: float | None = None) -> CommitInfo | None:
        """Block until committed; returns the commit info (None for a skipped snapshot).

        Raises ``CheckpointError`` if the snapshot failed, ``TimeoutError`` if it is still going
        after ``timeout``. Without one it still returns: a daemon silent for the client's
        ``liveness_timeout_s`` fails it with ``daemon_unresponsive``, a snapshot standing still
        for ``stuck_timeout_s`` with ``daemon_stuck``.
        """
        self._observed = True
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"step {self.step} of run {self.run!r} not committed after {timeout}s"
            ) from None

    async def done(self) -> CommitInfo | None:
        """Await the commit; raises ``CheckpointError`` if the snapshot failed."""
        self._observed = True
        return await asyncio.wrap_future(self._future)

    def add_done_callback(self, fn: Callable[[SnapshotHandle], object]) -> None:
        """Call ``fn(handle)`` once committed or failed, on the client's I/O thread (or at once
        if already done). A callback sees failures through ``handle.error``; attaching one does
        not count as seeing a failure: unless ``fn`` (or anyone) reads ``error`` or calls
        ``wait()`` or ``done()``, the next ``snapshot()`` raises it."""

        def call(_: object) -> None:
            try:
                fn(self)
            except Exception:
                log.exception("snapshot callback %r raised", fn)

        self._future.add_done_callback(call)

    def done_now(self) -> bool:
        return self._future.done()

    def __repr__(self) -> str:
        state = "skipped" if self.skipped else "done" if self._future.done() else "pending"
        return f"<SnapshotHandle run={self.run!r} step={self.step} {state}>"

    # --- for the client --------------------------------------------------------------------------

    def _set_staged(self) -> None:
        """The copy into the slot is over (done, or failed on the device)."""
        self._copied.set()
        self._staged.set()

    # The outcome is set once; threads (I/O, watchdog, training) may race to set it, and the
    # first wins: a late one must not raise in the thread that reports the others.

    def _commit(self, info: CommitInfo) -> None:
        try:
            self._future.set_result(info)  # runs the done callbacks in this thread
        except InvalidStateError:
            return  # another thread won; it sets _settled once its callbacks ran
        self._settled.set()

    def _fail(self, error: CheckpointError) -> None:
        self._staged.set()
        try:
            self._future.set_exception(error)
        except InvalidStateError:
            return
        self._settled.set()

    def _skip(self) -> None:
        self.skipped = True
        self._observed = True
        self._staged.set()
        self._future.set_result(None)
        self._settled.set()

    def _unobserved_error(self) -> CheckpointError | None:
        """A failure nobody has looked at yet, marked as seen."""
        if self._observed or not self._future.done():
            return None
        exc = self._future.exception()
        if isinstance(exc, CheckpointError):
            self._observed = True
            return exc
        return None


def now() -> float:
    return time.perf_counter()
