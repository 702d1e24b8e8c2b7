"""Byte sizes written the way Hugging Face writes them ("5GB" = 5 * 10**9, "5GiB" = 5 * 2**30)."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | str) -> int:
    """Parse ``5GB``, ``500MiB`` or an int number of bytes; ``ValueError`` says what is accepted."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size must be a positive number of bytes, got {value}")
        return value
    m = _SIZE.match(value)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read size {value!r}: write a number of bytes or a number with a unit "
            "(KB, MB, GB, TB are powers of 10; KiB, MiB, GiB, TiB are powers of 2), e.g. '5GB'"
        )
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


def format_size(n: int) -> str:
    """Human-readable size with binary units, e.g. ``1.2 GiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
