"""Whether the daemon is alive, as ``GET /healthz`` reports it: its event loop runs and its writer
threads answer.

A task on the event loop (``watch``) notes every ``TICK_S`` that the loop ran, and hands the
writer pool a no-op; the pool *answers* when that no-op has run, or when a snapshot's bytes move
(a pool busy writing large shards is alive). ``report`` is read from the HTTP thread, so a stalled
loop is reported, not waited on. A snapshot stuck while other writers answer is not a dead daemon:
its client is told (``daemon_stuck``) and the daemon serves on.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import Future
from typing import Protocol

#: Seconds between two ticks of the watcher on the event loop.
TICK_S = 0.5
#: The loop is stalled once it has not run for this long (heartbeats are due every second).
LOOP_STALL_S = 10.0
#: The writers are wedged once none has answered, nor written a byte, for this long.
WRITER_STALL_S = 60.0


class Writers(Protocol):
    """What the watcher needs of the pipeline."""

    def work(self) -> int: ...  # grows whenever a snapshot moves (event loop)

    def ping_writers(self) -> Future[None]: ...  # a no-op run by the writer pool


class Health:
    def __init__(self, writers: Writers) -> None:
        self._writers = writers
        now = time.monotonic()
        self._loop_seen = now
        self._writers_seen = now
        self._work = -1
        self._probe: Future[None] | None = None

    async def watch(self) -> None:
        """Run on the event loop until cancelled."""
        while True:
            self.tick()
            await asyncio.sleep(TICK_S)

    def tick(self) -> None:
        now = time.monotonic()
        self._loop_seen = now
        work = self._writers.work()
        if work != self._work:
            self._work, self._writers_seen = work, now
        if self._probe is not None and self._probe.done():
            self._probe, self._writers_seen = None, now
        if self._probe is None:
            try:
                self._probe = self._writers.ping_writers()
            except RuntimeError:  # the pool is shut down: the daemon is stopping
                pass

    def loop_lag_s(self) -> float:
        """Seconds since the event loop last ran the watcher, beyond its tick."""
        return max(0.0, time.monotonic() - self._loop_seen - TICK_S)

    def report(self) -> tuple[bool, dict[str, object]]:
        """``(healthy, body)``, safe to call from any thread."""
        now = time.monotonic()
        loop_idle = now - self._loop_seen
        writers_idle = now - self._writers_seen
        reasons = []
        if loop_idle > LOOP_STALL_S:
            reasons.append(
                f"the event loop has not run for {loop_idle:.1f} s (bound {LOOP_STALL_S:g} s): "
                "clients get no replies or heartbeats; py-spy dump --pid shows where it is stuck"
            )
        elif writers_idle > WRITER_STALL_S:  # (with the loop stalled, the writers were not asked)
            reasons.append(
                f"no writer thread has answered or written a byte for {writers_idle:.1f} s "
                f"(bound {WRITER_STALL_S:g} s): every writer is blocked, most likely in a write "
                "to a hung filesystem under the checkpoint root"
            )
        body: dict[str, object] = {
            "status": "unhealthy" if reasons else "ok",
            "pid": os.getpid(),
            "loop_lag_s": round(max(0.0, loop_idle - TICK_S), 3),
            "writers_idle_s": round(writers_idle, 3),
        }
        if reasons:
            body["reasons"] = reasons
        return not reasons, body
