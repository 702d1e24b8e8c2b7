"""Heartbeats: the daemon's event loop tells each client, about once a second, that it lives and
how far that client's snapshots have got.

The frame is sent from the loop, with progress the writer threads record chunk by chunk
(``Job.progress_bytes``), so it keeps coming while a write is stuck in the kernel (a hung NFS
mount): the client tells a stopped or hung daemon (silence) from stuck storage (heartbeats whose
progress does not move) and fails its waits with the right error instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from ckptd.daemon.pipeline import Job
from ckptd.protocol import Heartbeat, JobProgress, Message

log = logging.getLogger(__name__)

#: Seconds between two heartbeats; clients wait many of them (``liveness_timeout_s``) before
#: declaring the daemon unresponsive.
HEARTBEAT_INTERVAL_S = 1.0


class Peer(Protocol):
    """What the sender needs of a connection."""

    @property
    def greeted(self) -> bool: ...  # past hello: the client expects frames other than Welcome

    def send(self, message: Message) -> None: ...


class Progress(Protocol):
    """What the sender needs of the pipeline."""

    def jobs(self) -> list[Job]: ...

    def work(self) -> int: ...


def beat(peers: Iterable[Peer], pipeline: Progress) -> None:
    """Send one heartbeat to every greeted connection, with its own snapshots in flight."""
    jobs = pipeline.jobs()
    work = pipeline.work()
    for peer in peers:
        if not peer.greeted:
            continue
        mine = [
            JobProgress(id=j.request.id, stage=j.stage, bytes_written=j.progress_bytes)
            for j in jobs
            if j.reply == peer.send  # a job replies on the connection that sent it
        ]
        peer.send(Heartbeat(work=work, jobs=mine))


async def send_heartbeats(
    peers: Callable[[], Iterable[Peer]], pipeline: Progress, interval_s: float = HEARTBEAT_INTERVAL_S
) -> None:
    """Run on the daemon's event loop until cancelled: if the loop wedges, heartbeats stop."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            beat(peers(), pipeline)
        except Exception:  # a heartbeat must never take the daemon down
            log.exception("sending heartbeats failed")
