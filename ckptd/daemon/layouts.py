"""A snapshot layout, checked and prepared once: shard headers and index files encoded.

A client registers its layout once per connection and every snapshot of an unchanged model
reuses it, so the per-tensor work (validation, safetensors headers, the index's weight map) is
not repeated per snapshot on the daemon's event loop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from ckptd.daemon.validate import InvalidRequest, check_components
from ckptd.layout import shard_filename
from ckptd.protocol import ComponentEntry
from ckptd.shardfile import HeaderEntry, encode_header

#: Layouts one connection keeps registered, and the tensors in them all together; registering
#: more forgets the oldest (a client only ever uses the layout it registered last).
MAX_LAYOUTS = 16
MAX_LAYOUT_TENSORS = 2_000_000
#: Tensors in the layouts of all connections together: many clients cannot exhaust the daemon's
#: memory with layouts (about 1 KB each once prepared) either.
MAX_DAEMON_LAYOUT_TENSORS = 8_000_000


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
    headers = tuple(
        tuple(
            encode_header(HeaderEntry(t.name, t.dtype, tuple(t.shape), t.start, t.end) for t in shard.tensors)
            for shard in c.shards
        )
        for c in components
    )
    end = max((s.offset + s.nbytes for c in components for s in c.shards), default=0)
    return PreparedLayout(
        tuple(components), headers, tuple(_index(c) for c in components), nbytes, tensors, end
    )


def _index(c: ComponentEntry) -> bytes:
    """The Hugging Face index of a component, as ``save_pretrained`` lays it out."""
    n = len(c.shards)
    weight_map = {t.name: shard_filename(c.name, i, n) for i, s in enumerate(c.shards) for t in s.tensors}
    total = sum(s.nbytes for s in c.shards)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
