"""The safetensors dtype names ckptd writes, and their element sizes (torch-free, for the daemon)."""

from __future__ import annotations

#: Element size in bytes of every safetensors dtype ckptd reads and writes.
ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "C64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def itemsize(dtype: str) -> int:
    """Element size of a safetensors dtype name; a clear error for names ckptd does not know."""
    try:
        return ITEMSIZE[dtype]
    except KeyError:
        known = ", ".join(sorted(ITEMSIZE))
        raise ValueError(f"unknown safetensors dtype {dtype!r}; expected one of {known}") from None


def numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
