"""The plan's ``[partition.protect]`` table (osvmm/plan/config.py, syntax in
osvmm/writemon/spec.py) and its check before ``osvmm up`` starts anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from osvmm.errors import ConfigError
from osvmm.plan.config import parse_plan
from osvmm.plan.placement import place
from osvmm.plan.topology import read_topology
from osvmm.up.writemon import check_protection, symbols_for
from osvmm.writemon.rules import resolve
from osvmm.writemon.spec import ProtectSpec
from tests import wmkernel as wk

HEAD = """
[[partition]]
name = "k"
cpus = "floating"
memory = "8M"
image = "guests:wmkernel"
"""


def test_protect_table_becomes_a_protect_spec(tmp_path):
    plan = parse_plan(HEAD + wk.protect_toml("fault", "command"), tmp_path)
    assert plan.partitions[0].protect == wk.protect_spec("fault", "command")
    plan = parse_plan(HEAD + '[partition.protect]\nsymbols = "maps/System.map"\n', tmp_path)
    assert plan.partitions[0].protect == ProtectSpec(symbols=str(tmp_path / "maps/System.map"))
    assert parse_plan(HEAD, tmp_path).partitions[0].protect is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('policy = "drop"', "partition 'k': protect: policy: 'drop' is not"),
        ('ranges = ["0x400000"]', "a bare number is no range"),
        ('grants = { driver = ["0+4"] }', "grants: no domain is named 'driver'"),
        ("rangez = []", "unknown key 'rangez'"),
    ],
)
def test_protect_table_errors(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        parse_plan(HEAD + "[partition.protect]\n" + body + "\n", tmp_path)


def test_check_protection_resolves_symbols_of_the_image_and_refuses_bad_ranges(tmp_path):
    topo = read_topology()
    check_protection(place(parse_plan(HEAD + wk.protect_toml(), tmp_path), topo))
    for body, message in (
        ('ranges = ["no_such_symbol..0x400000"]', "no symbol 'no_such_symbol'"),
        ('ranges = ["0x7ff000+8192"]', r"0x7ff000\.\.0x801000 is not inside guest RAM"),
    ):
        plan = parse_plan(HEAD + "[partition.protect]\n" + body + "\n", tmp_path)
        with pytest.raises(ConfigError, match=f"partition 'k': protect: .*{message}"):
            check_protection(place(plan, topo))


def test_a_bzimage_kernel_needs_nokaslr_for_symbols(tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 64)
    body = f"""
[[partition]]
name = "lx"
cpus = "floating"
memory = "64M"
kernel = "{kernel}"
cmdline = "console=ttyS0"
[partition.protect]
ranges = ["kernel-text"]
"""
    with pytest.raises(ConfigError, match="a bzImage relocates itself .KASLR.: add nokaslr"):
        check_protection(place(parse_plan(body, tmp_path), read_topology()))


DEBIAN_VMLINUX = Path.home() / ".cache" / "osvmm" / "kernel" / "vmlinux"


@pytest.mark.skipif(not DEBIAN_VMLINUX.exists(), reason=f"no Debian kernel at {DEBIAN_VMLINUX}")
def test_a_linux_plan_protects_text_and_rodata_from_the_stripped_vmlinux(tmp_path):
    body = f"""
[[partition]]
name = "linux"
cpus = "floating"
memory = "256M"
kernel = "{DEBIAN_VMLINUX}"
cmdline = "console=ttyS0"
[partition.protect]
policy = "log"
arm = "command"
ranges = ["kernel-text", "kernel-rodata"]
domains = {{ kernel = ["kernel-text"] }}
"""
    assignment = place(parse_plan(body, tmp_path), read_topology())
    check_protection(assignment)
    spec = assignment.partitions[0].spec
    rules = resolve(spec.protect, symbols_for(spec, spec.protect), ((0, 256 << 20),))
    assert rules.protected == ((0x1000000, 0x1E01D34), (0x2000000, 0x28EB000))
    assert rules.domains == (("kernel", ((0xFFFFFFFF81000000, 0xFFFFFFFF81E01D32),)),)
    table = rules.table()
    assert len(table) == 5 and table.nbytes == 80  # 80 bytes for 23 MiB protected
