"""The training-side library of ckptd.

>>> from client import Client
>>> ckpt = Client.connect()                      # doctest: +SKIP
>>> handle = ckpt.snapshot(model, step=500)      # doctest: +SKIP
>>> handle.wait()                                # doctest: +SKIP

Names are imported on first use, so that tools which only talk to the daemon (``ckptd status``)
do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client.client import Client, ClientOptions
    from client.errors import CheckpointError
    from client.handle import CommitInfo, SnapshotHandle

__all__ = ["CheckpointError", "Client", "ClientOptions", "CommitInfo", "SnapshotHandle"]
_WHERE = {
    "Client": "client.client",
    "ClientOptions": "client.client",
    "CheckpointError": "client.errors",
    "CommitInfo": "client.handle",
    "SnapshotHandle": "client.handle",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'client' has no attribute {name!r}")
