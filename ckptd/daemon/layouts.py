"""A snapshot layout, checked and prepared once: shard headers and index files encoded.

A client registers its layout once per connection and every snapshot of an unchanged model
reuses it, so the per-tensor work (validation, safetensors headers, the index's weight map) is
not repeated per snapshot on the daemon's event loop.
"""

from __future__ import annotations

import gc
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ckptd.daemon.validate import InvalidRequest, check_components
from ckptd.layout import ALIGN, round_up, shard_filename
from ckptd.protocol import ComponentEntry, RegisterLayout, ShardEntry, TensorEntry
from ckptd.shardfile import METADATA, HeaderEntry, encode_header

#: Layouts one connection keeps registered, and the tensors in them all together; registering
#: more forgets the oldest (a client only ever uses the layout it registered last).
MAX_LAYOUTS = 16
MAX_LAYOUT_TENSORS = 2_000_000
#: Tensors in the layouts of all connections together: many clients cannot exhaust the daemon's
#: memory with layouts (about 1 KB each once prepared) either.
MAX_DAEMON_LAYOUT_TENSORS = 8_000_000
#: Tensors of a shard header JSON-encoded in one call: one ``json.dumps`` of a 700,000-entry
#: header holds the GIL (and so the daemon's event loop) for seconds.
HEADER_SLICE_TENSORS = 4096
#: A layout of at least this many tensors is kept out of the garbage collector's full passes.
SETTLE_TENSORS = 10_000


@dataclass(frozen=True)
class PreparedLayout:
    components: tuple[ComponentEntry, ...]
    headers: tuple[tuple[bytes, ...], ...]  # per component, per shard
    indexes: tuple[bytes, ...]  # ``<component>.safetensors.index.json`` text, per component
    nbytes: int  # tensor bytes a snapshot of this layout writes
    tensors: int  # tensor entries, for the per-connection limit
    end: int  # where the last shard's data ends in the slot: a streamed snapshot is whole there


def prepare(components: Sequence[ComponentEntry]) -> PreparedLayout:
    """Check ``components`` (raises ``InvalidRequest``) and encode what every snapshot reuses."""
    tensors = sum(len(s.tensors) for c in components for s in c.shards)
    if tensors > MAX_LAYOUT_TENSORS:
        raise InvalidRequest(f"a layout of {tensors} tensors exceeds the limit of {MAX_LAYOUT_TENSORS}")
    nbytes = check_components(components)
    headers = tuple(tuple(_header(shard) for shard in c.shards) for c in components)
    end = max((s.offset + s.nbytes for c in components for s in c.shards), default=0)
    return PreparedLayout(
        tuple(components), headers, tuple(_index(c) for c in components), nbytes, tensors, end
    )


def settle() -> None:
    """Move the objects alive now (a large layout's millions) out of the cyclic garbage
    collector's reach: a full collection traverses every tracked object while holding the GIL,
    which stalled the event loop for seconds once a 700,000-tensor layout was held. They are
    still freed by reference counting (layouts hold no cycles); young garbage is collected first
    so that little else is kept."""
    gc.collect(1)
    gc.freeze()


_Shard = tuple[int, int, list[TensorEntry]]  # offset, nbytes, tensors


class LayoutParts:
    """A layout sent in parts (``RegisterLayout.more``), put together as they arrive (in linear
    time: shards are extended in place). Nothing is checked here but the tensor limit and how
    the parts join; ``prepare`` checks the whole."""

    def __init__(self, layout: int) -> None:
        self.layout = layout
        self.parts = 0
        self._comps: list[tuple[str, list[_Shard], dict[str, str]]] = []
        self._tensors = 0
        self.error: str | None = None

    def add(self, part: RegisterLayout) -> None:
        self.parts += 1
        if self.error is not None:
            return
        self._tensors += sum(len(s.tensors) for c in part.components for s in c.shards)
        if self._tensors > MAX_LAYOUT_TENSORS:
            self._fail(f"a layout of more than {MAX_LAYOUT_TENSORS} tensors exceeds the limit")
            return
        for i, c in enumerate(part.components):
            shards = [(s.offset, s.nbytes, list(s.tensors)) for s in c.shards]
            if i == 0 and self._comps and self._comps[-1][0] == c.name:
                _, joined, aliases = self._comps[-1]
                aliases.update(c.aliases)
                if part.continues_shard:
                    if not shards or not joined or shards[0][:2] != joined[-1][:2]:
                        self._fail(f"part {self.parts} continues a shard it does not match")
                        return
                    joined[-1][2].extend(shards.pop(0)[2])
                joined.extend(shards)
            elif i == 0 and part.continues_shard:
                self._fail(f"part {self.parts} continues a shard of another component")
                return
            else:
                self._comps.append((c.name, shards, dict(c.aliases)))

    def components(self) -> list[ComponentEntry]:
        """The whole layout (its parts were validated as frames: no second validation)."""
        return [
            ComponentEntry.model_construct(
                name=name,
                shards=[ShardEntry.model_construct(offset=o, nbytes=n, tensors=t) for o, n, t in shards],
                aliases=aliases,
            )
            for name, shards, aliases in self._comps
        ]

    def _fail(self, why: str) -> None:
        self.error = why
        self._comps.clear()


def _header(shard: ShardEntry) -> bytes:
    """``encode_header`` of a checked shard (unique names), JSON-encoded in slices on a large
    one: the same bytes, but no single C call that holds the GIL for long."""
    entries = [HeaderEntry(t.name, t.dtype, tuple(t.shape), t.start, t.end) for t in shard.tensors]
    if len(entries) <= HEADER_SLICE_TENSORS:
        return encode_header(entries)
    items = [json.dumps({"__metadata__": METADATA}, separators=(",", ":"))[1:-1]]
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


def _index(c: ComponentEntry) -> bytes:
    """The Hugging Face index of a component, as ``save_pretrained`` lays it out."""
    n = len(c.shards)
    weight_map = {t.name: shard_filename(c.name, i, n) for i, s in enumerate(c.shards) for t in s.tensors}
    total = sum(s.nbytes for s in c.shards)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
