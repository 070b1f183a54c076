"""Sizes in a plan and on the command line: ``parse_size("64M")``, ``format_size``.

Apart from the plan's parser (config.py) so that ``osvmm run --memory`` needs
none of it (start-up time is part of every command's cost).
"""

from __future__ import annotations

import re

from osvmm.arch.x86.layout import PAGE_SIZE
from osvmm.errors import ConfigError

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"(\d+)(?:\.(\d+))?\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
MAX_SIZE_TEXT = 40  # characters of a size string: '1073741824', '1.5G', '64 MiB'


def clip(text: str, n: int = 60) -> str:
    """``text``, cut to ``n`` characters for a one-line message."""
    return text if len(text) <= n else text[: n - 3] + "..."


def show_value(value: object) -> str:
    """A value for a one-line message: TOML's spelling of booleans, a repr cut short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    try:
        return clip(repr(value))
    except RecursionError:
        return "(a value nested too deeply)"


def parse_size(value: str | int, what: str = "size", multiple: int = PAGE_SIZE) -> int:
    """Bytes from ``"64M"``, ``"1G"``, ``"65536K"``, ``"1.5G"`` or a plain integer.

    Suffixes are binary (K = 1024) and case-insensitive; ``"64MiB"`` and
    ``"64MB"`` mean the same. A decimal is accepted when it comes to a whole
    number of bytes. The result must be positive and a multiple of
    ``multiple`` (the 4 KiB page by default). ``what`` prefixes the message.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{what}: expected a size such as '64M', got {show_value(value)}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.fullmatch(value.strip()) if len(value) <= MAX_SIZE_TEXT else None
        if not m:
            raise ConfigError(f"{what}: {clip(value)!r} is not a size (use K, M or G: '512M')")
        whole, frac, suffix = m.group(1), m.group(2) or "", m.group(3).upper()
        scaled = int(whole + frac) * UNITS[suffix]  # exact: the decimal times 10**len(frac)
        if scaled % 10 ** len(frac):
            raise ConfigError(f"{what}: {show_value(value)} is not a whole number of bytes")
        n = scaled // 10 ** len(frac)
    if n <= 0:
        raise ConfigError(f"{what}: {show_value(value)} must be more than 0 bytes")
    if n % multiple:
        raise ConfigError(
            f"{what}: {show_value(value)} is not a multiple of {format_size(multiple)} ({n} bytes)"
        )
    return n


def format_size(n: int) -> str:
    """The shortest exact K/M/G spelling of ``n`` bytes: 512M, 1536M, 8G, 4100K, 100."""
    for suffix in ("T", "G", "M", "K"):
        unit = UNITS[suffix]
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)
