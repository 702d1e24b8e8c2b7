"""The nodes that share a checkpoint root, one daemon each.

Several nodes may write into one root on a shared filesystem (Lustre, GPFS, NFS): each runs its
own daemon, and a root is served by at most one daemon per node. A daemon locks
``<root>/.ckptd-nodes/<node id>.lock`` for its lifetime and writes in it who holds it (node id,
the daemon's instance, pid, host). The clients of a multi-rank job read these files to tell a
shared root (every rank's daemon has its file in the root this rank sees) from node-local roots.

A node id is the host name unless ``--node-id`` (or ``CKPTD_NODE_ID``) says otherwise: two
daemons on one host serving one root (two simulated nodes, two containers with one host name)
need ids of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from ckptd import safeio
from ckptd.sockdir import UnsafeSocketDir

NODES_DIR = ".ckptd-nodes"
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_node_id(node_id: str) -> str:
    """``node_id`` if it can name a node's lock file; ``ValueError`` saying what is allowed."""
    if not _NODE_ID.match(node_id):
        raise ValueError(
            f"node id {node_id!r} is not usable: 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (pass --node-id or set CKPTD_NODE_ID)"
        )
    return node_id


def default_node_id() -> str:
    """``CKPTD_NODE_ID``, else the host name (its characters a lock file name cannot hold
    replaced by ``-``)."""
    chosen = os.environ.get("CKPTD_NODE_ID")
    if chosen:
        return chosen
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).lstrip("._-")[:64]
    return host or "node"


def lock_name(node_id: str) -> str:
    return f"{check_node_id(node_id)}.lock"


def open_nodes_dir(root_fd: int, root: Path) -> int:
    """The root's ``.ckptd-nodes/`` (made if missing), opened without following a link."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(NODES_DIR, 0o755, dir_fd=root_fd)
    try:
        fd = os.open(NODES_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
    except OSError as e:
        raise UnsafeSocketDir(
            f"refusing {root / NODES_DIR}: it is not a directory ({e.strerror}); remove it"
        ) from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        raise UnsafeSocketDir(
            f"refusing {root / NODES_DIR}: owned by uid {st.st_uid} or writable by others; remove it"
        )
    return fd


def write_holder(fd: int, node_id: str, instance: str) -> None:
    """Say in the (locked) node file ``fd`` which daemon holds it."""
    data = json.dumps(
        {"node": node_id, "instance": instance, "pid": os.getpid(), "host": socket.gethostname()}
    ).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data + b"\n", 0)
    os.fsync(fd)


@dataclass(frozen=True)
class Holder:
    node: str
    instance: str
    pid: int
    host: str


def read_holders(root: Path) -> list[Holder]:
    """The daemons that hold (or last held) a node file of ``root``; unreadable or torn files are
    left out. Raises ``OSError`` when the directory itself cannot be listed (but not when it is
    missing: a root no daemon has served has no holders)."""
    out = []
    try:
        names = sorted(os.listdir(root / NODES_DIR))
    except FileNotFoundError:
        return []
    for name in names:
        if not name.endswith(".lock"):
            continue
        try:  # never follows a link nor waits on a FIFO
            fd = safeio.open_regular(root / NODES_DIR / name, 4096)
            try:
                raw = json.loads(os.read(fd, 4096))
            finally:
                os.close(fd)
            out.append(Holder(str(raw["node"]), str(raw["instance"]), int(raw["pid"]), str(raw["host"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out
