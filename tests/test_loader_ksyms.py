"""Kernel symbols for the write monitor (osvmm/loader/ksyms.py): kallsyms found in
Debian's stripped vmlinux and checked against its section headers (readelf), a
kallsyms table built here by an independent encoder, ELF symbol tables against
nm, System.map, and virtual-to-physical translation."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from osvmm.errors import ImageError
from osvmm.guests.build import guest_path
from osvmm.loader.ksyms import Symbols, kallsyms, parse_system_map, read_symbols

DEBIAN_VMLINUX = Path.home() / ".cache" / "osvmm" / "kernel" / "vmlinux"
DEBIAN_BZIMAGE = Path.home() / ".cache" / "osvmm" / "kernel" / "vmlinuz"
needs_debian = pytest.mark.skipif(
    not DEBIAN_VMLINUX.exists(), reason=f"no Debian kernel at {DEBIAN_VMLINUX}"
)
needs_binutils = pytest.mark.skipif(
    shutil.which("readelf") is None or shutil.which("nm") is None, reason="no binutils"
)


def readelf_sections(path) -> dict[str, tuple[int, int]]:
    """name -> (address, size) from ``readelf -SW``."""
    out = subprocess.run(["readelf", "-SW", str(path)], capture_output=True, text=True).stdout
    sections = {}
    for m in re.finditer(r"\]\s+(\S+)\s+\S+\s+([0-9a-f]{16})\s+[0-9a-f]+\s+([0-9a-f]+)", out):
        sections[m.group(1)] = (int(m.group(2), 16), int(m.group(3), 16))
    return sections


@needs_debian
@needs_binutils
def test_debian_vmlinux_text_and_rodata_from_kallsyms_match_its_sections():
    syms = read_symbols(str(DEBIAN_VMLINUX))
    assert not syms.sizes  # stripped: these came from kallsyms
    sec = readelf_sections(DEBIAN_VMLINUX)
    text, rodata = sec[".text"], sec[".rodata"]
    # x86 vmlinux.lds.S: _text opens .text and _etext follows it; __start_rodata
    # opens .rodata; __end_rodata is the page-aligned end of RO_DATA (.BTF_ids last).
    assert syms.address("_text") == text[0]
    assert syms.address("_etext") == text[0] + text[1]
    assert syms.address("__start_rodata") == rodata[0]
    btf_ids = sec[".BTF_ids"]
    assert syms.address("__end_rodata") == -(-(btf_ids[0] + btf_ids[1]) // 4096) * 4096
    # loaded at p_paddr: __START_KERNEL_map + 16 MiB is physical 16 MiB
    assert syms.to_phys(syms.address("_text")) == 0x1000000
    assert syms.to_phys(syms.address("__end_rodata")) == syms.address("__end_rodata") - (
        0xFFFFFFFF80000000
    )
    assert len(syms.addresses) > 50000


@needs_debian
def test_debian_bzimage_gives_the_same_symbols_as_its_vmlinux():
    if not DEBIAN_BZIMAGE.exists():
        pytest.skip(f"no {DEBIAN_BZIMAGE}")
    a, b = read_symbols(str(DEBIAN_BZIMAGE)), read_symbols(str(DEBIAN_VMLINUX))
    for name in ("_text", "_etext", "__start_rodata", "__end_rodata", "jiffies"):
        assert a.address(name) == b.address(name)


def encode_kallsyms(symbols, base: int, absolute_percpu: bool) -> tuple[bytes, int]:
    """A kallsyms region as scripts/kallsyms.c lays it out, with a trivial token
    table (each used byte is its own token, plus two multi-byte tokens); returns
    (bytes, offset of the relative base)."""
    tokens = [bytes([c]) if c else b"\x01" for c in range(256)]
    tokens[0x80], tokens[0x81] = b"sys_", b"_fn"
    out = bytearray(b"\xee" * 24)  # something before the tables

    def align():
        while len(out) % 8:
            out.append(0)

    align()
    for _, addr, kind in symbols:
        if absolute_percpu and kind == "A":
            out += struct.pack("<i", addr)
        elif absolute_percpu:
            out += struct.pack("<i", base - 1 - addr)
        else:
            out += struct.pack("<I", addr - base)
    align()
    base_at = len(out)
    out += struct.pack("<Q", base)
    out += struct.pack("<I", len(symbols))
    align()
    for name, _, kind in symbols:
        raw = (kind + name).encode().replace(b"sys_", b"\x80").replace(b"_fn", b"\x81")
        n = len(raw)
        out += bytes([n]) if n < 0x80 else bytes([0x80 | n & 0x7F, n >> 7])
        out += raw
    align()
    out += struct.pack("<I", 0)  # markers (one per 256 symbols)
    align()
    offsets, o = [], 0
    for t in tokens:
        out += t + b"\0"
        offsets.append(o)
        o += len(t) + 1
    align()
    out += struct.pack("<256H", *offsets)
    out += b"\xee" * 40
    return bytes(out), base_at


BASE = 0xFFFFFFFF81000000
SYMS = [
    ("__per_cpu_start", 0x0, "A"),
    ("fixed_percpu_data", 0x28, "A"),
    ("_text", BASE, "T"),
    ("startup_64", BASE, "T"),
    ("sys_read_fn", BASE + 0x1234, "T"),
    ("x" * 200, BASE + 0x2000, "t"),  # a "big" symbol: two length bytes
    ("_etext", BASE + 0xE01D32, "T"),
    ("__start_rodata", BASE + 0x1000000, "D"),
]


@pytest.mark.parametrize("absolute_percpu", [True, False])
def test_kallsyms_decodes_a_table_from_an_independent_encoder(absolute_percpu):
    syms = [s for s in SYMS if absolute_percpu or s[2] != "A"]
    blob, _ = encode_kallsyms(syms, BASE, absolute_percpu)
    got = kallsyms(b"\x00" * 16 + blob, (0xFFFFFFFF82A00000, BASE))
    assert got == {name: addr for name, addr, _ in syms}


def test_kallsyms_absent_or_damaged_is_an_image_error():
    with pytest.raises(ImageError, match="no kallsyms token table"):
        kallsyms(b"\x00" * 4096, (BASE,))
    blob, base_at = encode_kallsyms(SYMS, BASE, True)
    with pytest.raises(ImageError, match="kallsyms tables not found"):
        kallsyms(blob, (BASE + 0x1000,))  # no such relative base
    damaged = bytearray(blob)
    damaged[base_at + 16] = 0  # the first name's length: a zero-length name
    with pytest.raises(ImageError, match="kallsyms tables not found"):
        kallsyms(bytes(damaged), (BASE,))


@needs_binutils
def test_elf_symbol_table_matches_nm_and_has_sizes():
    path = guest_path("wmkernel")
    syms = read_symbols(str(path))
    nm = subprocess.run(["nm", "-S", str(path)], capture_output=True, text=True).stdout
    checked = 0
    for line in nm.splitlines():
        parts = line.split()
        if len(parts) == 4:
            addr, size, _, name = parts
            assert syms.address(name) == int(addr, 16)
            assert syms.size(name) == int(size, 16)
            checked += 1
        elif len(parts) == 3 and parts[1] in "Tt":
            assert syms.address(parts[2]) == int(parts[0], 16)
            checked += 1
    assert checked > 20
    assert syms.address("_text") < syms.address("__driver_start") < syms.address("_etext")
    assert syms.to_phys(syms.address("_text")) == syms.address("_text")  # identity-linked


def test_system_map_and_the_kernel_mapping_without_segments(tmp_path):
    text = "ffffffff81000000 T _text\nffffffff81000000 T startup_64\n\n0000 A __per_cpu_start\n"
    addresses = parse_system_map(text)
    assert addresses == {
        "_text": 0xFFFFFFFF81000000,
        "startup_64": 0xFFFFFFFF81000000,
        "__per_cpu_start": 0,
    }
    path = tmp_path / "System.map"
    path.write_text(text)
    syms = read_symbols(str(path))
    assert syms.to_phys(syms.address("_text")) == 0x1000000
    with pytest.raises(ImageError, match=r"System.map:2: not 'ADDRESS TYPE NAME'"):
        parse_system_map("ffffffff81000000 T _text\nrubbish\n")
    with pytest.raises(ImageError, match="no symbol 'nope'"):
        syms.address("nope")


def test_translation_through_segments_covers_padding_but_not_beyond():
    syms = Symbols("k", {}, segments=((0xFFFFFFFF81000000, 0x1000000, 0x100), (0x2000, 0x9000, 8)))
    assert syms.to_phys(0xFFFFFFFF81000080) == 0x1000080
    assert syms.to_phys(0xFFFFFFFF81000100) == 0x1000100  # a segment's end
    assert syms.to_phys(0x2004) == 0x9004
    assert syms.to_phys(0x3000) == 0xA000  # padding after the low segment
    with pytest.raises(ImageError, match="outside the load segments"):
        syms.to_phys(0xFFFFFFFF81000101)
    with pytest.raises(ImageError, match="outside the load segments"):
        syms.to_phys(0x1000)
