"""The daemon's shard write path: buffered with write-behind by default, O_DIRECT on request
(buffered where the filesystem refuses it), the same bytes and checksum either way; writer
threads that yield the CPU to training."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import DaemonProc

from ckptd import checksum, commit
from ckptd.storage import DIRECT_ALIGN, Storage
from client import Client

CHUNK = commit._DIRECT_CHUNK_BYTES  # the larger of the two chunk sizes


class RecordingStorage(Storage):
    """The real storage, noting for each write whether it went with O_DIRECT."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, bool]] = []  # (offset, length, direct)
        self.kicked: list[tuple[int, int]] = []  # ranges whose writeback was started
        self.calls: list[str] = []

    def fsync(self, fd: int) -> None:
        self.calls.append("fsync")
        super().fsync(fd)

    def drop_cache(self, fd: int) -> None:
        self.calls.append("drop_cache")
        super().drop_cache(fd)

    def start_writeback(self, fd: int, offset: int, nbytes: int) -> None:
        self.kicked.append((offset, nbytes))
        super().start_writeback(fd, offset, nbytes)

    def pwrite(self, fd: int, data: memoryview | bytes, offset: int) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        self.writes.append((offset, len(data), direct))
        return super().pwrite(fd, data, offset)


class NoDirectStorage(RecordingStorage):
    """A filesystem that refuses the O_DIRECT flag (tmpfs on older kernels, some FUSE mounts)."""

    def set_direct(self, fd: int, on: bool) -> bool:
        return False


class RefusesDirectTransfers(RecordingStorage):
    """A filesystem that accepts the flag but fails every direct transfer with EINVAL."""

    def pwrite(self, fd: int, data: memoryview | bytes, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return super().pwrite(fd, data, offset)


def _supports_direct(directory: Path) -> bool:
    try:
        fd = os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(directory / "probe")
    return True


def _payload() -> tuple[bytes, memoryview]:
    header = b"H" * (2 * DIRECT_ALIGN)  # headers are padded to a multiple of 4096
    # Two whole chunks, some aligned blocks and an unaligned tail: every branch of the writer.
    data = os.urandom(2 * CHUNK - len(header) + 3 * DIRECT_ALIGN + 123)
    return header, memoryview(data)


def _check_file(path: Path, header: bytes, data: memoryview, record: commit.FileRecord) -> None:
    assert path.read_bytes() == header + bytes(data)
    assert record.bytes == len(header) + len(data) == path.stat().st_size
    assert record.xxh3_128 == checksum.of_file(path)[0]


def _write_payload(tmp_path: Path, storage: Storage, *, direct: bool) -> int:
    """Write ``_payload()`` with ``storage``, check the file; returns its size."""
    header, data = _payload()
    record = commit.write_shard(storage, tmp_path / "s.safetensors", header, data, direct=direct)
    _check_file(tmp_path / "s.safetensors", header, data, record)
    return record.bytes


def test_direct_writes_every_whole_block_without_the_page_cache(tmp_path: Path) -> None:
    if not _supports_direct(tmp_path):
        pytest.skip(f"{tmp_path} does not support O_DIRECT")
    storage = RecordingStorage()
    size = _write_payload(tmp_path, storage, direct=True)
    *body, tail = storage.writes
    assert body
    assert all(direct and off % DIRECT_ALIGN == 0 and n % DIRECT_ALIGN == 0 for off, n, direct in body)
    assert tail == (size - 123, 123, False), "only the unaligned tail is buffered"


def test_buffered_when_the_filesystem_refuses_the_flag(tmp_path: Path) -> None:
    storage = NoDirectStorage()
    _write_payload(tmp_path, storage, direct=True)
    assert not any(direct for _, _, direct in storage.writes)


def test_buffered_when_the_filesystem_refuses_direct_transfers(tmp_path: Path) -> None:
    if not _supports_direct(tmp_path):
        pytest.skip(f"{tmp_path} does not support O_DIRECT")
    _write_payload(tmp_path, RefusesDirectTransfers(), direct=True)


def test_buffered_writes_start_writeback_for_every_chunk_then_drop_the_cache(tmp_path: Path) -> None:
    storage = RecordingStorage()
    _write_payload(tmp_path, storage, direct=False)
    assert not any(direct for _, _, direct in storage.writes)
    assert storage.kicked == [(off, n) for off, n, _ in storage.writes], "write-behind for each write"
    assert max(n for _, n in storage.kicked) == commit._CHUNK_BYTES
    assert storage.calls == ["fsync", "drop_cache"], "the page cache is released only once durable"


@pytest.mark.parametrize("size", [0, 1, DIRECT_ALIGN - 1, DIRECT_ALIGN, CHUNK - DIRECT_ALIGN, CHUNK])
def test_small_and_boundary_sizes(tmp_path: Path, size: int) -> None:
    header = b"h" * DIRECT_ALIGN
    data = memoryview(os.urandom(size))
    for direct in (False, True):
        path = tmp_path / f"s-{direct}.safetensors"
        record = commit.write_shard(Storage(), path, header, data, direct=direct)
        _check_file(path, header, data, record)


def _thread_nices(pid: int) -> dict[int, int]:
    """Niceness of each thread of ``pid`` (field 19 of /proc/PID/task/TID/stat)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        out[int(task.name)] = int(fields[16])
    return out


@pytest.mark.parametrize(("args", "expected"), [((), 10), (("--writer-nice", "0"), 0)])
def test_writer_threads_yield_the_cpu_to_training(
    start_daemon: Callable[..., DaemonProc], args: tuple[str, ...], expected: int
) -> None:
    d = start_daemon(*args)
    with Client.connect(d.socket, autostart=False) as c:
        for step in range(3):  # enough shards to start writer threads
            c.snapshot({"a": torch.ones(1000), "b": torch.zeros(10)}, step=step).wait(30)
        nices = _thread_nices(d.proc.pid)
    assert nices[d.proc.pid] == 0, "the event loop keeps the daemon's priority"
    group = Path(f"/proc/{d.proc.pid}/autogroup")
    if group.exists():
        own = Path("/proc/self/autogroup").read_text()
        assert group.read_text() == own, "a daemon sharing the trainer's session leaves its group alone"
    writers = [n for tid, n in nices.items() if tid != d.proc.pid and n != 0]
    if expected:
        assert writers and set(writers) == {expected}, nices
    else:
        assert not writers, nices
