"""The socket's directory, checked before anything in it is opened, and the daemon's private files.

Rule: the directory holding the socket (and by default the daemon's log and lock beside it) must
be a real directory, owned by this user (or root) and writable by nobody else. Another user who
can write there, even in a sticky directory like /tmp, can plant a symlink where the daemon opens
its log (and make it append to any file of yours), a log of their own to read, or a socket of
their own. The checks are made with ``fstat`` on the opened directory (``O_NOFOLLOW``), and files
inside are opened relative to that descriptor, so what was checked is what is used.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path


class UnsafeSocketDir(OSError):
    """A socket directory another user could write to: planting a socket, a log or a symlink."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_socket_dir(path: Path, *, create: bool) -> int:
    """Open the socket's directory, checked, and return its descriptor (open files inside with
    ``dir_fd=``, so the directory checked is the one used).

    The directory must be a real directory (not a symlink), owned by this user (or root), and
    writable by nobody else: in a directory others can write to, even a sticky one like /tmp,
    another user can plant a symlink where the daemon opens its log, a log of their own to read,
    or a socket of their own. With ``create``, a missing directory is made, mode 0700 (and its
    missing parents); otherwise ``FileNotFoundError`` is raised. Anything else raises
    ``UnsafeSocketDir`` saying what is wrong and how to fix it.
    """
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise UnsafeSocketDir(
            f"the socket directory {path} is a symlink or not a directory; remove it, "
            "or set CKPTD_SOCKET (or --socket) to a path in a private directory",
        ) from None
    try:
        _check_socket_dir(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_socket_dir(path: Path) -> None:
    """``open_socket_dir`` without creating or keeping it: raises as it does."""
    os.close(open_socket_dir(path, create=False))


def _check_socket_dir(path: Path, st: os.stat_result) -> None:
    me = os.geteuid()
    fix = "or set CKPTD_SOCKET (or --socket) to a path in a directory only you can write to"
    if st.st_uid not in (me, 0):
        raise UnsafeSocketDir(
            f"the socket directory {path} is owned by uid {st.st_uid}, not by you (uid {me}): another "
            f"user made it, and could read ckptd's log or plant files there; remove {path}, {fix}",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise UnsafeSocketDir(
            f"the socket directory {path} is writable by other users (mode {mode:o}"
            f"{', sticky like /tmp' if mode & stat.S_ISVTX else ''}): they could plant a symlink, a log "
            f"or a socket there; `chmod 700 {path}` if it is yours alone, {fix}",
        )


def open_private_file(name: str, dir_fd: int | None, flags: int, what: str, shown: Path) -> int:
    """Open a file the daemon keeps (its log, a lock) without following a symlink, refusing
    anything but a regular file of ours with one link (a FIFO, a device, another user's file, a
    hard link to somebody's file). ``name`` is relative to ``dir_fd`` when given."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as e:
        problem = {errno.ELOOP: "a symlink", errno.ENXIO: "a FIFO or socket"}.get(e.errno or 0)
        if problem is None:
            raise
        raise UnsafeSocketDir(f"refusing {what} {shown}: it is {problem}; remove it") from None
    try:
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "not a regular file"
        elif st.st_uid != os.geteuid():
            problem = f"owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
        elif st.st_nlink != 1:
            problem = f"a file with {st.st_nlink} hard links"
        if problem is not None:
            raise UnsafeSocketDir(f"refusing {what} {shown}: it is {problem}; remove it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
