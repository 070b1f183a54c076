"""A ProtectSpec resolved to numbers and checked: the rules a monitor applies.

``resolve(spec, symbols, ram_ranges)`` looks every symbol up (``symbols``: an
osvmm.loader.ksyms.Symbols, or None when the partition has none), widens every
range to whole 4-byte words (the unit of decision: a range that covers part of
a word covers that word), and checks:

  - each protected range lies in the partition's guest RAM;
  - each grant lies inside protected ranges (a grant elsewhere means nothing);
  - no code address belongs to two domains.

Protected ranges and grants are guest-physical (symbols translated through
the image's load segments); domain code ranges are virtual, as RIP is.
Errors are one-line ConfigErrors naming the range as written.
"""

from __future__ import annotations

from dataclasses import dataclass

from osvmm.errors import ConfigError, ImageError
from osvmm.writemon.spec import Endpoint, ProtectSpec, RangeExpr, parse_range
from osvmm.writemon.table import WORD, CodeMap, PermissionTable

Span = tuple[int, int]


@dataclass(frozen=True)
class Rules:
    """Numbers only: the policy, protected guest-physical word ranges (merged),
    domains (name, virtual code ranges) in declaration order, and grants (domain
    name, guest-physical word ranges). A domain's index is its place in ``domains``."""

    policy: str
    protected: tuple[Span, ...]
    domains: tuple[tuple[str, tuple[Span, ...]], ...] = ()
    grants: tuple[tuple[str, tuple[Span, ...]], ...] = ()

    @property
    def domain_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.domains)

    def table(self) -> PermissionTable:
        index = {name: i for i, (name, _) in enumerate(self.domains)}
        grants: dict[int, list[Span]] = {}
        for name, spans in self.grants:
            grants.setdefault(index[name], []).extend(spans)
        return PermissionTable.build(self.protected, grants)

    def codemap(self) -> CodeMap:
        return CodeMap({i: spans for i, (_, spans) in enumerate(self.domains)})

    def to_json(self) -> dict:
        def spans(ss):
            return [[f"{s:#x}", f"{e:#x}"] for s, e in ss]

        return {
            "policy": self.policy,
            "protected": spans(self.protected),
            "domains": {name: spans(ss) for name, ss in self.domains},
            "grants": {name: spans(ss) for name, ss in self.grants},
        }


def merge(spans) -> tuple[Span, ...]:
    out: list[list[int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return tuple((s, e) for s, e in out)


def words(span: Span) -> Span:
    """``span`` widened to whole words."""
    s, e = span
    return s - s % WORD, -(-e // WORD) * WORD


class _Resolver:
    def __init__(self, symbols, where: str):
        self.symbols = symbols
        self.where = where

    def _symbol(self, name: str, expr: RangeExpr) -> int:
        if self.symbols is None:
            raise ConfigError(
                f"{self.where}: {expr.text!r}: symbol {name!r} needs a symbol source "
                "(the partition's image or kernel, or protect.symbols)"
            )
        try:
            return self.symbols.address(name)
        except ImageError as err:
            raise ConfigError(f"{self.where}: {expr.text!r}: {err}") from None

    def _point(self, ep: Endpoint, expr: RangeExpr, physical: bool) -> int:
        if ep.symbol is None:
            return ep.value
        vaddr = self._symbol(ep.symbol, expr)
        if not physical:
            return vaddr
        try:
            return self.symbols.to_phys(vaddr)
        except ImageError as err:
            raise ConfigError(f"{self.where}: {expr.text!r}: {err}") from None

    def span(self, text: str, physical: bool) -> Span:
        expr = parse_range(text, self.where)
        start = self._point(expr.start, expr, physical)
        if expr.end is not None:
            end = self._point(expr.end, expr, physical)
        elif expr.size is not None:
            end = start + expr.size
        else:
            size = self.symbols.size(expr.start.symbol) if self.symbols is not None else None
            if not size:
                raise ConfigError(
                    f"{self.where}: {text!r}: the symbol has no size here; "
                    f"write {text}..END or {text}+SIZE"
                )
            end = start + size
        if end <= start:
            raise ConfigError(f"{self.where}: {text!r}: {start:#x}..{end:#x} is empty")
        return words((start, end)) if physical else (start, end)


def resolve(spec: ProtectSpec, symbols, ram_ranges, where: str = "protect") -> Rules:
    """The Rules of ``spec`` for a partition with guest RAM ``ram_ranges``."""
    r = _Resolver(symbols, where)
    protected = merge(r.span(t, True) for t in spec.ranges)
    ram = merge((gpa, gpa + size) for gpa, size in ram_ranges)
    for s, e in protected:
        if not any(rs <= s and e <= re for rs, re in ram):
            raise ConfigError(f"{where}: ranges: {s:#x}..{e:#x} is not inside guest RAM")
    domains = tuple((name, merge(r.span(t, False) for t in texts)) for name, texts in spec.domains)
    declared = {name for name, _ in domains}
    grants = []
    for name, texts in spec.grants:
        if name not in declared:
            raise ConfigError(f"{where}: grants: no domain is named {name!r}")
        spans = merge(r.span(t, True) for t in texts)
        for s, e in spans:
            if not _covered((s, e), protected):
                raise ConfigError(
                    f"{where}: grants: {name}: {s:#x}..{e:#x} is not inside the protected ranges"
                )
        grants.append((name, spans))
    spans = sorted((s, e, name) for name, ss in domains for s, e in ss)
    for (s1, e1, n1), (s2, e2, n2) in zip(spans, spans[1:], strict=False):
        if s2 < e1:
            raise ConfigError(
                f"{where}: domains: {n2} {s2:#x}..{e2:#x} overlaps {n1} {s1:#x}..{e1:#x} "
                "(a code address belongs to one domain)"
            )
    return Rules(spec.policy, protected, domains, tuple(grants))


def _covered(span: Span, merged: tuple[Span, ...]) -> bool:
    s, e = span
    return any(ps <= s and e <= pe for ps, pe in merged)
