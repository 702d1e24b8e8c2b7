"""The one exception users catch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from client.handle import SnapshotHandle


class CheckpointError(RuntimeError):
    """A snapshot or restore failed; the message says what happened and what to do.

    ``code`` is the failure code (``io_error``, ``invalid_request``, ``daemon_died``,
    ``daemon_unresponsive``, ``daemon_stuck``, ``lost_snapshots``, ``closed``, ...) and ``errno``
    the OS error number when the failure was an I/O error. When ``snapshot()`` reports an earlier
    snapshot's failure that nobody looked at, it has taken its own snapshot first: ``handle`` is
    that new snapshot's handle (None on every other error).
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = "error",
        errno: int | None = None,
        handle: SnapshotHandle | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.errno = errno
        self.handle = handle
