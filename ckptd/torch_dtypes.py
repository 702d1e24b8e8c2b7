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
    # The ROCm fp8 formats: safetensors names them and its torch loader reads them (0.4+).
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
FROM_SAFETENSORS: dict[str, torch.dtype] = {v: k for k, v in TO_SAFETENSORS.items()}

_QUANTIZED = frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})
#: Same-sized unsigned dtypes to store raw bits as.
_RAW = {1: "torch.uint8", 2: "torch.uint16", 4: "torch.uint32", 8: "torch.uint64"}


def safetensors_dtype(dtype: torch.dtype, name: str) -> str:
    try:
        return TO_SAFETENSORS[dtype]
    except KeyError:
        raise TypeError(
            f"tensor {name!r} has dtype {dtype}, which safetensors cannot store; {_conversion(dtype)}"
        ) from None


def _conversion(dtype: torch.dtype) -> str:
    """What to snapshot instead of a tensor of ``dtype`` (one safetensors cannot store)."""
    if dtype in _QUANTIZED:
        return (
            "it is a quantized tensor: snapshot t.dequantize(), or t.int_repr() with its "
            "q_scale() and q_zero_point() as separate values"
        )
    if dtype == torch.complex128:
        return "convert it (e.g. complex128 -> two float64 tensors) before snapshotting"
    if dtype == torch.complex32:
        return "convert it with .to(torch.complex64), or store torch.view_as_real(t) (float16)"
    raw = _RAW.get(dtype.itemsize)
    if raw is not None:
        # Bit and sub-byte types (uint1-7, int1-7, bits*), F8_E8M0 and F4, which safetensors'
        # torch loader cannot read back: their bytes, reinterpreted without a copy.
        return f"store its raw bits with .view({raw}) and view them back as {dtype} after loading"
    supported = ", ".join(sorted(str(d).removeprefix("torch.") for d in TO_SAFETENSORS))
    return f"convert it to one of {supported} before snapshotting"
