"""The arena slots of a client: which are free, which hold a snapshot in flight, and which are
quarantined because a daemon may still be reading them.

A slot is busy from the moment a snapshot is copied into it until the daemon reports the outcome.
If the connection is lost first, the slot is *quarantined*: it stays busy until the client knows
the daemon no longer reads it (a different daemon instance answers, or the same one no longer
lists the snapshot as in flight). Freeing it earlier would let the next snapshot overwrite bytes
that the still-running daemon is writing, committing a torn checkpoint.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ckptd.layout import round_up
from client.arena import Arena
from client.errors import CheckpointError

log = logging.getLogger(__name__)
Policy = Literal["block", "skip", "error"]
_ARENA_ROUND = 2 * 2**20
_QUARANTINE_POLL_S = 0.2


@dataclass(frozen=True)
class Quarantine:
    run: str
    step: int
    instance: str  # the daemon instance that may still read the slot
    copied: Callable[[], bool]  # False while a copy (device to host) may still be writing it


class SlotPool:
    def __init__(self, count: int, release_remote: Callable[[Arena], None]) -> None:
        self.cond = threading.Condition()
        self.arenas: list[Arena] = []
        self._count = count
        self._release_remote = release_remote  # tells the daemon an arena is gone

    def acquire(self, nbytes: int, policy: Policy, reap: Callable[[], None]) -> Arena | None:
        """A free slot of at least ``nbytes`` (made or grown as needed), or None for ``skip``.

        ``reap`` is called (without the lock) while quarantined slots might be freed."""
        reaped = False
        while True:
            with self.cond:
                arena = self._take(nbytes)
                if arena is not None:
                    return arena
                quarantined = any(a.quarantine is not None for a in self.arenas)
                if not (quarantined and not reaped) and policy == "skip":
                    return None
                if not (quarantined and not reaped) and policy == "error":
                    raise CheckpointError(
                        f"all {len(self.arenas)} arena slots are still being written; wait, use "
                        "policy='block' or 'skip', or raise slots=",
                        code="busy",
                    )
                if not quarantined:
                    self.cond.wait()
                    continue
                if reaped:
                    self.cond.wait(_QUARANTINE_POLL_S)
            reap()
            reaped = True

    def _take(self, nbytes: int) -> Arena | None:
        free = [a for a in self.arenas if not a.busy]
        fit = next((a for a in free if a.size >= nbytes), None)
        if fit is None and (free or len(self.arenas) < self._count):
            if len(self.arenas) >= self._count:
                self._drop(free[0])  # too small for this snapshot: replace it
            fit = Arena(round_up(nbytes, _ARENA_ROUND))
            self.arenas.append(fit)
        if fit is not None:
            fit.busy = True
            fit.quarantine = None
            fit.generation += 1
        return fit

    def free(self, arena: Arena) -> None:
        with self.cond:
            arena.busy = False
            arena.quarantine = None
            self.cond.notify_all()

    def quarantine(self, arena: Arena, q: Quarantine) -> None:
        """Keep a busy slot busy until ``release_quarantined`` (a slot freed meanwhile stays free)."""
        with self.cond:
            if arena.busy:
                arena.quarantine = q

    def release_quarantined(self, done: Callable[[Quarantine], bool]) -> None:
        """Free quarantined slots for which ``done`` says the daemon no longer reads them."""
        with self.cond:
            for a in self.arenas:
                q = a.quarantine
                if q is not None and q.copied() and done(q):
                    log.info("[run=%s step=%s] slot released: the daemon no longer reads it", q.run, q.step)
                    a.busy = False
                    a.quarantine = None
                    self.cond.notify_all()

    def claim(self, arena: Arena, generation: int) -> bool:
        """Take ``arena`` again for a resubmission if nothing reused it since ``generation``."""
        with self.cond:
            if arena not in self.arenas or arena.generation != generation or arena.busy:
                return False
            arena.busy = True
            return True

    def busy_count(self) -> int:
        with self.cond:
            return sum(a.busy for a in self.arenas)

    def _drop(self, arena: Arena) -> None:
        self.arenas.remove(arena)
        self._release_remote(arena)
        arena.close()

    def close(self) -> None:
        with self.cond:
            for arena in list(self.arenas):
                self._drop(arena)
