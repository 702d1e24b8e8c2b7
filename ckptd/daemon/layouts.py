"""A snapshot layout, checked and prepared once: shard headers and index files encoded.

A client registers its layout once per connection and every snapshot of an unchanged model
reuses it, so the per-tensor work (validation, safetensors headers, the index's weight map) is
not repeated per snapshot on the daemon's event loop.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ckptd.daemon.rows import ComponentRows, PreparedComponent, ShardRows, ShardSpan, shard_rows
from ckptd.daemon.validate import InvalidRequest, check_components
from ckptd.layout import ALIGN, ComponentFiles, component_files, rank_files, round_up
from ckptd.perrank import sharding_metadata
from ckptd.protocol import RegisterLayout
from ckptd.shardfile import METADATA, HeaderEntry, encode_header

#: Layouts one connection keeps registered, and the tensors and aliases in them (and in a
#: layout whose parts are arriving) all together; registering more forgets the oldest (a client
#: only ever uses the layout it registered last). Every shard holds a tensor and every component
#: a shard, so shards and components are bounded by the same count.
MAX_LAYOUTS = 16
MAX_LAYOUT_TENSORS = 2_000_000
#: Tensors and aliases in the layouts of all connections together, parts in progress included:
#: many clients cannot exhaust the daemon's memory with layouts either.
MAX_DAEMON_LAYOUT_TENSORS = 8_000_000
#: Tensors of a shard header JSON-encoded in one call: one ``json.dumps`` of a 700,000-entry
#: header holds the GIL (and so the daemon's event loop) for seconds.
HEADER_SLICE_TENSORS = 4096
_WHAT_TO_DO = "snapshot fewer, larger tensors (e.g. flatten many small buffers into one)"


@dataclass(frozen=True)
class PreparedLayout:
    """Held as encoded bytes and a few spans: no per-tensor objects for the collector to visit."""

    components: tuple[PreparedComponent, ...]
    headers: tuple[tuple[bytes, ...], ...]  # per component, per shard
    indexes: tuple[bytes | None, ...]  # per component, its index text (None: one shard, no index)
    nbytes: int  # tensor bytes a snapshot of this layout writes
    tensors: int  # tensor and alias entries, for the limits
    end: int  # where the last shard's data ends in the slot: a streamed snapshot is whole there


def entries(components: Sequence[ComponentRows]) -> int:
    """What a layout counts against the limits: its tensors and aliases."""
    return sum(len(s.tensors) for c in components for s in c.shards) + sum(len(c.aliases) for c in components)


def prepare(comps: Sequence[ComponentRows]) -> PreparedLayout:
    """Check ``comps`` (raises ``InvalidRequest``) and encode what every snapshot reuses (see
    ``rows.component_rows`` for decoded entries)."""
    size = entries(comps)
    if size > MAX_LAYOUT_TENSORS:
        raise InvalidRequest(
            f"a layout of {size} tensors and aliases exceeds the limit of {MAX_LAYOUT_TENSORS}; {_WHAT_TO_DO}"
        )
    nbytes = check_components(comps)
    headers = tuple(tuple(_header(shard) for shard in c.shards) for c in comps)
    end = max((s.offset + s.nbytes for c in comps for s in c.shards), default=0)
    spans = tuple(
        PreparedComponent(
            c.name,
            tuple(ShardSpan(s.offset, s.nbytes, len(s.tensors)) for s in c.shards),
            c.aliases,
            _files(c),
        )
        for c in comps
    )
    indexes = tuple(_index(c, p.files) for c, p in zip(comps, spans, strict=True))
    return PreparedLayout(spans, headers, indexes, nbytes, size, end)


class LayoutParts:
    """A layout sent in parts (``RegisterLayout.more``), put together as they arrive (in linear
    time: shards are extended in place) and bounded as they arrive: the part that takes it past
    a limit fails it, and what was held is dropped at once. ``prepare`` checks the whole."""

    def __init__(self, layout: int) -> None:
        self.layout = layout
        self.parts = 0
        self._comps: list[ComponentRows] = []
        self.tensors = 0  # tensors and aliases held
        self.error: str | None = None
        self.over_daemon_limit = False  # failed for the daemon-wide limit, not for its content

    def add(self, part: RegisterLayout) -> None:
        self.parts += 1
        if self.error is not None:
            return
        for i, c in enumerate(part.components):
            shards = [shard_rows(s.offset, s.nbytes, s.tensors, s.rank) for s in c.shards]
            if any(not s.tensors for s in shards):
                self.fail(f"part {self.parts}: component {c.name!r} has a shard without tensors")
                return
            if i == 0 and self._comps and self._comps[-1].name == c.name:
                joined = self._comps[-1]
                before = len(joined.aliases)
                joined.aliases.update(c.aliases)
                self.tensors += len(joined.aliases) - before
                if part.continues_shard:
                    if not shards or not joined.shards or shards[0][:2] != joined.shards[-1][:2]:
                        self.fail(f"part {self.parts} continues a shard it does not match")
                        return
                    more = shards.pop(0)
                    joined.shards[-1].tensors.extend(more.tensors)
                    if joined.shards[-1].offsets is not None and more.offsets is not None:
                        joined.shards[-1].offsets.extend(more.offsets)
                joined.shards.extend(shards)
            elif i == 0 and part.continues_shard:
                self.fail(f"part {self.parts} continues a shard of another component")
                return
            elif not shards:
                self.fail(f"part {self.parts}: component {c.name!r} has no shards")
                return
            else:
                self._comps.append(ComponentRows(c.name, shards, dict(c.aliases), c.pretrained, c.parameters))
                self.tensors += len(c.aliases)
            self.tensors += sum(len(s.tensors) for s in shards)
            if self.tensors > MAX_LAYOUT_TENSORS:
                self.fail(
                    f"part {self.parts} takes the layout past {MAX_LAYOUT_TENSORS} tensors and "
                    f"aliases, the limit of one layout; {_WHAT_TO_DO}"
                )
                return

    def components(self) -> list[ComponentRows]:
        """The whole layout (its parts were validated as frames: no second validation)."""
        return self._comps

    def fail(self, why: str, *, daemon_limit: bool = False) -> None:
        self.error = why
        self.over_daemon_limit = daemon_limit
        self._comps = []
        self.tensors = 0


def _files(c: ComponentRows) -> ComponentFiles:
    """Where a component's shards go: its per-rank files, or its consolidated ones."""
    if c.shards and c.shards[0].rank is not None:
        return rank_files(c.name, [s.rank for s in c.shards if s.rank is not None])
    return component_files(c.name, len(c.shards), pretrained=c.pretrained)


def _header(shard: ShardRows) -> bytes:
    """``encode_header`` of a checked shard (unique names), JSON-encoded in slices on a large
    one: the same bytes, but no single C call that holds the GIL for long. A per-rank file's
    header carries its blocks' offsets (``DCP_SHARDING_INFO``)."""
    entries = [HeaderEntry(*t) for t in shard.tensors]
    metadata = METADATA
    if shard.offsets is not None:
        metadata = sharding_metadata((e.name, o or ()) for e, o in zip(entries, shard.offsets, strict=True))
    if len(entries) <= HEADER_SLICE_TENSORS:
        return encode_header(entries, metadata)
    items = [json.dumps({"__metadata__": metadata}, separators=(",", ":"))[1:-1]]
    for i in range(0, len(entries), HEADER_SLICE_TENSORS):
        piece = {
            e.name: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.start, e.end]}
            for e in entries[i : i + HEADER_SLICE_TENSORS]
        }
        items.append(json.dumps(piece, separators=(",", ":"), ensure_ascii=False)[1:-1])
    body = ("{" + ",".join(items) + "}").encode()
    padded = round_up(_U64.size + len(body), ALIGN) - _U64.size
    return _U64.pack(padded) + body + b" " * (padded - len(body))


_U64 = struct.Struct("<Q")


def _index(c: ComponentRows, files: ComponentFiles) -> bytes | None:
    """The Hugging Face index of a component of several shards, as ``save_pretrained`` writes it
    (``total_parameters`` for a module, as transformers counts: its parameters, not its buffers);
    None for one shard, which ``save_pretrained`` writes without an index."""
    if files.index is None:
        return None
    weight_map = {t[0]: files.name(i) for i, s in enumerate(c.shards) for t in s.tensors}
    metadata: dict[str, int] = {"total_size": sum(s.nbytes for s in c.shards)}
    if c.parameters is not None:
        metadata["total_parameters"] = c.parameters
    index = {"metadata": metadata, "weight_map": weight_map}
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
