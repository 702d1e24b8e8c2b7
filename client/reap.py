"""Freeing the slots that lost snapshots hold, and telling when waiting for one is in vain.

A slot whose snapshot's connection was lost stays *quarantined* while the daemon may still read
it and *kept* while it holds the only copy of a snapshot that may never be committed (see
``client/slots.py``). ``Reaper.reap`` asks the daemon which snapshots it still writes, lifts the
quarantine of the others, frees the slots of snapshots committed after all, and says why no slot
can come free by waiting: the connection is gone, or every quarantined snapshot has stood still
for ``stuck_timeout_s``, so that ``snapshot(policy="block")`` raises instead of waiting forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ckptd import paths
from ckptd.protocol import StatusReply
from client.channel import Channel
from client.errors import CheckpointError
from client.handle import SnapshotHandle
from client.slots import Quarantine, SlotPool

log = logging.getLogger(__name__)
#: A lost snapshot's handle, and how to forget it (freeing its slot) once it is committed.
Lost = tuple[SnapshotHandle, Callable[[], None]]


def no_longer_read(q: Quarantine, reply: StatusReply, channel: Channel) -> bool:
    """Whether the daemon that answered ``reply`` on ``channel`` can no longer read the slot
    quarantined by ``q``: it is another instance (the one that could is gone), or it neither
    writes that step nor still reads the connection the request went on. A reply on the same
    connection comes after every frame sent before it was handled (frames are taken in order)."""
    if q.instance != channel.welcome.instance:
        return True
    if any((j.run, j.step) == (q.run, q.step) for j in reply.jobs):
        return False
    return q.connection == channel.token or q.connection not in reply.connections


def committed(root: Path, handle: SnapshotHandle) -> bool:
    """Whether ``handle``'s step is committed on disk (its manifest is in the step directory)."""
    return (root / handle.run / paths.step_dirname(handle.step) / "ckptd.json").exists()


class Reaper:
    def __init__(
        self,
        slots: SlotPool,
        status: Callable[[float], StatusReply],
        lost: Callable[[], list[Lost]],
        is_committed: Callable[[SnapshotHandle], bool],
        *,
        liveness_timeout_s: float,
        stuck_timeout_s: float,
    ) -> None:
        self._slots = slots
        self._status = status
        self._lost = lost
        self._committed = is_committed
        self._liveness_timeout_s = liveness_timeout_s
        self._stuck_timeout_s = stuck_timeout_s
        self._lock = threading.Lock()
        # What status said of each snapshot still written ((stage, bytes_written)), and since when.
        self._seen: dict[tuple[str, int], tuple[tuple[str, int], float]] = {}

    def reap(self, channel: Channel | None) -> CheckpointError | None:
        """Free what can be freed; why no slot can come free by waiting, or None."""
        self.drop_committed()
        if channel is None or channel.closed:
            reason, code = channel.end if channel is not None else ("not connected", "daemon_died")
            return CheckpointError(
                f"no arena slot can come free: the connection to ckptd is gone ({reason}); the "
                "next snapshot() reconnects, then client.resubmit() or client.discard_lost()",
                code=code,
            )
        try:
            reply = self._status(self._liveness_timeout_s)
        except CheckpointError as e:
            return e
        running = {(j.run, j.step): (j.stage, j.bytes_written) for j in reply.jobs}
        self._slots.release_quarantined(lambda q: no_longer_read(q, reply, channel))
        self.drop_committed()
        return self._stuck(channel, running)

    def drop_committed(self) -> None:
        """Forget lost snapshots whose step is committed on disk after all, freeing their slots
        (a committed step's shards are all written: no daemon reads its slot any more)."""
        for handle, drop in self._lost():
            if self._committed(handle):
                drop()
                log.info("[run=%s step=%s] committed after all: its slot is free", handle.run, handle.step)

    def _stuck(
        self, channel: Channel, running: dict[tuple[str, int], tuple[str, int]]
    ) -> CheckpointError | None:
        """An error if every snapshot that holds a quarantined slot has stood still for
        ``stuck_timeout_s``."""
        now_s = time.monotonic()
        with self._lock:
            old = self._seen
            seen = {k: old[k] if k in old and old[k][0] == p else (p, now_s) for k, p in running.items()}
            self._seen = seen
        keys = [
            (a.quarantine.run, a.quarantine.step)
            for a in list(self._slots.arenas)
            if a.quarantine is not None and a.quarantine.instance == channel.welcome.instance
        ]
        waits = [(k, seen[k]) for k in keys if k in seen]
        if not waits or any(now_s - since < self._stuck_timeout_s for _, (_, since) in waits):
            return None
        stages = ", ".join(f"step {k[1]} of run {k[0]!r} at stage {p[0]!r}" for k, (p, _) in waits)
        return CheckpointError(
            f"no arena slot can come free: ckptd (pid {channel.welcome.pid}) has made no progress for "
            f"{self._stuck_timeout_s:g} s with the snapshots that hold them ({stages}); its storage "
            "is stuck (a hung mount?). Fix or restart it, then client.resubmit()",
            code="daemon_stuck",
        )
