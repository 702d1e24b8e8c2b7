"""The training-side library of ckptd.

>>> from client import Client
>>> ckpt = Client.connect()                      # doctest: +SKIP
>>> handle = ckpt.snapshot(model, step=500)      # doctest: +SKIP
>>> handle.wait()                                # doctest: +SKIP
"""

from __future__ import annotations

from client.client import Client, ClientOptions
from client.errors import CheckpointError
from client.handle import CommitInfo, SnapshotHandle

__all__ = ["CheckpointError", "Client", "ClientOptions", "CommitInfo", "SnapshotHandle"]
