"""The write monitor's declaration (osvmm/writemon/spec.py) and its resolution to
numbers (osvmm/writemon/rules.py): range syntax, symbols, words, the checks."""

from __future__ import annotations

import pytest

from osvmm.errors import ConfigError
from osvmm.loader.ksyms import Symbols
from osvmm.writemon.rules import resolve
from osvmm.writemon.spec import Endpoint, ProtectSpec, RangeExpr, parse_protect, parse_range

RAM = ((0, 0xA0000), (0x100000, 63 << 20))
KERNEL = Symbols(
    "vmlinux",
    {
        "_text": 0xFFFFFFFF81000000,
        "_etext": 0xFFFFFFFF81E01D32,
        "__start_rodata": 0xFFFFFFFF82000000,
        "__end_rodata": 0xFFFFFFFF828EB000,
        "jiffies": 0xFFFFFFFF82A079C0,
        "drv_start": 0xFFFFFFFF81800000,
        "drv_end": 0xFFFFFFFF81801000,
    },
    {"jiffies": 8},
    segments=(
        (0xFFFFFFFF81000000, 0x1000000, 0x18EACDC),
        (0xFFFFFFFF82A00000, 0x2A00000, 0x644000),
    ),
)


def test_range_syntax():
    assert parse_range("0x400000..0x401000", "w") == RangeExpr(
        "0x400000..0x401000", Endpoint(0x400000), Endpoint(0x401000)
    )
    assert parse_range(" 4096+16 ", "w") == RangeExpr("4096+16", Endpoint(4096), size=16)
    assert parse_range("jiffies", "w") == RangeExpr("jiffies", Endpoint(symbol="jiffies"))
    assert parse_range("kernel-rodata", "w").end == Endpoint(symbol="__end_rodata")
    assert parse_range("_text..0xffffffff81000100", "w").start == Endpoint(symbol="_text")
    for bad, message in (
        ("0x1000", "a bare number is no range"),
        ("0x1000+0", "must be more than 0"),
        ("0x1000+ten", "is not a number"),
        ("a b..c", "is not a number or a symbol name"),
        ("", "a range is a string"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_range(bad, "partition 'k': protect: ranges")


def test_protect_table_checks():
    spec = parse_protect(
        {
            "policy": "log",
            "arm": "command",
            "ranges": ["kernel-text"],
            "domains": {"driver": ["drv_start..drv_end"]},
            "grants": {"driver": "0x1000000+8"},
        },
        "partition 'k'",
    )
    assert spec == ProtectSpec(
        "log",
        "command",
        ("kernel-text",),
        (("driver", ("drv_start..drv_end",)),),
        (("driver", ("0x1000000+8",)),),
    )
    for table, message in (
        ({"policy": "drop"}, "policy: 'drop' is not 'log', 'deny' or 'fault'"),
        ({"arm": "later"}, "arm: 'later' is not 'boot' or 'command'"),
        ({"range": []}, "unknown key 'range'"),
        ({"ranges": [1]}, "expected a list of ranges"),
        ({"domains": {"Driver": []}}, "'Driver' is not 1-32 characters"),
        ({"grants": {"net": ["0+4"]}}, "grants: no domain is named 'net'"),
        ({"domains": {f"d{i}": [] for i in range(63)}}, "63 domains, at most 62"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_protect(table, "partition 'k'")


def test_merged_adds_ranges_domains_and_grants_and_takes_the_new_policy():
    a = ProtectSpec("deny", "command", ("0+8",), (("d", ("1..2",)),), (("d", ("0+4",)),))
    b = ProtectSpec("fault", "boot", ("16+8",), (("d", ("3..4",)), ("e", ("5..6",))))
    m = a.merged(b)
    assert m.policy == "fault" and m.arm == "command"
    assert m.ranges == ("0+8", "16+8")
    assert m.domains == (("d", ("1..2", "3..4")), ("e", ("5..6",)))
    assert m.grants == (("d", ("0+4",)),)


def test_kernel_text_and_rodata_resolve_to_physical_words():
    spec = ProtectSpec(
        ranges=("kernel-text", "kernel-rodata", "jiffies"),
        domains=(("driver", ("drv_start..drv_end",)), ("rest", ("0xffffffff82000000+4096",))),
        grants=(("driver", ("jiffies",)),),
    )
    rules = resolve(spec, KERNEL, RAM)
    # _etext (…1d32) is widened to the word end (…1d34); rodata ends page-aligned
    assert rules.protected == (
        (0x1000000, 0x1E01D34),
        (0x2000000, 0x28EB000),
        (0x2A079C0, 0x2A079C8),
    )
    # code ranges stay virtual (RIP)
    assert rules.domains[0] == ("driver", ((0xFFFFFFFF81800000, 0xFFFFFFFF81801000),))
    assert rules.grants == (("driver", ((0x2A079C0, 0x2A079C8),)),)
    table = rules.table()
    assert table.decide(0x2A079C0, 8, 0) == ()
    assert table.decide(0x2A079C0, 8, 1) == ((0x2A079C0, 0x2A079C8),)
    assert rules.codemap().domain_at(0xFFFFFFFF81800010) == 0


def test_ranges_widen_to_whole_words():
    rules = resolve(ProtectSpec(ranges=("0x100001..0x100006",)), None, RAM)
    assert rules.protected == ((0x100000, 0x100008),)


def test_resolution_errors_name_the_range():
    for spec, message in (
        (ProtectSpec(ranges=("0x0a0000+16",)), r"0xa0000\.\.0xa0010 is not inside guest RAM"),
        (ProtectSpec(ranges=("0x5000000..0x4000000",)), "is empty"),
        (
            ProtectSpec(
                ranges=("0x100000+64",), domains=(("d", ()),), grants=(("d", ("0x100040+4",)),)
            ),
            r"grants: d: 0x100040\.\.0x100044 is not inside the protected ranges",
        ),
        (
            ProtectSpec(domains=(("a", ("0x1000..0x2000",)), ("b", ("0x1ffc+8",)))),
            r"domains: b 0x1ffc\.\.0x2004 overlaps a 0x1000\.\.0x2000",
        ),
        (ProtectSpec(ranges=("nosuch+4",)), "no symbol 'nosuch'"),
        (ProtectSpec(ranges=("_text",)), "the symbol has no size here"),
    ):
        with pytest.raises(ConfigError, match=message):
            resolve(spec, KERNEL, RAM)
    with pytest.raises(ConfigError, match="needs a symbol source"):
        resolve(ProtectSpec(ranges=("kernel-text",)), None, RAM)
