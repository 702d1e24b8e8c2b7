"""The wire protocol between a training process and the daemon.

A Unix stream socket carries frames: a 4-byte big-endian length, then one JSON message. Every
message is a frozen pydantic model with a ``kind`` tag, validated strictly (``extra="forbid"``).
Tensor bytes never travel here: they sit in memfd arenas whose descriptors are passed once, with
the ``RegisterArena`` frame, as SCM_RIGHTS ancillary data. Nothing is pickled.

Client → daemon: Hello, RegisterArena (+ fd), RegisterLayout, Snapshot, Staged, Abandon,
ReleaseArena, StatusRequest, StopRequest.
Daemon → client: Welcome, Accepted, Progress, Committed, Failed, StatusReply, Heartbeat, Stopping.
A snapshot's slot in its arena is free again once its Committed or Failed arrives.

After its Welcome, the daemon's event loop sends every connection a ``Heartbeat`` about once a
second, with the progress of that connection's snapshots in flight. It comes from the loop, not
from the writer threads, so it goes on while writes are stuck: silence means the daemon is
stopped or hung, a heartbeat whose progress does not move means its storage is stuck.

A client may stream a large snapshot (``Client.connect(stream=True)``): its ``Snapshot`` is sent
before its tensors are copied, with ``ready`` 0, and ``Staged`` frames then say how far into the
slot the copy has got, so the daemon writes the first shards while the rest is still being
copied. It commits only once ``ready`` covers every shard; a connection that closes first, an
``Abandon``, or a copy not whole within ``--stage-timeout`` discards it. One streamed snapshot
at a time per connection.

The layout of a snapshot (components, shards, tensor names, dtypes, shapes, offsets) is the same
from one snapshot to the next while the model does not change, and with 20,000 tensors it is most
of a request. A client registers it once per connection (``RegisterLayout``) and its snapshots
name it (``Snapshot.layout``); the daemon validates it and encodes its shard headers and index
files once. A ``Snapshot`` may instead carry its ``components`` inline. A layout larger than
``LAYOUT_PART_BYTES`` (protocol 4) is sent as consecutive ``RegisterLayout`` parts of at most
``LAYOUT_PART_TENSORS`` tensors, all but the last with ``more``; a part's first component
continues the previous part's last one when it has the same name, and its first shard continues
that component's last shard when ``continues_shard`` is set. Each part is decoded in a few
milliseconds, so no one client's layout holds the daemon's event loop.

Protocol 5: a rank of a ``torchrun`` job sends its part of a step as a ``Snapshot`` with
``world_size`` > 1, its ``rank``, the job's uid (``job``) and the shards it copied (``owned``);
the daemon commits the step once every rank's part is durable and replies ``Committed`` (or the
same ``Failed``, naming the rank that failed or the ranks missing) to every rank
(``ckptd/daemon/parts.py``). A rank of a sharded job (FSDP2) sends ``pieces`` instead of
``owned``: the byte ranges of the step's consolidated files its slot holds (an older daemon refuses
the field).

Protocol 6: a component of non-contiguous DTensors (``Shard(1)``, 2-D meshes) is laid out as one
shard per writing rank (``ShardEntry.rank``), each tensor a block with its global ``offset``; the
daemon writes them as per-rank files whose headers carry ``DCP_SHARDING_INFO``.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import Base64Bytes, BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError

PROTOCOL_VERSION = 6
#: Largest frame either side accepts; a 20,000-tensor snapshot request is a few MB.
MAX_FRAME_BYTES = 64 * 2**20
#: A layout whose components serialize to more than this is sent in parts of at most
#: ``LAYOUT_PART_TENSORS`` tensors (a part is decoded in about 10 ms).
LAYOUT_PART_BYTES = 192 * 2**10
LAYOUT_PART_TENSORS = 2048
_LEN = struct.Struct(">I")


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


# --- client → daemon ---------------------------------------------------------------------------


class Hello(Message):
    kind: Literal["hello"] = "hello"
    version: int
    pid: int
    root: str | None = None  # the root the client expects; None takes the daemon's
    # Names this connection in StatusReply.connections, so a client that lost it can tell when
    # the daemon has read everything it sent there (a lost snapshot's slot is free only then).
    token: str = ""
    # An operator's connection (``ckptd status``, ``ckptd stop``) is not counted as a client.
    role: Literal["client", "operator"] = "client"


class RegisterArena(Message):
    """Sent with exactly one file descriptor: a sealed memfd of ``size`` bytes."""

    kind: Literal["register_arena"] = "register_arena"
    arena: int
    size: int


class ReleaseArena(Message):
    kind: Literal["release_arena"] = "release_arena"
    arena: int


class TensorEntry(Message):
    name: str
    dtype: str
    shape: list[int]
    start: int  # relative to the shard's data section
    end: int
    # Of a per-rank file (protocol 6): this block's offset in the full tensor (DCP's saved_offsets).
    offset: list[int] | None = None


class ShardEntry(Message):
    offset: int  # of the data section in the arena
    nbytes: int
    tensors: list[TensorEntry]
    # Protocol 6: the rank whose per-rank file this shard is (non-contiguous DTensors); every
    # shard of such a component has one, and each of its tensors an ``offset``.
    rank: int | None = None


class ComponentEntry(Message):
    name: str
    shards: list[ShardEntry]
    aliases: dict[str, str] = {}  # tied name -> stored name
    # A Hugging Face model with a config: its directory is laid out as ``save_pretrained`` does.
    pretrained: bool = False
    parameters: int | None = None  # a module's parameter count: ``total_parameters`` of its index


class RegisterLayout(Message):
    """A layout that later snapshots on this connection refer to by ``layout``."""

    kind: Literal["register_layout"] = "register_layout"
    layout: int
    components: list[ComponentEntry]
    more: bool = False  # a part: more parts of this layout follow
    continues_shard: bool = False  # the first shard continues the previous part's last shard


class Snapshot(Message):
    kind: Literal["snapshot"] = "snapshot"
    id: int
    run: str
    step: int
    arena: int
    layout: int | None = None  # a registered layout; or None and ``components`` inline
    components: list[ComponentEntry] = []
    tree: JsonValue
    # Small text files, e.g. config.json: a plain name is the model's (the top of the step
    # directory), ``<component>/<name>`` another component's (``layout.small_file``).
    files: dict[str, str] = {}
    # Small files as bytes, base64 on the wire (protocol 5): tokenizer and processor files,
    # trainer_state.json. Keyed and written like ``files``; bounded by ``ckptd.daemon.validate``
    # (MAX_FILES_BYTES per snapshot, and daemon-wide while held).
    blobs: dict[str, Base64Bytes] = {}
    rank: int = 0
    world_size: int = 1
    ready: int | None = None  # bytes of the slot already copied (streamed); None: all of it
    # Committed steps of this run to keep once this one is committed (protocol 5); None: the
    # daemon's --keep-last. Retention as ever: committed steps only, never the newest.
    keep_last: int | None = None
    # Committed steps retention keeps whatever keep_last says (protocol 5): the Trainer's best.
    keep_steps: list[int] = []
    # A rank's part of a multi-rank step (protocol 5; ``world_size`` > 1): the job all its ranks
    # share (drawn by rank 0 at connect), the shards of the layout this rank copied and the daemon
    # writes (global indexes, every component's shards in order), and how long the daemon waits
    # for the other ranks' parts before the step fails (seconds, from the first part).
    job: str = ""
    owned: list[int] | None = None
    commit_timeout_s: float = 120.0
    # A rank's part of a sharded step (FSDP2 ``Shard(0)`` DTensors), instead of ``owned``: the
    # byte ranges its slot holds, back to back, and where each goes in the step's consolidated
    # files: ``(global shard index, start in that shard's data section, bytes, slot offset)``.
    # The ranks' pieces tile every shard's data exactly once (checked before a byte is written).
    pieces: list[tuple[int, int, int, int]] | None = None
    # The daemons (nodes) that write the job's parts into one shared root (protocol 6): with more
    # than one, the daemons agree through the step's temp directory (``ckptd/shared.py``).
    nodes: int = 1


class Staged(Message):
    """The first ``ready`` bytes of snapshot ``id``'s slot are copied (they only grow)."""

    kind: Literal["staged"] = "staged"
    id: int
    ready: int


class Abandon(Message):
    """The client could not finish copying snapshot ``id``: discard it."""

    kind: Literal["abandon"] = "abandon"
    id: int


class StatusRequest(Message):
    kind: Literal["status"] = "status"


class StopRequest(Message):
    """Stop the daemon (``ckptd stop``): stop accepting, drain in-flight snapshots, exit; with
    ``now``, exit at once (in-flight snapshots fail, their temp directories are swept at the next
    start). Answered with ``Stopping``; the connection then stays open until the drain is over."""

    kind: Literal["stop"] = "stop"
    now: bool = False


ClientMessage = Annotated[
    Hello
    | RegisterArena
    | RegisterLayout
    | ReleaseArena
    | Snapshot
    | Staged
    | Abandon
    | StatusRequest
    | StopRequest,
    Field(discriminator="kind"),
]

# --- daemon → client ---------------------------------------------------------------------------


class Welcome(Message):
    kind: Literal["welcome"] = "welcome"
    version: int
    pid: int
    instance: str  # random per daemon start: a different one means the old daemon is gone
    root: str
    max_shard_size: int
    max_arenas: int  # arenas one connection may register
    node: str = ""  # the daemon's node id among those sharing its root (ckptd/nodes.py)


class Accepted(Message):
    kind: Literal["accepted"] = "accepted"
    id: int


class Progress(Message):
    kind: Literal["progress"] = "progress"
    id: int
    stage: str
    bytes_written: int


class Committed(Message):
    kind: Literal["committed"] = "committed"
    id: int
    run: str
    step: int
    path: str
    bytes: int
    checksums: dict[str, str]
    timings: dict[str, float]


class Failed(Message):
    """A snapshot (``id``) or the connection itself (``id`` None) failed."""

    kind: Literal["failed"] = "failed"
    id: int | None
    code: str
    message: str
    errno: int | None = None


class JobStatus(Message):
    run: str
    step: int
    stage: str
    bytes: int
    bytes_written: int
    age_s: float


class StatusReply(Message):
    kind: Literal["status_reply"] = "status_reply"
    pid: int
    root: str
    uptime_s: float
    clients: int
    arenas: int
    arena_bytes: int
    committed: int
    failed: int
    bytes_written: int
    jobs: list[JobStatus]
    # Tokens of the connections the daemon still reads (not yet at end of stream).
    connections: list[str] = []


class JobProgress(Message):
    id: int  # the snapshot's id on this connection
    stage: str
    bytes_written: int  # of its shards so far, counted per written chunk


class Heartbeat(Message):
    """The daemon's loop is alive; how far this connection's snapshots have got."""

    kind: Literal["heartbeat"] = "heartbeat"
    #: Grows whenever any snapshot of the daemon moves (bytes written, a stage passed): a job
    #: queued behind another's slow write is waiting, not stuck, while this moves.
    work: int
    jobs: list[JobProgress]


class Stopping(Message):
    """The daemon took a ``StopRequest``: ``in_flight`` snapshots are drained before it exits."""

    kind: Literal["stopping"] = "stopping"
    pid: int
    in_flight: int


DaemonMessage = Annotated[
    Welcome | Accepted | Progress | Committed | Failed | StatusReply | Heartbeat | Stopping,
    Field(discriminator="kind"),
]

_client_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
_daemon_adapter: TypeAdapter[DaemonMessage] = TypeAdapter(DaemonMessage)


class ProtocolError(ValueError):
    """A frame that is too large, malformed, or not a known message."""


def encode(message: Message) -> bytes:
    body = message.model_dump_json().encode()
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_FRAME_BYTES}-byte frame limit")
    return _LEN.pack(len(body)) + body


def encode_register_layout(layout: int, components_json: bytes) -> bytes:
    """The ``RegisterLayout`` frame, or consecutive frames of its parts for a large layout,
    around pre-serialized components (cached per layout by the client). The daemon validates
    them like any other frame."""
    if len(components_json) > LAYOUT_PART_BYTES:
        return encode_register_layout_parts(layout, json.loads(components_json))
    head = json.dumps({"kind": "register_layout", "layout": layout})
    return _frame(b"".join((head[:-1].encode(), b',"components":', components_json, b"}")), "layout")


def encode_layout(layout: int, components: list[dict[str, Any]]) -> bytes:
    """``encode_register_layout`` of the wire form of ``list[ComponentEntry]`` (plain dicts): one
    frame, or parts made from the dicts themselves (never parsed back from JSON)."""
    whole = json.dumps(components, separators=(",", ":")).encode()
    if len(whole) > LAYOUT_PART_BYTES:
        del whole
        return encode_register_layout_parts(layout, components)
    return encode_register_layout(layout, whole)


def encode_register_layout_parts(layout: int, components: list[dict[str, Any]]) -> bytes:
    """``RegisterLayout`` parts of the wire form of ``list[ComponentEntry]`` (plain dicts), for a
    caller that has not serialized it (saves parsing it back)."""
    return b"".join(_layout_parts(layout, components))


def _layout_parts(layout: int, components: list[dict[str, Any]]) -> Iterator[bytes]:
    """Frames of at most ``LAYOUT_PART_TENSORS`` tensors each, split inside a shard if need be."""
    part: list[dict[str, Any]] = []
    count, continues = 0, False

    def frame(more: bool) -> bytes:
        fields = {
            "kind": "register_layout",
            "layout": layout,
            "components": part,
            "more": more,
            "continues_shard": continues,
        }
        return _frame(json.dumps(fields, separators=(",", ":")).encode(), "layout part")

    for c in components:
        piece: dict[str, Any] = {"name": c["name"], "shards": [], "aliases": c.get("aliases", {})}
        piece.update((k, c[k]) for k in ("pretrained", "parameters") if k in c)  # the first piece's
        part.append(piece)
        for shard in c["shards"]:
            tensors, start = shard["tensors"], 0
            while True:
                take = min(len(tensors) - start, LAYOUT_PART_TENSORS - count)
                piece["shards"].append({**shard, "tensors": tensors[start : start + take]})
                count, start = count + take, start + take
                if start >= len(tensors):
                    break
                yield frame(more=True)  # full inside this shard: the next part continues it
                piece = {"name": c["name"], "shards": [], "aliases": {}}
                part, count, continues = [piece], 0, True
            if count >= LAYOUT_PART_TENSORS:
                yield frame(more=True)
                piece = {"name": c["name"], "shards": [], "aliases": {}}
                part, count, continues = [piece], 0, False
    yield frame(more=False)


def encode_snapshot(  # noqa: PLR0917 - the fields of one frame
    snapshot_id: int,
    run: str,
    step: int,
    arena: int,
    layout: int,
    tree: JsonValue,
    files: dict[str, str],
    ready: int | None = None,
    *,
    blobs: Mapping[str, bytes] | None = None,
    keep_last: int | None = None,
    part: dict[str, object] | None = None,
    keep_steps: Sequence[int] = (),
) -> bytes:
    """A ``Snapshot`` frame naming a registered layout (streamed when ``ready`` is given);
    ``part`` holds the multi-rank fields (``rank``, ``world_size``, ``job``, ``owned`` or
    ``pieces``, ``commit_timeout_s``)."""
    fields: dict[str, object] = {
        "kind": "snapshot",
        "id": snapshot_id,
        "run": run,
        "step": step,
        "arena": arena,
        "layout": layout,
        "tree": tree,
        "files": files,
    }
    if ready is not None:
        fields["ready"] = ready
    if keep_last is not None:
        fields["keep_last"] = keep_last
    if keep_steps:
        fields["keep_steps"] = list(keep_steps)
    if part:
        fields.update(part)
    body = json.dumps(fields, allow_nan=False, separators=(",", ":")).encode()
    if blobs:  # spliced in as JSON already encoded: a tokenizer unchanged since is not again
        parts = [body[:-1], b',"blobs":{']
        for i, (name, data) in enumerate(blobs.items()):
            parts += [b"," if i else b"", json.dumps(name).encode(), b":", _blob_json(data)]
        body = b"".join([*parts, b"}}"])
    return _frame(body, "snapshot request")


#: Blobs of at least this size keep their encoded form (``_blob_json``), up to ``_BLOB_CACHE_BYTES``
#: of them together (a Gemma 3 tokenizer is 38 MB).
_BLOB_CACHE_MIN = 64 * 2**10
_BLOB_CACHE_BYTES = 128 * 2**20
_blob_cache: dict[int, tuple[bytes, bytes]] = {}  # id(data) -> (data, its JSON string)
_blob_lock = threading.Lock()


def _blob_json(data: bytes) -> bytes:
    """``data`` as a JSON string of its base64. A large one is cached by identity (the cache holds
    the bytes object, so the id is not reused while it is cached): the same processor files
    snapshotted again cost nothing; the oldest go first beyond ``_BLOB_CACHE_BYTES``."""
    if len(data) < _BLOB_CACHE_MIN or not isinstance(data, bytes):
        return b'"' + base64.b64encode(data) + b'"'
    with _blob_lock:
        hit = _blob_cache.get(id(data))
        if hit is not None and hit[0] is data:
            return hit[1]
    encoded = b'"' + base64.b64encode(data) + b'"'
    with _blob_lock:
        _blob_cache[id(data)] = (data, encoded)
        while sum(len(d) for d, _ in _blob_cache.values()) > _BLOB_CACHE_BYTES and len(_blob_cache) > 1:
            del _blob_cache[next(iter(_blob_cache))]
    return encoded


def _frame(body: bytes, what: str) -> bytes:
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"{what} of {len(body)} bytes exceeds the {MAX_FRAME_BYTES}-byte frame limit")
    return _LEN.pack(len(body)) + body


def decode_client(body: bytes) -> ClientMessage:
    try:
        return _client_adapter.validate_json(body, strict=True)
    except ValidationError as e:
        raise ProtocolError(f"invalid client message: {_summary(e)}") from e


def decode_daemon(body: bytes) -> DaemonMessage:
    try:
        return _daemon_adapter.validate_json(body, strict=True)
    except ValidationError as e:
        raise ProtocolError(f"invalid daemon message: {_summary(e)}") from e


def _summary(e: ValidationError) -> str:
    errs = e.errors(include_url=False)[:3]
    return "; ".join(f"{'.'.join(map(str, x['loc'])) or '<frame>'}: {x['msg']}" for x in errs)


class FrameReader:
    """Splits a byte stream into frame bodies; refuses frames over the size limit."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame_bytes

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames = []
        while len(self._buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buf)
            if n > self._max:
                raise ProtocolError(f"frame of {n} bytes exceeds the {self._max}-byte limit")
            if len(self._buf) < _LEN.size + n:
                break
            frames.append(bytes(self._buf[_LEN.size : _LEN.size + n]))
            del self._buf[: _LEN.size + n]
        return frames

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)
