"""The write monitor's pure decisions (osvmm/writemon/table.py): the permission
table against a naive per-word reference (hypothesis), its canonical form and
memory cost, the pages it protects, the code map and the writer's domain."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from osvmm.writemon.table import (
    NO_DOMAIN,
    UNPROTECTED,
    CodeMap,
    PermissionTable,
    is_rep_string_store,
    writer_domain,
)

TOP = 1 << 64
DOMAINS = 4


def word_ranges(base: int, span_words: int):
    """Word-aligned [start, end) ranges within base + [0, span_words * 4)."""
    return st.lists(
        st.tuples(st.integers(0, span_words - 1), st.integers(1, 24)).map(
            lambda t: (base + 4 * t[0], base + 4 * min(t[0] + t[1], span_words))
        ),
        max_size=6,
    )


BASES = st.sampled_from([0, 0x400000, TOP - 4 * 64])  # the top end of the address space


@st.composite
def configs(draw):
    base = draw(BASES)
    protected = draw(word_ranges(base, 64))
    grants = {d: draw(word_ranges(base, 64)) for d in range(DOMAINS)}
    return base, protected, grants


def reference(protected, grants, addr: int, size: int, domain: int) -> set[int]:
    """The bytes of the write whose word is protected and not granted to ``domain``."""
    denied = set()
    for b in range(addr, addr + size):
        w = b - b % 4
        if any(s <= w < e for s, e in protected) and not any(
            s <= w < e for s, e in grants.get(domain, [])
        ):
            denied.add(b)
    return denied


@settings(max_examples=150, deadline=None)
@given(configs(), st.data())
def test_decide_matches_the_per_word_reference(config, data):
    base, protected, grants = config
    table = PermissionTable.build(protected, grants)
    for _ in range(8):
        addr = base + data.draw(st.integers(-8 if base else 0, 4 * 64 - 1))
        size = data.draw(st.integers(1, min(64, TOP - addr)))
        domain = data.draw(st.sampled_from([*range(DOMAINS), NO_DOMAIN]))
        runs = table.decide(addr, size, domain)
        got = {b for s, e in runs for b in range(s, e)}
        assert got == reference(protected, grants, addr, size, domain)
        # runs: in order, inside the write, merged (no two touching)
        assert all(addr <= s < e <= addr + size for s, e in runs)
        assert all(a[1] < b[0] for a, b in zip(runs, runs[1:], strict=False))


@settings(max_examples=100, deadline=None)
@given(configs())
def test_the_table_is_canonical_and_costs_16_bytes_a_segment(config):
    _, protected, grants = config
    table = PermissionTable.build(protected, grants)
    entries = list(table.entries)
    assert table.starts[0] == 0 and entries[0] == UNPROTECTED or table.starts[0] == 0
    assert list(table.starts) == sorted(set(table.starts))
    assert all(a != b for a, b in zip(entries, entries[1:], strict=False))
    assert table.nbytes == 16 * len(table)
    # the protected bytes and pages, by brute force over the words
    words = {w for s, e in protected for w in range(s, e, 4)}
    assert table.protected_bytes == 4 * len(words)
    pages = {w - w % 4096 for w in words}
    assert {p for s, e in table.pages() for p in range(s, e, 4096)} == pages


def test_size_follows_permission_changes_not_bytes():
    one_mib = PermissionTable.build([(0x1000000, 0x2000000)], {})
    assert len(one_mib) == 3 and one_mib.nbytes == 48  # before, protected, after
    assert one_mib.protected_bytes == 16 << 20
    with_grant = PermissionTable.build([(0x1000000, 0x2000000)], {0: [(0x1000100, 0x1000110)]})
    assert len(with_grant) == 5
    assert with_grant.decide(0x1000100, 16, 0) == ()
    assert with_grant.decide(0x10000FE, 4, 0) == ((0x10000FE, 0x1000100),)  # straddles
    assert with_grant.decide(0x1000100, 16, 1) == ((0x1000100, 0x1000110),)
    assert with_grant.decide(0x10000FC, 24, 0) == ((0x10000FC, 0x1000100), (0x1000110, 0x1000114))
    assert with_grant.decide(0x3000000, 8, NO_DOMAIN) == ()  # unprotected


def test_code_map_merges_a_domains_ranges_and_refuses_overlaps():
    cm = CodeMap({0: [(0x1000, 0x2000), (0x1800, 0x2800)], 1: [(0x3000, 0x3100)]})
    assert cm.spans == [(0x1000, 0x2800, 0), (0x3000, 0x3100, 1)]
    assert [cm.domain_at(a) for a in (0xFFF, 0x1000, 0x27FF, 0x2800, 0x3050, 0x3100)] == [
        NO_DOMAIN,
        0,
        0,
        NO_DOMAIN,
        1,
        NO_DOMAIN,
    ]
    try:
        CodeMap({0: [(0x1000, 0x2000)], 1: [(0x1FFF, 0x3000)]})
    except ValueError as err:
        assert "overlaps" in str(err)
    else:
        raise AssertionError("overlapping domains accepted")


def test_writer_domain_from_the_rip_kvm_reports():
    cm = CodeMap({0: [(0x1000, 0x2000)], 1: [(0x2000, 0x3000)]})
    never = lambda: (_ for _ in ()).throw(AssertionError("instruction read inside a domain"))  # noqa: E731
    # a completed instruction of domain 0: RIP after it
    assert writer_domain(cm, 0x1010, never) == 0
    # the last instruction of domain 0 ends at the boundary: RIP is domain 1's first byte
    assert writer_domain(cm, 0x2000, lambda: False) == 0
    # a rep string instruction at domain 1's first byte, mid-way: RIP is the instruction
    assert writer_domain(cm, 0x2000, lambda: True) == 1
    assert writer_domain(cm, 0x5000, never) == NO_DOMAIN


def test_rep_string_stores_are_told_from_other_instructions():
    yes = ["f3 aa", "f3 ab", "f3 a4", "f3 48 ab", "66 f3 ab", "f2 a5", "f3 48 a5"]
    no = ["aa", "a4", "f3 90", "c7 00 01 00 00 00", "f3 48 89 07", "48 f3 ab", "f3", ""]
    assert all(is_rep_string_store(bytes.fromhex(h)) for h in yes)
    assert not any(is_rep_string_store(bytes.fromhex(h)) for h in no)
