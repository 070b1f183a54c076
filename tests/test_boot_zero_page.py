"""The e820 map and the zero page, read back with struct at the boot protocol's offsets."""

from __future__ import annotations

import struct

import pytest

from osvmm.arch.x86 import layout
from osvmm.boot.bootparams import build_zero_page
from osvmm.boot.e820 import E820_RAM, E820_RESERVED, e820_map
from osvmm.errors import ConfigError, ImageError
from osvmm.machine import Machine

MiB = layout.MiB
GiB = layout.GiB


def parse_e820(zero_page: bytes) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries: count at 0x1e8, 20-byte entries from 0x2d0."""
    count = zero_page[0x1E8]
    return [struct.unpack_from("<QQI", zero_page, 0x2D0 + 20 * i) for i in range(count)]


def test_e820_small_partition():
    entries = [(e.addr, e.size, e.type) for e in e820_map(Machine(256 * MiB, [0]))]
    assert entries == [
        (0, 0x9FC00, E820_RAM),
        (0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),
        (0x100000, 255 * MiB, E820_RAM),
        (0xFFFBC000, 0x4000, E820_RESERVED),
    ]


def test_e820_large_partition_with_channels():
    plan = Machine.build(5 * GiB, [4, 5], numa_nodes=2, channels=True)
    entries = [(e.addr, e.size, e.type) for e in e820_map(plan)]
    assert entries == [
        (0, 0x9FC00, E820_RAM),
        (0x9FC00, 0x60400, E820_RESERVED),
        (0x100000, 0xC0000000 - 0x100000, E820_RAM),
        (0xD0000000, 0x10000000, E820_RESERVED),
        (0xFFFBC000, 0x4000, E820_RESERVED),
        (0x1_0000_0000, 2 * GiB, E820_RAM),
    ]
    # The tables' homes are reserved, never RAM.
    for addr in (layout.MPTABLE_ADDR, layout.ACPI_TABLES_ADDR):
        (kind,) = [t for a, s, t in entries if a <= addr < a + s]
        assert kind == E820_RESERVED
    # Neither APIC page is in the map (as with SeaBIOS).
    for addr in (layout.IOAPIC_ADDR, layout.LAPIC_ADDR):
        assert not [1 for a, s, _ in entries if a <= addr < a + s]


def test_zero_page_fields_for_a_bare_vmlinux():
    plan = Machine(6 * GiB, [0, 1])
    zp = build_zero_page(plan, None, 0x1_2345_6000, 100, 0x2_0000_0000, 0x1_0000_1000, 0xE0000)
    assert len(zp) == 4096
    assert struct.unpack_from("<Q", zp, 0x070)[0] == 0xE0000  # acpi_rsdp_addr
    assert struct.unpack_from("<H", zp, 0x1FE)[0] == 0xAA55  # boot_flag
    assert zp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", zp, 0x206)[0] >= 0x020C  # version
    assert zp[0x210] == 0xFF  # type_of_loader
    assert zp[0x211] & 0x01  # loadflags: LOADED_HIGH
    (cmd_lo,) = struct.unpack_from("<I", zp, 0x228)
    (cmd_hi,) = struct.unpack_from("<I", zp, 0x0C8)
    assert cmd_hi << 32 | cmd_lo == 0x1_2345_6000
    rd_lo, rd_size_lo = struct.unpack_from("<II", zp, 0x218)
    rd_hi, rd_size_hi = struct.unpack_from("<II", zp, 0x0C0)
    assert rd_hi << 32 | rd_lo == 0x2_0000_0000
    assert rd_size_hi << 32 | rd_size_lo == 0x1_0000_1000
    assert zp[0x1EF] == 0  # sentinel: the kernel must not scrub what we set
    assert parse_e820(zp) == [(e.addr, e.size, e.type) for e in e820_map(plan)]
    assert parse_e820(zp)[-1] == (4 * GiB, 2 * GiB + 1 * GiB, E820_RAM)


def bzimage_header(version=0x020F, cmdline_size=2047, initrd_addr_max=0x7FFFFFFF, xloadflags=0):
    """Bytes from 0x1f1 of a (synthetic) bzImage setup header."""
    hdr = bytearray(0x26C - 0x1F1)

    def put(fmt, absolute, value):
        struct.pack_into(fmt, hdr, absolute - 0x1F1, value)

    put("<B", 0x1F1, 27)  # setup_sects
    put("<H", 0x1FE, 0xAA55)
    put("<I", 0x202, 0x53726448)
    put("<H", 0x206, version)
    put("<B", 0x211, 0x01)  # loadflags from the image: LOADED_HIGH
    put("<I", 0x22C, initrd_addr_max)
    put("<I", 0x230, 0x200000)  # kernel_alignment
    put("<H", 0x236, xloadflags)
    put("<I", 0x238, cmdline_size)
    return bytes(hdr) + b"\x90" * 16  # trailing bytes past the header are ignored


def test_zero_page_keeps_the_images_setup_header():
    plan = Machine(64 * MiB, [0])
    zp = build_zero_page(plan, bzimage_header(), layout.CMDLINE_ADDR, 30, 0x3000000, 0x1000, 0)
    assert zp[0x1F1] == 27
    assert struct.unpack_from("<I", zp, 0x230)[0] == 0x200000  # kept from the image
    assert struct.unpack_from("<I", zp, 0x238)[0] == 2047  # the kernel's limit, kept
    assert zp[0x210] == 0xFF
    assert zp[0x211] == 0x81  # LOADED_HIGH | CAN_USE_HEAP
    assert struct.unpack_from("<I", zp, 0x228)[0] == layout.CMDLINE_ADDR
    assert struct.unpack_from("<Q", zp, 0x070)[0] == 0
    assert zp[0x26C:0x290] == bytes(0x290 - 0x26C)  # nothing past the header copied


def test_zero_page_rejects_bad_inputs():
    plan = Machine(64 * MiB, [0])
    with pytest.raises(ImageError, match="HdrS"):
        build_zero_page(plan, bytes(0x7B), layout.CMDLINE_ADDR, 10)
    with pytest.raises(ImageError, match="too short"):
        build_zero_page(plan, b"\x1b\x00", layout.CMDLINE_ADDR, 10)
    with pytest.raises(ConfigError, match="exceeds the kernel's limit of 255"):
        build_zero_page(plan, bzimage_header(cmdline_size=255), layout.CMDLINE_ADDR, 300)
    with pytest.raises(ConfigError, match="initrd_addr_max"):
        build_zero_page(
            plan,
            bzimage_header(initrd_addr_max=0x37FFFFFF),
            layout.CMDLINE_ADDR,
            1,
            0x38000000,
            0x1000,
        )
    # A kernel that takes an initrd above 4 GiB (xloadflags bit 1) accepts it there.
    build_zero_page(
        plan,
        bzimage_header(initrd_addr_max=0x37FFFFFF, xloadflags=2),
        layout.CMDLINE_ADDR,
        1,
        0x1_0000_0000,
        0x1000,
    )
    with pytest.raises(ConfigError, match="64 bits"):
        build_zero_page(plan, None, 1 << 64, 1)
