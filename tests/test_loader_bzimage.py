"""bzImage: setup header parsing, the 64-bit load, payload extraction; the real
Debian kernel too when scripts/fetch-debian-kernel has fetched it."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct

import pytest
from test_loader_elf import elf, note

from osvmm.errors import ImageError
from osvmm.loader.bzimage import (
    decompress,
    extract_vmlinux,
    load_bzimage,
    main,
    parse_setup_header,
)
from osvmm.loader.elf import load_elf
from osvmm.loader.result import read_image
from osvmm.loader.setup_header import SetupHeader
from osvmm.vmm.memory import GuestMemory
from tests import helpers

MiB = 1 << 20
VMLINUX = elf(
    entry=0x1000000,
    segments=[{"paddr": 0x1000000, "vaddr": 0xFFFFFFFF81000000, "data": b"\xcc" * 256}],
    notes=note(b"Linux", 0x100, b"salt"),
)


def bzimage(
    *,
    setup_sects: int = 1,
    version: int = 0x020F,
    loadflags: int = 0x01,
    xloadflags: int = 0x7F,
    relocatable: int = 1,
    pref_address: int = 0x1000000,
    init_size: int = 0x200000,
    payload: bytes | None = None,
    pm_pad: int = 0x100,
    syssize: int | None = None,
) -> bytes:
    """A bzImage: setup sectors with the header at its spec offsets, then the
    protected-mode kernel (pm_pad bytes of code, then the payload)."""
    if payload is None:
        payload = lzma.compress(VMLINUX, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    pm = b"\x90" * pm_pad + payload + struct.pack("<I", len(VMLINUX))
    pm += bytes(-len(pm) % 16)  # the kernel's build tool pads to whole paragraphs
    struct.pack_into("<B", setup, 0x1F1, setup_sects)
    struct.pack_into("<I", setup, 0x1F4, syssize if syssize is not None else -(-len(pm) // 16))
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    struct.pack_into("<BB", setup, 0x200, 0xEB, 0x6A)  # jmp: header ends at 0x26c
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<B", setup, 0x211, loadflags)
    struct.pack_into("<I", setup, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", setup, 0x230, 0x200000)  # kernel_alignment
    struct.pack_into("<B", setup, 0x234, relocatable)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2047)  # cmdline_size
    struct.pack_into("<II", setup, 0x248, pm_pad, len(payload))
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + pm


@pytest.fixture
def mem():
    m = GuestMemory([(0, 64 * MiB)])
    yield m
    m.close()


def test_setup_header_fields():
    h = parse_setup_header(bzimage(), "bz")
    assert isinstance(h, SetupHeader)
    assert (h.version_str, h.setup_sects, h.cmdline_size) == ("2.15", 1, 2047)
    assert (h.initrd_addr_max, h.kernel_alignment, h.relocatable_kernel) == (
        0x7FFFFFFF,
        0x200000,
        1,
    )
    assert (h.pref_address, h.init_size, h.payload_offset) == (0x1000000, 0x200000, 0x100)
    assert h.xloadflags == 0x7F and h.loadflags == 1 and h.code32_start == 0x100000


def test_load_at_pref_address_with_64bit_entry(mem):
    data = bzimage()
    img = load_bzimage(data, mem, "bz")
    assert (img.kind, img.start, img.entry) == ("linux64", 0x1000000, 0x1000200)
    assert img.end == 0x1000000 + len(data) - 1024
    assert img.footprint_end == 0x1000000 + 0x200000
    assert mem.read(0x1000000, 0x100) == b"\x90" * 0x100
    assert img.setup_header.type_of_loader == 0xFF
    assert img.setup_header.code32_start == 0x1000000


def test_setup_sects_zero_means_four(mem):
    img = load_bzimage(bzimage(setup_sects=0), mem, "bz")
    assert mem.read(img.start, 0x100) == b"\x90" * 0x100


def test_old_protocol_loads_at_1mib(mem):
    # Before 2.10 there is no pref_address: the kernel goes to 0x100000.
    img = load_bzimage(bzimage(version=0x0209), mem, "bz")
    assert (img.start, img.entry) == (0x100000, 0x100200)


def test_load_address_override(mem):
    img = load_bzimage(bzimage(), mem, "bz", load_addr=0x400000)
    assert img.entry == 0x400200
    with pytest.raises(ImageError, match="not aligned"):
        load_bzimage(bzimage(), mem, "bz", load_addr=0x410000)
    with pytest.raises(ImageError, match="not relocatable"):
        load_bzimage(bzimage(relocatable=0), mem, "bz", load_addr=0x400000)


@pytest.mark.parametrize(
    "image, match",
    [
        (b"\x7fELF" + bytes(100), "too short"),
        (bytes(0x400), 'no "HdrS"'),
        (bzimage()[:0x1FE] + b"\0\0" + bzimage()[0x200:], "boot_flag"),
        (bzimage(version=0x0205), "2.05 is too old"),
        (bzimage(loadflags=0), "LOADED_HIGH"),
        (bzimage(xloadflags=0), "XLF_KERNEL_64"),
        (bzimage(syssize=0x100000), "truncated"),
        (bzimage()[:0x300], "fills the whole file"),
        (bzimage(init_size=0x8000000), "needs 144 MiB of guest memory but the partition has 64"),
        (bzimage(pref_address=0x1010000), "not aligned"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_corrupt_bzimage(mem, image, match):
    with pytest.raises(ImageError, match=match) as e:
        load_bzimage(image, mem, "bz")
    assert str(e.value).startswith("bz: ") and "\n" not in str(e.value)


def test_extract_vmlinux_xz_then_load(mem):
    out = extract_vmlinux(bzimage(), "bz")
    assert out == VMLINUX
    img = load_elf(out, mem, "vmlinux")
    assert (img.kind, img.entry) == ("linux64", 0x1000000)


@pytest.mark.parametrize(
    "compress",
    [
        lambda b: gzip.compress(b),
        lambda b: bz2.compress(b),
        lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE),
    ],
    ids=["gzip", "bzip2", "lzma"],
)
def test_extract_other_compressions(compress):
    assert extract_vmlinux(bzimage(payload=compress(VMLINUX))) == VMLINUX


def test_payload_errors():
    with pytest.raises(ImageError, match="unknown payload compression"):
        extract_vmlinux(bzimage(payload=b"\x00\x01\x02\x03junk"))
    with pytest.raises(ImageError, match="LZ4"):
        decompress(b"\x02\x21\x4c\x18" + bytes(10), "bz")
    xz = bytearray(lzma.compress(VMLINUX, format=lzma.FORMAT_XZ))
    xz[len(xz) // 2] ^= 0xFF
    with pytest.raises(ImageError, match="corrupt compressed payload"):
        extract_vmlinux(bzimage(payload=bytes(xz)))
    with pytest.raises(ImageError, match="not an ELF"):
        extract_vmlinux(bzimage(payload=lzma.compress(b"not an elf", format=lzma.FORMAT_XZ)))
    with pytest.raises(ImageError, match="2.08"):
        extract_vmlinux(bzimage(version=0x0207))


def test_main_extract_and_errors(tmp_path, capsys):
    src = tmp_path / "bz"
    src.write_bytes(bzimage())
    assert main(["extract", str(src), str(tmp_path / "vmlinux")]) == 0
    assert (tmp_path / "vmlinux").read_bytes() == VMLINUX
    assert main(["info", str(src)]) == 0
    assert "protocol 2.15" in capsys.readouterr().out
    assert main(["extract", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


# The real Debian kernel, when scripts/fetch-debian-kernel has put it in the cache.
need_real = pytest.mark.skipif(
    not (helpers.BZIMAGE.exists() and helpers.VMLINUX.exists()),
    reason=f"no Debian kernel in {helpers.KERNEL_DIR}: run scripts/fetch-debian-kernel",
)


@need_real
def test_real_bzimage_header_and_load():
    data = read_image(helpers.BZIMAGE)
    h = parse_setup_header(data, "vmlinuz")
    assert h.version >= 0x020F and h.relocatable_kernel == 1
    assert h.cmdline_size == 2047 and h.initrd_addr_max == 0x7FFFFFFF
    assert h.kernel_alignment == 0x200000 and h.pref_address == 0x1000000
    assert h.xloadflags & 1
    mem = GuestMemory([(0, 256 * MiB)])
    try:
        img = load_bzimage(data, mem, "vmlinuz")
        assert (img.kind, img.entry) == ("linux64", 0x1000200)
        assert img.footprint_end == 0x1000000 + h.init_size
    finally:
        mem.close()


@need_real
@pytest.mark.slow
def test_real_extract_matches_and_loads_vmlinux():
    vmlinux = extract_vmlinux(read_image(helpers.BZIMAGE), "vmlinuz")
    assert vmlinux == read_image(helpers.VMLINUX)
    mem = GuestMemory([(0, 256 * MiB)])
    try:
        img = load_elf(vmlinux, mem, "vmlinux")
        assert img.kind == "linux64" and img.linux
        # startup_64 is the first byte of .text at 16 MiB; the PVH entry is in the image too.
        assert img.entry == 0x1000000 and img.start == 0x1000000
        assert img.start < img.pvh_entry < img.end
        assert img.setup_header.cmdline_size == 2047
    finally:
        mem.close()
