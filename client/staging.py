"""Copying a snapshot's tensors into its arena slot: host to host, or device to host on CUDA.

Host to host, a small contiguous tensor is copied with one ``memmove`` from its ``data_ptr()``
(read just before, with the GIL held through the copy) to its place in the arena: no destination tensor is
made or kept per tensor, so 20,000 tensors cost no more than torch's own batched copy and keep no
per-tensor views alive. Everything else (large, strided, lazily negated or conjugated tensors) is
copied by torch into views made for it.

DESIGN §8: the copy stream waits for work already queued, copies run ``non_blocking`` into the
page-locked arena, and the current stream then waits for the copy stream, so in-place updates
queued after ``snapshot()`` returns cannot race the copy. A single sender thread waits for each
copy's event and then runs the send, so the caller never waits for the device.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from client.arena import Arena
from client.plan import Plan, view
from client.tree import Flat

Pairs = list[tuple[torch.Tensor, torch.Tensor]]


def _memmove_holding_gil() -> Callable[[int, int, int], None]:
    """libc's memmove, called with the GIL held: releasing and retaking it per call would cost
    more than copying a small tensor, and would hand the GIL to other threads 20,000 times."""
    address = ctypes.cast(ctypes.memmove, ctypes.c_void_p).value
    if address is None:
        raise RuntimeError("ctypes has no memmove")
    return ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(address)


_memmove = _memmove_holding_gil()


def copy_host(arena: Arena, plan: Plan, flat: Flat, start: int = 0, stop: int | None = None) -> None:
    """Copy the tensors of ``flat`` (all in host memory) placed ``start:stop`` (slot order) to
    their places in ``arena``."""
    tensors = [c.tensors for c in flat.components]
    base, move = arena.address, _memmove
    rest: list[int] = []
    stop = len(plan.comps) if stop is None else stop
    part = slice(start, stop)
    for i, ci, ti, raw, offset, size in zip(
        range(start, stop),
        plan.comps[part],
        plan.tensors[part],
        plan.raw[part],
        plan.offsets[part],
        plan.sizes[part],
        strict=True,
    ):
        t = tensors[ci][ti][1]
        # Its dtype and shape match the plan (the signature was checked in this call) and its
        # bytes lie inside its storage (flatten checked, in this call), so a contiguous one
        # without a lazy negation bit is exactly the plan's bytes at data_ptr()
        # (0 for a tensor without storage, e.g. an efficient zero tensor: torch copies those).
        if raw and t.is_contiguous() and not t.is_neg() and (ptr := t.data_ptr()):
            move(base + offset, ptr, size)
        else:
            rest.append(i)
    copy_pairs_host([(view(arena, plan, i), tensors[plan.comps[i]][plan.tensors[i]][1]) for i in rest])


def copy_pairs_host(pairs: Pairs) -> None:
    """Copy every source into its destination: one ``_foreach_copy_`` call, a loop where that
    fails."""
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
        try:
            with torch.no_grad(), torch.cuda.stream(stream):
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=src.is_cuda)
                    if src.is_cuda:
                        src.record_stream(stream)  # the allocator must not reuse it before the copy
        except BaseException:
            stream.synchronize()  # copies already queued must be over before the slot is reused
            raise
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
