"""The one exception users catch."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A snapshot or restore failed; the message says what happened and what to do.

    ``code`` is the daemon's failure code (``io_error``, ``invalid_request``, ``daemon_died``, ...)
    and ``errno`` the OS error number when the failure was an I/O error.
    """

    def __init__(self, message: str, *, code: str = "error", errno: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.errno = errno
