"""A partition's write-monitor declaration as written, and the syntax of its ranges.

The plan's ``[partition.protect]`` table and the control socket's ``protect``
request both give a ``ProtectSpec``: strings, checked for syntax only here;
rules.py looks the symbols up and turns it into numbers.

A range is one of:

    START..END      from START up to END (END excluded)
    START+SIZE      SIZE bytes from START
    SYMBOL          the symbol's own extent (ELF symbol tables give sizes)
    kernel-text     _text.._etext          (a Linux kernel's code)
    kernel-rodata   __start_rodata..__end_rodata   (its read-only data)

where START and END are a number (decimal or 0x hex) or a symbol name, and
SIZE a number. Protected ranges and grants are guest-physical: a symbol there
is translated from its virtual address through the image's load segments.
Domain code ranges are virtual (they are matched against RIP).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from osvmm.errors import ConfigError

POLICIES = ("log", "deny", "fault")
ARMING = ("boot", "command")
MAX_DOMAINS = 62  # bits of a permission entry (table.py); bit 62 is "no domain"
NAMED_RANGES = {
    "kernel-text": ("_text", "_etext"),
    "kernel-rodata": ("__start_rodata", "__end_rodata"),
}
PROTECT_KEYS = ("policy", "arm", "ranges", "domains", "grants", "symbols")

_NAME_RE = re.compile(r"[a-z0-9_-]{1,32}")
_SYMBOL_RE = re.compile(r"[A-Za-z_.$][A-Za-z0-9_.$]*")
_NUMBER_RE = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")


@dataclass(frozen=True)
class Endpoint:
    """A number, or a symbol to look up (``symbol`` set)."""

    value: int = 0
    symbol: str | None = None

    def __str__(self) -> str:
        return self.symbol if self.symbol is not None else f"{self.value:#x}"


@dataclass(frozen=True)
class RangeExpr:
    """One parsed range: ``start..end``, ``start+size`` or a symbol's extent."""

    text: str
    start: Endpoint
    end: Endpoint | None = None  # START..END
    size: int | None = None  # START+SIZE; neither: the symbol's own size


def _endpoint(text: str, where: str, whole: str) -> Endpoint:
    text = text.strip()
    if _NUMBER_RE.fullmatch(text):
        return Endpoint(int(text, 0))
    if _SYMBOL_RE.fullmatch(text):
        return Endpoint(symbol=text)
    raise ConfigError(f"{where}: {whole!r}: {text!r} is not a number or a symbol name")


def parse_range(text: str, where: str) -> RangeExpr:
    """Parse one range (syntax above); errors name ``where``."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: a range is a string such as '0x300000+4096', got {text!r}")
    t = text.strip()
    if t in NAMED_RANGES:
        lo, hi = NAMED_RANGES[t]
        return RangeExpr(t, Endpoint(symbol=lo), Endpoint(symbol=hi))
    if ".." in t:
        lo, _, hi = t.partition("..")
        return RangeExpr(t, _endpoint(lo, where, t), _endpoint(hi, where, t))
    if "+" in t:
        lo, _, size = t.partition("+")
        if not _NUMBER_RE.fullmatch(size.strip()):
            raise ConfigError(f"{where}: {t!r}: the size {size.strip()!r} is not a number")
        n = int(size.strip(), 0)
        if n <= 0:
            raise ConfigError(f"{where}: {t!r}: the size must be more than 0")
        return RangeExpr(t, _endpoint(lo, where, t), size=n)
    start = _endpoint(t, where, t)
    if start.symbol is None:
        raise ConfigError(f"{where}: {t!r}: a bare number is no range (write START+SIZE)")
    return RangeExpr(t, start)


@dataclass(frozen=True)
class ProtectSpec:
    """A partition's protection as declared. ``domains`` and ``grants`` are
    (name, ranges) pairs in declaration order; ``symbols`` names the file symbols
    resolve against (default: the partition's kernel or image)."""

    policy: str = "deny"
    arm: str = "boot"
    ranges: tuple[str, ...] = ()
    domains: tuple[tuple[str, tuple[str, ...]], ...] = ()
    grants: tuple[tuple[str, tuple[str, ...]], ...] = ()
    symbols: str | None = field(default=None)

    def merged(self, other: ProtectSpec) -> ProtectSpec:
        """This spec with ``other``'s ranges, domains and grants added and its
        policy (the control socket's ``protect`` adds to a partition's rules)."""
        domains = dict(self.domains)
        for name, ranges in other.domains:
            domains[name] = domains.get(name, ()) + ranges
        grants = dict(self.grants)
        for name, ranges in other.grants:
            grants[name] = grants.get(name, ()) + ranges
        return ProtectSpec(
            other.policy,
            self.arm,
            self.ranges + other.ranges,
            tuple(domains.items()),
            tuple(grants.items()),
            self.symbols,
        )


def _strings(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of ranges such as ['0x300000+4096']")
    for v in value:
        parse_range(v, where)
    return tuple(value)


def _named_lists(value, where: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table such as {{ driver = ['0x101000+512'] }}")
    out = []
    for name, ranges in value.items():
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(f"{where}: {name!r} is not 1-32 characters of a-z 0-9 _ -")
        out.append((name, _strings(ranges, f"{where}: {name}")))
    return tuple(out)


def parse_protect(table, where: str, base_dir=None) -> ProtectSpec:
    """A ProtectSpec from a plan's ``protect`` table (or a control request's fields);
    ``base_dir`` anchors a relative ``symbols`` path."""
    where = f"{where}: protect"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table ([partition.protect])")
    for key in table:
        if key not in PROTECT_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(PROTECT_KEYS)})")
    policy = table.get("policy", "deny")
    if policy not in POLICIES:
        raise ConfigError(f"{where}: policy: {policy!r} is not 'log', 'deny' or 'fault'")
    arm = table.get("arm", "boot")
    if arm not in ARMING:
        raise ConfigError(f"{where}: arm: {arm!r} is not 'boot' or 'command'")
    ranges = _strings(table.get("ranges", []), f"{where}: ranges")
    domains = _named_lists(table.get("domains", {}), f"{where}: domains")
    grants = _named_lists(table.get("grants", {}), f"{where}: grants")
    if len(domains) > MAX_DOMAINS:
        raise ConfigError(f"{where}: domains: {len(domains)} domains, at most {MAX_DOMAINS}")
    declared = {name for name, _ in domains}
    for name, _ in grants:
        if name not in declared:
            raise ConfigError(f"{where}: grants: no domain is named {name!r}")
    symbols = table.get("symbols")
    if symbols is not None:
        if not isinstance(symbols, str) or not symbols:
            raise ConfigError(f"{where}: symbols: expected a file path")
        if base_dir is not None:
            symbols = os.path.join(str(base_dir), os.path.expanduser(symbols))
    return ProtectSpec(policy, arm, ranges, domains, grants, symbols)
