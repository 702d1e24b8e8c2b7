"""Byte sizes written the way Hugging Face writes them: ``convert_file_size_to_int`` of
transformers, exactly ("5GB" = 5 * 10**9, "5GiB" = 5 * 2**30, "5Gb" = 5 * 10**9 / 8 bytes)."""

from __future__ import annotations

#: Suffix (as matched, case-insensitively) -> bytes per unit. Checked in this order, as transformers
#: does; a decimal unit whose last letter is a lower-case ``b`` counts bits.
_UNITS = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))


def parse_size(value: int | str) -> int:
    """Parse a size as transformers' ``convert_file_size_to_int`` does: an int number of bytes, or
    an integer with a unit: ``KiB``/``MiB``/``GiB`` (powers of 2), ``KB``/``MB``/``GB`` (powers of
    10, any case), ``Kb``/``Mb``/``Gb`` (bits: an eighth of those bytes). A string of digits alone
    is a number of bytes too (transformers refuses it; ``ckptd serve --max-shard-size`` gets ints
    that way). ``ValueError`` says what is accepted.

    >>> parse_size("5GB"), parse_size("5Gb"), parse_size("500MiB")
    (5000000000, 625000000, 524288000)
    """
    if isinstance(value, int):
        size = value
    else:
        size = _parse(value)
    if size <= 0:
        raise ValueError(f"size must be a positive number of bytes, got {value!r}")
    return size


def _parse(value: str) -> int:
    upper = value.upper()
    try:
        for unit, factor in _UNITS:
            if upper.endswith(unit):
                size = int(value[: -len(unit)]) * factor
                return size // 8 if unit in ("GB", "MB", "KB") and value.endswith("b") else size
        if value.strip().isdigit():
            return int(value)
    except ValueError:
        pass
    raise ValueError(
        f"cannot read size {value!r}: write a number of bytes or an integer with a unit, as "
        "Hugging Face does: KB, MB, GB (powers of 10), KiB, MiB, GiB (powers of 2), Kb, Mb, Gb "
        "(bits), e.g. '5GB'"
    )


def format_size(n: int) -> str:
    """Human-readable size with binary units, e.g. ``1.2 GiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
