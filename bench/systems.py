"""The checkpointing systems compared, behind one interface: ``start`` blocks the caller for as
long as the system does (the stall); ``finish`` waits until the bytes are durable.

Systems that do not fsync (``torch.save``, ``safetensors``, ``save_pretrained``) are measured
twice from one run: their own time to done (``durable_nofsync_s``), and that plus an ``fsync``
of every file they wrote and of the directories (``durable_s``), so durability is compared
fairly. DCP's ``FileSystemWriter`` fsyncs its files itself; only its directory is added. ckptd
reports durable only after its own fsyncs and commit.
"""

from __future__ import annotations

import os
import resource
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.names import SYSTEMS
from bench.workloads import Workload


@dataclass
class Pending:
    """A checkpoint that ``start`` returned for."""

    step: int
    started: float
    stall_s: float
    path: Path | None = None
    done_at: float | None = None  # sync systems: when the system itself returned
    future: Any = None  # a ckptd handle or a DCP future
    call_s: float = 0.0  # the caller's own wall time around the call (a cross-check of stall_s)


@dataclass
class Sample:
    stall_s: float  # how long the caller was blocked
    staged_s: float  # until the caller may change its tensors (== stall_s except on GPU paths)
    durable_nofsync_s: float  # until the system reported done, before any fsync of ours
    durable_s: float  # until every byte is durable (the system's, or ours, fsync included)
    fsync_s: float  # the fsync we added (0 for ckptd)
    bytes_on_disk: int
    path: Path
    extra: dict[str, float] = field(default_factory=dict)


def now() -> float:
    return time.perf_counter()


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then every directory bottom-up, then its parent."""
    dirs = []
    for d, _, files in os.walk(path):
        dirs.append(d)
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in [*reversed(dirs), str(path.parent)]:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tree_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


class System:
    """A checkpointer writing ``workload`` under ``scratch``."""

    name = ""
    native_fsync = False  # fsyncs its files itself

    def __init__(self, wl: Workload, scratch: Path) -> None:
        self.wl = wl
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)

    @property
    def payload_bytes(self) -> int:
        return self.wl.nbytes

    def start(self, step: int) -> Pending:
        path = self.scratch / f"{self.name}-{step:06d}"
        path.mkdir()
        started = now()
        self._write(path)
        done = now()
        return Pending(step, started, done - started, path, done)

    def _write(self, path: Path) -> None:
        raise NotImplementedError

    def _wait(self, pending: Pending) -> float:
        """Wait for an asynchronous system; returns when it reported done."""
        assert pending.done_at is not None
        return pending.done_at

    def finish(self, pending: Pending) -> Sample:
        done = self._wait(pending)
        assert pending.path is not None
        fsync_started = now()
        fsync_tree(pending.path)
        synced = now()
        return Sample(
            stall_s=pending.stall_s,
            staged_s=pending.stall_s,
            durable_nofsync_s=done - pending.started,
            durable_s=synced - pending.started,
            fsync_s=synced - fsync_started,
            bytes_on_disk=tree_bytes(pending.path),
            path=pending.path,
        )

    def close(self) -> None:
        pass


class TorchSave(System):
    name = "torch_save"

    def _write(self, path: Path) -> None:
        torch.save(self.wl.state_dict(), path / "checkpoint.pt")


class Safetensors(System):
    name = "safetensors"

    def _write(self, path: Path) -> None:
        from safetensors.torch import save_file

        for name, tensors in self.wl.safetensors_files().items():
            save_file(tensors, str(path / f"{name}.safetensors"))


class SavePretrained(System):
    name = "save_pretrained"

    @property
    def payload_bytes(self) -> int:
        return self.wl.model_nbytes  # the model part only

    def _write(self, path: Path) -> None:
        assert self.wl.model is not None
        self.wl.model.save_pretrained(path)  # type: ignore[operator]


class DcpSave(System):
    name = "dcp_save"
    native_fsync = True

    def _write(self, path: Path) -> None:
        from torch.distributed.checkpoint.filesystem import FileSystemWriter
        from torch.distributed.checkpoint.state_dict_saver import save

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            save(self.wl.state_dict(), storage_writer=FileSystemWriter(path))


class DcpAsync(System):
    """``async_save`` with a ``DefaultStager`` that caches its shared-memory staging buffers.
    The stall lasts until the state is staged (safe to change); durable when the future completes."""

    name = "dcp_async"
    native_fsync = True

    def __init__(self, wl: Workload, scratch: Path) -> None:
        super().__init__(wl, scratch)
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        tensors = wl.unique_tensors()
        cuda = any(t.is_cuda for t in tensors)
        self.note = ""
        if len(tensors) > resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1000:
            # The default "file_descriptor" strategy keeps one open descriptor per shared staging
            # buffer: 20,000 tensors exceed the descriptor limit (EMFILE). Named shared memory does not.
            torch.multiprocessing.set_sharing_strategy("file_system")
            self.note = "more tensors than open files allowed: sharing strategy file_system"
        self._stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=cuda,
                use_shared_memory=True,
                use_async_staging=cuda,
                use_non_blocking_copy=cuda,
            )
        )

    def start(self, step: int) -> Pending:
        from torch.distributed.checkpoint.filesystem import FileSystemWriter
        from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse, async_save

        path = self.scratch / f"{self.name}-{step:06d}"
        path.mkdir()
        started = now()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resp = async_save(
                self.wl.state_dict(), storage_writer=FileSystemWriter(path), async_stager=self._stager
            )
        if isinstance(resp, AsyncSaveResponse):
            resp.staging_completion.result()  # the state may be changed only once staged
            future: Future[Any] = resp.upload_completion
        else:
            future = resp
        return Pending(step, started, now() - started, path, future=future)

    def _wait(self, pending: Pending) -> float:
        pending.future.result()
        return now()

    def close(self) -> None:
        self._stager.close()


class Ckptd(System):
    """A ckptd client on a daemon the harness started; stall and durable as the handle reports."""

    name = "ckptd"
    native_fsync = True

    def __init__(self, wl: Workload, scratch: Path, socket_path: Path, run: str) -> None:
        super().__init__(wl, scratch)
        from client import Client

        self._client = Client.connect(socket_path, autostart=False, run=run)

    def start(self, step: int) -> Pending:
        started = now()
        handle = self._client.snapshot(self.wl.ckptd_obj(), step=step)
        return Pending(step, handle.started, handle.stall_s, future=handle, call_s=now() - started)

    def finish(self, pending: Pending) -> Sample:
        handle = pending.future
        while not handle.staged:  # GPU path: the copies run after snapshot() returned
            time.sleep(0.0002)
        staged = now() - pending.started
        info = handle.wait()
        extra = {f"daemon_{k}": float(v) for k, v in info.timings.items()}
        extra["snapshot_call_s"] = pending.call_s
        return Sample(
            stall_s=info.stall_s,
            staged_s=max(info.stall_s, staged),
            durable_nofsync_s=info.durable_s,
            durable_s=info.durable_s,
            fsync_s=0.0,
            bytes_on_disk=tree_bytes(info.path),
            path=info.path,
            extra=extra,
        )

    def close(self) -> None:
        self._client.close()


def make(name: str, wl: Workload, scratch: Path, *, socket_path: Path | None = None) -> System:
    factories: dict[str, Callable[[], System]] = {
        "torch_save": lambda: TorchSave(wl, scratch),
        "safetensors": lambda: Safetensors(wl, scratch),
        "save_pretrained": lambda: SavePretrained(wl, scratch),
        "dcp_save": lambda: DcpSave(wl, scratch),
        "dcp_async": lambda: DcpAsync(wl, scratch),
    }
    if name == "ckptd":
        if socket_path is None:
            raise ValueError("ckptd needs the socket of a running daemon")
        return Ckptd(wl, scratch, socket_path, run=f"bench-{wl.name}")
    if name not in factories:
        raise ValueError(f"unknown system {name!r}; choose from {SYSTEMS}")
    return factories[name]()
