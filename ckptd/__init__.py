"""ckptd: an asynchronous background checkpoint daemon for PyTorch.

Reading needs no daemon: ``ckptd.load(path)``, ``ckptd.latest(root, run)``, ``ckptd.verify(path)``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ckptd.reading import CheckpointTooLarge, CorruptCheckpoint, latest, load, verify

__all__ = ["CheckpointTooLarge", "CorruptCheckpoint", "__version__", "latest", "load", "verify"]
