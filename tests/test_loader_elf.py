"""ELF / PVH / vmlinux loading of synthetic images, valid and corrupt.

The image builders here (elf, note, pvh_note) are shared with the other loader tests.
"""

from __future__ import annotations

import struct

import pytest

from osvmm.errors import ImageError
from osvmm.loader.elf import load_elf, parse_elf
from osvmm.loader.result import read_image
from osvmm.vmm.memory import GuestMemory

EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """One ELF note, 4-byte aligned."""

    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def pvh_note(entry: int, size: int = 4) -> bytes:
    return note(b"Xen", 18, entry.to_bytes(size, "little"))


def elf(
    *,
    cls: int = 64,
    machine: int | None = None,
    entry: int = 0x100000,
    segments: list[dict] | None = None,
    notes: bytes = b"",
    e_type: int = 2,
) -> bytes:
    """An ELF executable: header, program headers, then each segment's bytes.

    ``segments``: dicts with paddr, data, and optional vaddr, memsz.
    A PT_NOTE segment holding ``notes`` comes first when notes are given.
    """
    if machine is None:
        machine = EM_X86_64 if cls == 64 else EM_386
    if segments is None:
        segments = [{"paddr": 0x100000, "data": b"\xf4" * 16}]
    ehsize, phsize = (64, 56) if cls == 64 else (52, 32)
    nph = len(segments) + (1 if notes else 0)
    off = ehsize + nph * phsize
    phdrs = b""
    body = b""
    if notes:
        phdrs += _phdr(cls, PT_NOTE, off, 0, 0, len(notes), len(notes), 4)
        body += notes
        off += len(notes)
    for s in segments:
        data = s["data"]
        paddr = s["paddr"]
        phdrs += _phdr(
            cls,
            PT_LOAD,
            s.get("offset", off),
            s.get("vaddr", paddr),
            paddr,
            s.get("filesz", len(data)),
            s.get("memsz", len(data)),
            0x1000,
        )
        body += data
        off += len(data)
    ident = b"\x7fELF" + bytes([2 if cls == 64 else 1, 1, 1]) + b"\0" * 9
    if cls == 64:
        hdr = ident + struct.pack(
            "<HHIQQQIHHHHHH", e_type, machine, 1, entry, ehsize, 0, 0, ehsize, phsize, nph, 0, 0, 0
        )
    else:
        hdr = ident + struct.pack(
            "<HHIIIIIHHHHHH", e_type, machine, 1, entry, ehsize, 0, 0, ehsize, phsize, nph, 0, 0, 0
        )
    assert len(hdr) == ehsize
    return hdr + phdrs + body


def _phdr(cls, ptype, offset, vaddr, paddr, filesz, memsz, align) -> bytes:
    if cls == 64:
        return struct.pack("<IIQQQQQQ", ptype, 5, offset, vaddr, paddr, filesz, memsz, align)
    return struct.pack("<IIIIIIII", ptype, offset, vaddr, paddr, filesz, memsz, 5, align)


MiB = 1 << 20


@pytest.fixture
def mem():
    m = GuestMemory([(0, 32 * MiB)])
    yield m
    m.close()


def test_pvh_elf64_loads_at_paddr_and_zero_fills(mem):
    code = bytes(range(1, 33))
    mem.write(0x200000 + 32, b"\xaa" * 64)  # stale bytes the bss must clear
    img = elf(
        entry=0xFFFFFFFF80200000,
        segments=[{"paddr": 0x200000, "vaddr": 0xFFFFFFFF80200000, "data": code, "memsz": 96}],
        notes=pvh_note(0x200010),
    )
    r = load_elf(img, mem, "pvh64")
    assert (r.kind, r.entry, r.start, r.end) == ("pvh", 0x200010, 0x200000, 0x200060)
    assert r.pvh_entry == 0x200010 and not r.linux and r.setup_header is None
    assert mem.read(0x200000, 32) == code
    assert mem.read(0x200020, 64) == bytes(64)


def test_pvh_elf64_with_64bit_desc(mem):
    r = load_elf(elf(notes=pvh_note(0x100004, size=8)), mem)
    assert (r.kind, r.entry) == ("pvh", 0x100004)


def test_pvh_elf32(mem):
    img = elf(cls=32, machine=EM_386, entry=0x100000, notes=pvh_note(0x100008))
    r = load_elf(img, mem, "pvh32")
    assert (r.kind, r.entry, r.elf_class) == ("pvh", 0x100008, 32)
    assert mem.read(0x100000, 16) == b"\xf4" * 16


def test_plain_elf64_entry_translated_from_virtual(mem):
    img = elf(
        entry=0xFFFF800000100008,
        segments=[{"paddr": 0x100000, "vaddr": 0xFFFF800000100000, "data": b"\x90" * 16}],
    )
    r = load_elf(img, mem)
    assert (r.kind, r.entry) == ("elf64", 0x100008)


def test_two_segments_extent(mem):
    img = elf(
        entry=0x100000,
        segments=[
            {"paddr": 0x100000, "data": b"a" * 8},
            {"paddr": 0x300000, "data": b"b" * 8, "memsz": 0x1000},
        ],
    )
    r = load_elf(img, mem)
    assert (r.start, r.end) == (0x100000, 0x301000)
    assert mem.read(0x300000, 8) == b"b" * 8


def test_vmlinux_is_linux64_with_default_setup_header(mem):
    # A vmlinux links e_entry physical (phys_startup_64) and its segments virtual.
    img = elf(
        entry=0x1000000,
        segments=[{"paddr": 0x1000000, "vaddr": 0xFFFFFFFF81000000, "data": b"\xcc" * 64}],
        notes=note(b"Linux", 0x100, b"salt") + pvh_note(0x1000020),
    )
    r = load_elf(img, mem, "vmlinux")
    assert (r.kind, r.entry, r.linux, r.pvh_entry) == ("linux64", 0x1000000, True, 0x1000020)
    h = r.setup_header
    assert h.header == 0x53726448 and h.boot_flag == 0xAA55 and h.version == 0x020F
    assert h.cmdline_size == 2047 and h.initrd_addr_max == 0x7FFFFFFF
    assert h.kernel_alignment == 2 * MiB and h.pref_address == 0x1000000
    assert h.xloadflags & 1 and h.loadflags & 1


def test_vmlinux_virtual_entry_translated(mem):
    img = elf(
        entry=0xFFFFFFFF81000040,
        segments=[{"paddr": 0x1000000, "vaddr": 0xFFFFFFFF81000000, "data": b"\xcc" * 128}],
        notes=note(b"Xen", 6, b"linux\0"),
    )
    r = load_elf(img, mem)
    assert (r.kind, r.entry) == ("linux64", 0x1000040)


def _err(data, mem, match):
    with pytest.raises(ImageError, match=match) as e:
        load_elf(data, mem, "img.elf")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("img.elf: ")


def test_bad_magic(mem):
    _err(b"MZ\x90\x00" + bytes(100), mem, "not an ELF")
    _err(b"", mem, "not an ELF")


def test_truncated_header(mem):
    _err(elf()[:40], mem, "truncated ELF header")


def test_bad_class_and_endianness(mem):
    img = bytearray(elf())
    img[4] = 3
    _err(bytes(img), mem, "unknown ELF class")
    img[4], img[5] = 2, 2
    _err(bytes(img), mem, "little-endian")


def test_not_executable(mem):
    _err(elf(e_type=3), mem, "not an executable")


def test_phdrs_out_of_file(mem):
    img = bytearray(elf())
    struct.pack_into("<Q", img, 32, len(img) - 8)  # e_phoff
    _err(bytes(img), mem, "program headers .* outside the file")


def test_segment_file_range_out_of_file(mem):
    img = elf(segments=[{"paddr": 0x100000, "data": b"x" * 16, "filesz": 4096}])
    _err(img, mem, "file range .* outside the file")


def test_filesz_greater_than_memsz(mem):
    _err(elf(segments=[{"paddr": 0x100000, "data": b"x" * 16, "memsz": 8}]), mem, "p_filesz")


def test_segment_below_1mib(mem):
    _err(elf(entry=0x8000, segments=[{"paddr": 0x8000, "data": b"x"}]), mem, "below 1 MiB")


def test_segment_beyond_guest_memory(mem):
    img = elf(entry=0x100000, segments=[{"paddr": 0x100000, "data": b"x", "memsz": 40 * MiB}])
    _err(img, mem, "needs 41 MiB of guest memory but the partition has 32 MiB")


def test_overlapping_segments(mem):
    segs = [{"paddr": 0x100000, "data": b"x" * 64}, {"paddr": 0x100020, "data": b"y" * 64}]
    _err(elf(segments=segs), mem, "overlap")


def test_no_pt_load(mem):
    _err(elf(segments=[], notes=pvh_note(0x100000)), mem, "no PT_LOAD")


def test_wrong_machine(mem):
    _err(elf(machine=183), mem, "not x86-64")  # EM_AARCH64
    _err(elf(machine=183, notes=pvh_note(0x100000)), mem, "not x86")


def test_plain_elf32_rejected(mem):
    _err(elf(cls=32), mem, "ELF32 image without a PVH")


def test_entry_outside_segments(mem):
    _err(elf(entry=0x500000), mem, "entry point 0x500000 is not inside")
    _err(elf(notes=pvh_note(0x500000)), mem, "PVH entry 0x500000 is outside")


def test_bad_pvh_desc_size(mem):
    _err(elf(notes=note(b"Xen", 18, b"\0\0")), mem, "2-byte desc")


def test_nothing_written_when_invalid(mem):
    img = elf(
        segments=[{"paddr": 0x100000, "data": b"x" * 16}, {"paddr": 0x8000, "data": b"y"}],
    )
    with pytest.raises(ImageError):
        load_elf(img, mem)
    assert mem.read(0x100000, 16) == bytes(16)


def test_parse_notes():
    e = parse_elf(elf(notes=note(b"GNU", 3, b"1234567") + pvh_note(0x100000)))
    assert [(n.name, n.type) for n in e.notes] == [(b"GNU", 3), (b"Xen", 18)]


def test_read_image_errors(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "missing")
    with pytest.raises(ImageError, match="is a directory"):
        read_image(tmp_path)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ImageError, match="file is empty"):
        read_image(tmp_path / "empty")
    (tmp_path / "ok").write_bytes(b"data")
    assert read_image(tmp_path / "ok") == b"data"


def test_vmlinux_physical_entry_not_mistaken_for_percpu_offset(mem):
    # Like Linux's .data..percpu: p_vaddr 0, so a physical e_entry also lies in
    # its virtual range; for Linux the physical reading wins.
    img = elf(
        entry=0x100000,
        segments=[
            {"paddr": 0x100000, "vaddr": 0xFFFFFFFF80100000, "data": b"\xcc" * 64},
            {"paddr": 0x200000, "vaddr": 0, "data": b"p" * 16, "memsz": 0x100100},
        ],
        notes=note(b"Linux", 0x100, b"salt"),
    )
    r = load_elf(img, mem)
    assert (r.kind, r.entry) == ("linux64", 0x100000)


def test_section_notes_used_without_pt_note(mem):
    # An ELF whose only note is in a SHT_NOTE section (no PT_NOTE) is still PVH.
    base = bytearray(elf(entry=0x100000))
    n = pvh_note(0x100004)
    strtab = b"\0.note\0.shstrtab\0"
    note_off = len(base)
    str_off = note_off + len(n)
    sh_off = str_off + len(strtab)
    shdrs = bytes(64)
    shdrs += struct.pack("<IIQQQQIIQQ", 1, 7, 0, 0, note_off, len(n), 0, 0, 4, 0)
    shdrs += struct.pack("<IIQQQQIIQQ", 7, 3, 0, 0, str_off, len(strtab), 0, 0, 1, 0)
    struct.pack_into("<Q", base, 40, sh_off)  # e_shoff
    struct.pack_into("<HHH", base, 58, 64, 3, 2)  # e_shentsize, e_shnum, e_shstrndx
    r = load_elf(bytes(base) + n + strtab + shdrs, mem)
    assert (r.kind, r.entry) == ("pvh", 0x100004)


def test_load_vmlinux_requires_linux(mem):
    from osvmm.loader.elf import load_vmlinux

    with pytest.raises(ImageError, match="not a Linux kernel"):
        load_vmlinux(elf(notes=pvh_note(0x100000)), mem, "guest.elf")
    img = load_vmlinux(elf(notes=note(b"Linux", 0x101, b"\0\0\0\0")), mem)
    assert img.kind == "linux64" and img.setup_header.version == 0x020F
