"""The write monitor's decisions, pure: the permission table and the code map.

``PermissionTable`` is Mondrian memory protection's sorted segment table: the
guest-physical address space cut at every boundary of a protected range or a
grant, one 64-bit permission entry per segment:

    bit 63 (UNPROTECTED)  no protected word: every write allowed, nothing checked
    bit d, d in 0..61     domain d may write these words
    bit 62 (NO_DOMAIN)    never set: the writer ran outside every domain

Neighbouring segments with equal entries are merged, so the table is canonical
and its size follows the number of permission changes, not the bytes
protected: two arrays of u64 (segment starts, entries), 16 bytes a segment
(``nbytes``). Boundaries are word-aligned (rules.py widens every range to whole
4-byte words), so each byte's decision is its word's.

``decide(addr, size, domain)`` answers for one write: the byte runs inside it
whose words ``domain`` may not write (empty: allowed). A write inside one
segment, the usual case, costs one binary search; one that straddles a
permission boundary is decided segment by segment, that is word by word.

``CodeMap`` gives the domain of a code address (sorted, disjoint ranges);
``writer_domain`` applies it to the RIP KVM reports for a write (see there),
and ``is_rep_string_store`` reads the instruction bytes it needs for that.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable

from osvmm.arch.x86.layout import PAGE_SIZE

WORD = 4
UNPROTECTED = 1 << 63
NO_DOMAIN = 62
ADDRESS_END = 1 << 64

Ranges = Iterable[tuple[int, int]]


class PermissionTable:
    """Sorted segments over [0, 2^64): ``starts[i]`` up to ``starts[i + 1]`` has ``entries[i]``."""

    def __init__(self, starts: array, entries: array):
        self.starts = starts
        self.entries = entries

    @classmethod
    def build(cls, protected: Ranges, grants: dict[int, Ranges]) -> PermissionTable:
        """From protected ranges and grants (domain -> ranges), all [start, end) pairs.
        Grant words outside every protected range are unprotected (rules.py rejects them)."""
        prot_delta: dict[int, int] = defaultdict(int)
        dom_delta: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for start, end in protected:
            if start < end:
                prot_delta[start] += 1
                prot_delta[end] -= 1
        for domain, ranges in grants.items():
            if not 0 <= domain < NO_DOMAIN:
                raise ValueError(f"domain {domain} is not 0..{NO_DOMAIN - 1}")
            for start, end in ranges:
                if start < end:
                    dom_delta[start][domain] += 1
                    dom_delta[end][domain] -= 1
        starts, entries = array("Q", [0]), array("Q", [UNPROTECTED])
        depth = 0
        cover: dict[int, int] = defaultdict(int)
        for point in sorted(set(prot_delta) | set(dom_delta)):
            if point >= ADDRESS_END:  # the end of the address space: nothing follows
                break
            depth += prot_delta.get(point, 0)
            for domain, d in dom_delta.get(point, {}).items():
                cover[domain] += d
            if depth:
                entry = 0
                for domain, n in cover.items():
                    if n:
                        entry |= 1 << domain
            else:
                entry = UNPROTECTED
            if entry == entries[-1]:
                continue
            if starts[-1] == point:  # only at address 0
                entries[-1] = entry
            else:
                starts.append(point)
                entries.append(entry)
        return cls(starts, entries)

    # -- the decision ------------------------------------------------------------
    def entry_at(self, addr: int) -> int:
        return self.entries[bisect_right(self.starts, addr) - 1]

    def decide(self, addr: int, size: int, domain: int) -> tuple[tuple[int, int], ...]:
        """The [start, end) runs of the write [addr, addr + size) that ``domain``
        may not make (merged, in order); () when the whole write is allowed."""
        starts, entries = self.starts, self.entries
        i = bisect_right(starts, addr) - 1
        end = addr + size
        n = len(starts)
        nxt = starts[i + 1] if i + 1 < n else ADDRESS_END
        if end <= nxt:  # inside one segment
            entry = entries[i]
            if entry & UNPROTECTED or entry >> domain & 1:
                return ()
            return ((addr, end),)
        denied: list[tuple[int, int]] = []
        pos = addr
        while pos < end:
            nxt = starts[i + 1] if i + 1 < n else ADDRESS_END
            stop = min(nxt, end)
            entry = entries[i]
            if not (entry & UNPROTECTED or entry >> domain & 1):
                if denied and denied[-1][1] == pos:
                    denied[-1] = (denied[-1][0], stop)
                else:
                    denied.append((pos, stop))
            pos = stop
            i += 1
        return tuple(denied)

    # -- what it covers and costs ----------------------------------------------------
    def segments(self) -> list[tuple[int, int, int]]:
        """(start, end, entry) of every segment."""
        ends = list(self.starts[1:]) + [ADDRESS_END]
        return list(zip(self.starts, ends, self.entries, strict=True))

    def protected_ranges(self) -> list[tuple[int, int]]:
        """The protected bytes as merged [start, end) ranges."""
        out: list[tuple[int, int]] = []
        for start, end, entry in self.segments():
            if entry & UNPROTECTED:
                continue
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
        return out

    @property
    def protected_bytes(self) -> int:
        return sum(end - start for start, end in self.protected_ranges())

    def pages(self) -> list[tuple[int, int]]:
        """Page-aligned ranges holding at least one protected word (merged): what is
        mapped read-only. Every other page stays writable at native speed."""
        out: list[tuple[int, int]] = []
        for start, end in self.protected_ranges():
            lo = start - start % PAGE_SIZE
            hi = -(-end // PAGE_SIZE) * PAGE_SIZE
            if out and lo <= out[-1][1]:
                out[-1] = (out[-1][0], max(hi, out[-1][1]))
            else:
                out.append((lo, hi))
        return out

    @property
    def nbytes(self) -> int:
        """Memory of the table itself (both arrays)."""
        return len(self.starts) * self.starts.itemsize + len(self.entries) * self.entries.itemsize

    def __len__(self) -> int:
        return len(self.starts)


class CodeMap:
    """Code ranges -> domain: sorted, disjoint [start, end) ranges (virtual addresses)."""

    def __init__(self, ranges: dict[int, Ranges]):
        spans: list[tuple[int, int, int]] = []
        for s, e, d in sorted((s, e, d) for d, rs in ranges.items() for s, e in rs if s < e):
            if spans and s < spans[-1][1]:
                ps, pe, pd = spans[-1]
                if pd != d:
                    raise ValueError(
                        f"code range {s:#x}..{e:#x} of domain {d} overlaps "
                        f"{ps:#x}..{pe:#x} of domain {pd}"
                    )
                spans[-1] = (ps, max(pe, e), d)
            else:
                spans.append((s, e, d))
        self.spans = spans
        self.starts = [s for s, _, _ in spans]

    def domain_at(self, addr: int) -> int:
        """The domain whose code holds ``addr``, or NO_DOMAIN."""
        i = bisect_right(self.starts, addr) - 1
        if i >= 0 and addr < self.spans[i][1]:
            return self.spans[i][2]
        return NO_DOMAIN


def writer_domain(codemap: CodeMap, rip: int, rep_string_at_rip: Callable[[], bool]) -> int:
    """The domain of the instruction that made a write, from the RIP KVM reports.

    KVM emulates a write into a read-only slot and reports RIP after the
    instruction (its last byte is at RIP - 1), except inside a rep string
    instruction, where each iteration exits with RIP at the instruction itself.
    Where RIP - 1 and RIP lie in the same domain, that is the answer; at a
    boundary between domains the instruction at RIP is read to tell the two
    cases apart (``rep_string_at_rip``, called only then)."""
    before = codemap.domain_at(rip - 1)
    at = codemap.domain_at(rip)
    if before == at:
        return at
    return at if rep_string_at_rip() else before


_LEGACY_PREFIXES = frozenset((0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67))
_STRING_STORES = frozenset((0xA4, 0xA5, 0xAA, 0xAB))  # movs, stos (byte and wider)


def is_rep_string_store(insn: bytes) -> bool:
    """Whether ``insn`` starts with a REP/REPNE-prefixed MOVS or STOS (64-bit mode)."""
    rep = False
    for i, b in enumerate(insn[:15]):
        if b in _LEGACY_PREFIXES:
            rep = rep or b in (0xF2, 0xF3)
            continue
        if 0x40 <= b <= 0x4F:  # REX: must come last, right before the opcode
            return rep and i + 1 < len(insn) and insn[i + 1] in _STRING_STORES
        return rep and b in _STRING_STORES
    return False
