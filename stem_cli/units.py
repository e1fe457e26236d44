"""Token counts as people write them on the command line: 4096, 4k, 128K, 1.5k, 1m."""

from __future__ import annotations

import re
from decimal import Decimal

K = 1024
M = 1024 * 1024

_LENGTH = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([kKmM]?)")
_ALLOWED = "use a positive whole token count such as 4096, 4k, 1.5k, 128K or 1m (k = 1024, m = 1024*1024)"


def parse_length(text: str) -> int:
    """Token count from "4096", "4k", "128K", "1.5k" or "1m"; ValueError for anything else."""
    match = _LENGTH.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"bad length {text!r}: {_ALLOWED}")
    number, suffix = match.groups()
    # Decimal keeps "1.5k" exact, so only fractions that land on a whole token count pass.
    value = Decimal(number) * {"": 1, "k": K, "m": M}[suffix.lower()]
    if value <= 0 or value != value.to_integral_value():
        raise ValueError(f"bad length {text!r}: {_ALLOWED}")
    return int(value)


def parse_lengths(text: str) -> list[int]:
    """Comma-separated token counts, "4k,8k,16k" -> [4096, 8192, 16384]."""
    try:
        return [parse_length(item) for item in text.split(",")]
    except ValueError as error:
        raise ValueError(f"bad length list {text!r}: {error}") from None


def format_length(n: int) -> str:
    """Short form that parse_length reads back: 4096 -> "4K", 1048576 -> "1M", 1000 -> "1000"."""
    if n > 0 and n % M == 0:
        return f"{n // M}M"
    if n > 0 and n % K == 0:
        return f"{n // K}K"
    return str(n)
