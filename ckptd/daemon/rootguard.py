"""The checkpoint root as the daemon found it at start-up, and whether it is still there.

A root removed (``rm -rf``) or replaced (moved away and made again, a mount gone) while the
daemon runs takes its lock file with it: a second daemon could start on the same path while this
one still writes. The daemon keeps a descriptor of the root from start-up and compares it with
what the path names now (device, inode, link count) before each snapshot is staged, before it is
committed, and every ``CHECK_INTERVAL_S``; once the root is gone this daemon refuses snapshots
and stops, so the next one to start on that path is the only one.

Only evidence that the root was removed or replaced counts: the path names nothing
(``ENOENT``/``ENOTDIR``), the held directory has no links, or the path names another one. An
``EIO`` or ``ESTALE`` from a flaky mount is not evidence: ``check`` raises it as the ``OSError`` it
is (what was being done fails with that errno) and the daemon goes on. A check may block on a hung
mount, so it is never run on the event loop.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

#: Seconds between checks of an idle daemon's root.
CHECK_INTERVAL_S = 1.0


class RootGone(RuntimeError):
    """The root this daemon serves was removed or replaced; the message says what to do."""


class RootGuard:
    """Holds the root's directory open; ``check()`` raises ``RootGone`` once it is not the
    directory the path names (and keeps raising: a root does not come back)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._gone: str | None = None

    @property
    def gone(self) -> str | None:
        """Why the root is gone, once a check found it so."""
        return self._gone

    def check(self) -> None:
        """Raises ``RootGone`` once the root is gone, or the ``OSError`` (EIO, ESTALE...) that kept
        it from being examined (no verdict: a later check looks again). Blocking: off the loop."""
        if self._gone is None:
            self._gone = self._look()
        if self._gone is not None:
            raise self.gone_error()

    def gone_error(self) -> RootGone:
        """The error for a root found gone (no I/O: usable on the event loop)."""
        return RootGone(
            f"the checkpoint root {self.root} {self._gone} while ckptd was running; nothing more "
            "is written there by this daemon, which stops. Check what removed it (checkpoints that "
            "were under it are not there any more), then start ckptd again (a client with "
            "autostart starts a fresh one, which makes the root again)"
        )

    def _look(self) -> str | None:
        held = os.fstat(self.fd)
        if held.st_nlink == 0:
            return "was deleted"
        try:
            now = os.stat(self.root)
        except (FileNotFoundError, NotADirectoryError):
            return "was deleted (or moved away)"
        if not stat.S_ISDIR(now.st_mode) or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            return "was replaced by another directory (moved away, deleted and made again, or unmounted)"
        return None

    def close(self) -> None:
        os.close(self.fd)
