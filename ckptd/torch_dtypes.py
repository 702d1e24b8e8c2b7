"""torch dtypes ↔ safetensors dtype names (for the client and the loader, not the daemon)."""

from __future__ import annotations

import torch

TO_SAFETENSORS: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.int64: "I64",
    torch.uint64: "U64",
    torch.complex64: "C64",
    torch.float32: "F32",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
FROM_SAFETENSORS: dict[str, torch.dtype] = {v: k for k, v in TO_SAFETENSORS.items()}


def safetensors_dtype(dtype: torch.dtype, name: str) -> str:
    try:
        return TO_SAFETENSORS[dtype]
    except KeyError:
        raise TypeError(
            f"tensor {name!r} has dtype {dtype}, which safetensors cannot store; "
            "convert it (e.g. complex128 -> two float64 tensors) before snapshotting"
        ) from None
