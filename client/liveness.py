"""How the client knows the daemon still works for it, so that no wait lasts forever.

The daemon's event loop sends a ``Heartbeat`` about once a second with the progress of this
connection's snapshots (stage, bytes written). Two verdicts follow, each bounding every wait on
a snapshot (``wait()``, ``snapshot(policy="block")``, ``close()``):

- **unresponsive**: nothing at all came for ``liveness_timeout_s`` while snapshots are pending
  (the daemon is stopped, hung, or its loop is blocked). The ``Watchdog`` thread aborts the
  connection; pending handles then fail with ``daemon_unresponsive``, like ``daemon_died``.
- **stuck**: heartbeats come, but a snapshot's progress did not move, nor did the daemon's as a
  whole, for ``stuck_timeout_s`` (its writes hang in the kernel: a hung NFS mount). ``Progress``
  names those snapshots on each heartbeat; they fail with ``daemon_stuck``, naming the stage.

A slow disk does neither: its chunks still move the progress. Neither verdict runs on the
training thread, and neither needs a collective.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ckptd.protocol import Heartbeat
from client.channel import Channel

log = logging.getLogger(__name__)


@dataclass
class Seen:
    """What the heartbeats last said about one snapshot, and since when."""

    since: float  # monotonic time its progress last moved (or it was sent)
    stage: str
    bytes_written: int


class Progress:
    """The progress of the snapshots sent to the daemon, from its heartbeats (thread-safe)."""

    def __init__(self, stuck_timeout_s: float) -> None:
        self.stuck_timeout_s = stuck_timeout_s
        self._lock = threading.Lock()
        self._seen: dict[int, Seen] = {}
        self._work = -1
        self._work_since = time.monotonic()

    def sent(self, snapshot_id: int) -> None:
        with self._lock:
            self._seen[snapshot_id] = Seen(time.monotonic(), "sent (not yet read by the daemon)", 0)

    def forget(self, snapshot_id: int) -> None:
        with self._lock:
            self._seen.pop(snapshot_id, None)

    def heartbeat(self, beat: Heartbeat) -> list[tuple[int, Seen]]:
        """Record ``beat``; the snapshots now stuck (each reported once)."""
        now = time.monotonic()
        with self._lock:
            if beat.work != self._work:
                self._work, self._work_since = beat.work, now
            for job in beat.jobs:
                seen = self._seen.get(job.id)
                if seen is not None and (job.stage, job.bytes_written) != (seen.stage, seen.bytes_written):
                    seen.since, seen.stage, seen.bytes_written = now, job.stage, job.bytes_written
            cutoff = now - self.stuck_timeout_s
            stuck = [(i, s) for i, s in self._seen.items() if max(s.since, self._work_since) < cutoff]
            for i, _ in stuck:
                del self._seen[i]
            return stuck


class Watchdog:
    """A thread that aborts a connection whose daemon has been silent for ``timeout_s`` while
    ``waiting(channel)`` says snapshots are pending on it."""

    def __init__(
        self, timeout_s: float, channel: Callable[[], Channel | None], waiting: Callable[[Channel], bool]
    ) -> None:
        self.timeout_s = timeout_s
        self._channel = channel
        self._waiting = waiting
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ckptd-client-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tick = min(1.0, max(0.05, self.timeout_s / 5))
        while not self._stop.wait(tick):
            channel = self._channel()
            if channel is not None and not channel.closed:
                self.check(channel)

    def check(self, channel: Channel) -> None:
        silent_s = time.monotonic() - channel.last_frame
        if silent_s <= self.timeout_s or not self._waiting(channel) or channel.has_unread():
            return
        pid = channel.welcome.pid
        log.error("ckptd pid %s sent nothing for %.1f s; giving up on it", pid, silent_s)
        channel.abort(
            f"ckptd (pid {pid}) sent nothing for {silent_s:.1f} s (liveness_timeout_s="
            f"{self.timeout_s:g}): it is stopped, hung or starved of CPU",
            code="daemon_unresponsive",
        )

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
