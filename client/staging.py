"""Copying a snapshot's tensors into its arena slot: host to host, or device to host on CUDA.

DESIGN §8: the copy stream waits for work already queued, copies run ``non_blocking`` into the
page-locked arena, and the current stream then waits for the copy stream, so in-place updates
queued after ``snapshot()`` returns cannot race the copy. A single sender thread waits for each
copy's event and then runs the send, so the caller never waits for the device.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from client.arena import Arena

Pairs = list[tuple[torch.Tensor, torch.Tensor]]


def copy_host(pairs: Pairs) -> None:
    """Copy every source into its arena view: one ``_foreach_copy_`` call (a third less time than
    a Python loop for 20,000 small tensors, the same for large ones), a loop where that fails."""
    if not pairs:
        return
    dsts, srcs = (list(x) for x in zip(*pairs, strict=True))
    with torch.no_grad():
        try:
            torch._foreach_copy_(dsts, srcs)
            return
        except (AttributeError, RuntimeError):  # no such op, or a mix it does not take
            pass
        for dst, src in pairs:
            dst.copy_(src)


class CudaStager:
    """The side stream and sender thread of a client, made on first use."""

    def __init__(self) -> None:
        self._stream: Any = None
        self._sender: ThreadPoolExecutor | None = None

    def copy(self, arena: Arena, pairs: Pairs) -> Any:
        """Queue the copies; returns the event that fires when they are done."""
        arena.pin_for_cuda()
        if self._stream is None:
            self._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            self._sender = ThreadPoolExecutor(1, thread_name_prefix="ckptd-gpu-send")
        stream, current = self._stream, torch.cuda.current_stream()
        stream.wait_stream(current)
        with torch.no_grad(), torch.cuda.stream(stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=src.is_cuda)
                if src.is_cuda:
                    src.record_stream(stream)  # the allocator must not reuse it before the copy
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(stream)
        current.wait_stream(stream)
        return event

    def after(self, event: Any, then: Callable[[BaseException | None], None]) -> None:
        """Call ``then(None)`` on the sender thread once ``event`` fired, or ``then(error)``."""
        if self._sender is None:
            raise RuntimeError("after() before copy()")

        def wait() -> None:
            try:
                event.synchronize()
            except BaseException as e:  # a CUDA error must reach the handle, not vanish here
                then(e)
                return
            then(None)

        self._sender.submit(wait)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.shutdown(wait=True)
