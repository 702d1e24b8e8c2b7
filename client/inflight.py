"""The records of a snapshot handed to the daemon: what it asks, and where its bytes are."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import JsonValue

from ckptd.protocol import encode_snapshot
from client.arena import Arena
from client.channel import Channel
from client.handle import SnapshotHandle
from client.plan import Plan


@dataclass(frozen=True)
class Request:
    """What a snapshot asks of the daemon, minus its id (a resubmission gets a new one)."""

    run: str
    step: int
    arena: Arena
    plan: Plan
    tree: JsonValue
    files: dict[str, str]
    blobs: dict[str, bytes] = field(default_factory=dict)
    keep_last: int | None = None
    part: dict[str, object] | None = None  # under torchrun: rank, world_size, job, owned shards
    keep_steps: tuple[int, ...] = ()  # steps retention keeps (the Trainer's best)

    def frame(self, snapshot_id: int, ready: int | None = None) -> bytes:
        return encode_snapshot(
            snapshot_id,
            self.run,
            self.step,
            self.arena.id,
            self.plan.layout_id,
            self.tree,
            self.files,
            ready,
            blobs=self.blobs,
            keep_last=self.keep_last,
            part=self.part,
            keep_steps=self.keep_steps,
        )


@dataclass(frozen=True)
class InFlight:
    """A snapshot handed to the daemon: its bytes stay in its arena until the outcome is known."""

    handle: SnapshotHandle
    request: Request
    frame: bytes  # the encoded request, with this handle's id
    generation: int  # the arena's use count when this snapshot was copied into it
    channel: Channel  # the connection it was sent on: only that connection's loss fails it
