"""The arena slots of a client: which are free, which hold a snapshot in flight, and which are
quarantined because a daemon may still be reading them.

A slot is busy from the moment a snapshot is copied into it until the daemon reports the outcome.
If the connection is lost first, the slot is *quarantined*: it stays busy until the client knows
the daemon no longer reads it (a different daemon instance answers, or the same one no longer
lists the snapshot as in flight). Freeing it earlier would let the next snapshot overwrite bytes
that the still-running daemon is writing, committing a torn checkpoint.

A slot whose snapshot was lost that way is also *kept*: it holds the only copy of a snapshot that
may never be committed, so new snapshots use other slots until ``resubmit()`` takes it again or
``discard_lost()`` drops it (or the step turns out committed after all). When every slot is kept,
``acquire`` says so instead of overwriting one.
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
_WAIT_S = 1.0  # re-check at least this often while blocked (outcomes also notify)


@dataclass(frozen=True)
class Quarantine:
    run: str
    step: int
    instance: str  # the daemon instance that may still read the slot
    copied: Callable[[], bool]  # False while a copy (device to host) may still be writing it
    # The connection its request went on (Channel.token): until the daemon has read that one to
    # its end, the request may still be in the socket, not yet a job it lists.
    connection: str = ""


class SlotPool:
    def __init__(self, count: int, release_remote: Callable[[Arena], None]) -> None:
        self.cond = threading.Condition()
        self.arenas: list[Arena] = []
        self._count = count
        self._release_remote = release_remote  # tells the daemon an arena is gone
        self._kept: dict[int, str] = {}  # arena id -> the lost snapshot it holds ("step N of run R")
        self._dropped: list[Arena] = []  # replaced under the lock; the daemon is told after it

    def acquire(
        self, nbytes: int, policy: Policy, reap: Callable[[], CheckpointError | None]
    ) -> Arena | None:
        """A free slot of at least ``nbytes`` (made or grown as needed), or None for ``skip``.

        ``reap`` is called (without the lock) while quarantined or kept slots might be freed; it
        returns why none can come free (the daemon is gone or stuck), which ``block`` raises once
        no slot is in flight any more. A pool whose every slot is kept raises for any policy."""
        try:
            return self._acquire(nbytes, policy, reap)
        finally:
            with self.cond:
                dropped, self._dropped = self._dropped, []
            self._tell_dropped(dropped)  # a send: never while holding the lock

    def _acquire(
        self, nbytes: int, policy: Policy, reap: Callable[[], CheckpointError | None]
    ) -> Arena | None:
        reaped = False
        hopeless: CheckpointError | None = None
        while True:
            with self.cond:
                arena = self._take(nbytes)
                if arena is not None:
                    return arena
                # Every slot is busy: in flight, quarantined, or kept for a lost snapshot.
                quarantined = any(a.quarantine is not None for a in self.arenas)
                in_flight = any(a.quarantine is None and a.id not in self._kept for a in self.arenas)
                held = quarantined or bool(self._kept)
                if reaped or not held:
                    if not in_flight and not quarantined:
                        raise self._all_kept()
                    if policy == "skip":
                        return None
                    if policy == "error":
                        raise CheckpointError(
                            f"all {len(self.arenas)} arena slots are still being written; wait, use "
                            "policy='block' or 'skip', or raise slots=",
                            code="busy",
                        )
                    if hopeless is not None and not in_flight:
                        raise hopeless
                    self.cond.wait(_QUARANTINE_POLL_S if held else _WAIT_S)
                    if not held:
                        continue
            hopeless = reap()
            reaped = True

    def _all_kept(self) -> CheckpointError:
        held = ", ".join(self._kept.values())
        return CheckpointError(
            f"every one of the {len(self.arenas)} arena slots holds a snapshot lost with its "
            f"connection to ckptd ({held}); call client.resubmit() to send them to the daemon, or "
            "client.discard_lost() to drop them, then snapshot again (or connect with more slots=)",
            code="lost_snapshots",
        )

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
            self._kept.pop(arena.id, None)
            self.cond.notify_all()

    def quarantine(self, arena: Arena, q: Quarantine) -> None:
        """Keep a busy slot busy until ``release_quarantined`` (a slot freed meanwhile stays free)."""
        with self.cond:
            if arena.busy:
                arena.quarantine = q
                self.cond.notify_all()

    def lose(self, arena: Arena, q: Quarantine, what: str) -> None:
        """``quarantine`` and ``keep`` at once: no reap in between may free the slot."""
        with self.cond:
            if arena.busy:
                arena.quarantine = q
                self._kept[arena.id] = what
                self.cond.notify_all()

    def keep(self, arena: Arena, what: str) -> None:
        """Keep a busy slot for the lost snapshot it holds until ``claim`` or ``discard``."""
        with self.cond:
            if arena.busy:
                self._kept[arena.id] = what
                self.cond.notify_all()

    def discard(self, arena: Arena, *, read_done: bool = False) -> None:
        """Drop the lost snapshot a kept slot holds: the slot is free once no daemon may read it
        (at once with ``read_done``: the daemon is known to be done with it)."""
        with self.cond:
            if self._kept.pop(arena.id, None) is None:
                return
            if read_done:
                arena.quarantine = None
            if arena.quarantine is None:
                arena.busy = False
            self.cond.notify_all()

    def release_quarantined(self, done: Callable[[Quarantine], bool]) -> None:
        """Lift the quarantine of slots for which ``done`` says the daemon no longer reads them;
        those not kept for a lost snapshot are free again."""
        with self.cond:
            for a in self.arenas:
                q = a.quarantine
                if q is not None and q.copied() and done(q):
                    log.info("[run=%s step=%s] slot released: the daemon no longer reads it", q.run, q.step)
                    a.busy = a.id in self._kept
                    a.quarantine = None
                    self.cond.notify_all()

    def claim(self, arena: Arena, generation: int) -> bool:
        """Take a kept slot again for the resubmission of the snapshot copied at ``generation``,
        once no daemon may still read it."""
        with self.cond:
            if (
                arena not in self.arenas
                or arena.generation != generation
                or arena.id not in self._kept
                or arena.quarantine is not None
            ):
                return False
            del self._kept[arena.id]
            return True

    def busy_count(self) -> int:
        with self.cond:
            return sum(a.busy for a in self.arenas)

    def _drop(self, arena: Arena) -> None:
        self.arenas.remove(arena)
        self._dropped.append(arena)

    def _tell_dropped(self, arenas: list[Arena]) -> None:
        for arena in arenas:
            self._release_remote(arena)
            arena.close()

    def close(self) -> None:
        with self.cond:
            for arena in list(self.arenas):
                self._drop(arena)
            dropped, self._dropped = self._dropped, []
        self._tell_dropped(dropped)
