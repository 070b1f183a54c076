"""Loaders against small hostile images: linear time, bounded memory, honest messages."""

from __future__ import annotations

import struct
import tracemalloc

import pytest

from osvmm.boot.image import NO_QUIRKS, BootSource, StagedMemory, ZeroFill, read_boot_source
from osvmm.boot.prepare import prepare
from osvmm.errors import GuestMemoryError, ImageError
from osvmm.loader.elf import load_elf, parse_elf
from osvmm.machine import Machine
from osvmm.vmm.memory import GuestMemory
from tests.test_inputs_bounded import within
from tests.test_loader_elf import elf, note, pvh_note

MiB = 1 << 20


def test_twenty_thousand_segments_load_in_linear_time():
    segs = [{"paddr": 0x100000 + i * 16, "data": b"\x90" * 8} for i in range(20_000)]
    data = elf(segments=segs)
    machine = Machine.build(64 * MiB, 1)
    with within(2):
        img = load_elf(data, StagedMemory(machine.ram_ranges))
    assert (img.start, img.end) == (0x100000, 0x100000 + 19_999 * 16 + 8)


def test_overlap_found_among_many_segments():
    segs = [{"paddr": 0x100000 + i * 16, "data": b"\x90" * 8} for i in range(5000)]
    segs.append({"paddr": 0x100000 + 2500 * 16 + 4, "data": b"\x90" * 4})
    with within(2), pytest.raises(ImageError, match="overlap"):
        load_elf(elf(segments=segs), StagedMemory(Machine.build(64 * MiB, 1).ram_ranges))


def test_a_large_bss_is_staged_by_its_size():
    # 200 bytes of file, 256 MiB of .bss: preparing the boot must not hold 256 MiB.
    seg = {"paddr": 0x100000, "data": b"\xf4" * 16, "memsz": 256 * MiB}
    data = elf(segments=[seg])
    tracemalloc.start()
    try:
        boot = prepare(BootSource("bss", data, False), Machine.build(512 * MiB, 1), "", NO_QUIRKS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * MiB, peak
    assert (0x100010, ZeroFill(256 * MiB - 16)) in boot.writes


def test_zero_fill_clears_guest_memory():
    mem = GuestMemory([(0, 8 * MiB)])
    try:
        mem.write(0x100000, b"\xaa" * (3 * MiB))
        staged = StagedMemory(((0, 8 * MiB),))
        staged.fill(0x100010, 3 * MiB - 32)
        for gpa, chunk in staged.writes:
            assert isinstance(chunk, ZeroFill)
            mem.fill(gpa, chunk.size)
        assert mem.read(0x100000, 16) == b"\xaa" * 16
        assert mem.read(0x100010, 3 * MiB - 32) == bytes(3 * MiB - 32)
        assert mem.read(0x100000 + 3 * MiB - 16, 16) == b"\xaa" * 16
    finally:
        mem.close()


def test_staged_zero_fill_is_checked_against_ram():
    staged = StagedMemory(((0, 8 * MiB),))
    with pytest.raises(GuestMemoryError):
        staged.fill(7 * MiB, 2 * MiB)


# -- notes ------------------------------------------------------------------------------------


def absurd_pvh_note(namesz: int) -> bytes:
    """A Xen PVH entry note whose namesz runs far past the note segment."""
    return struct.pack("<III", namesz, 4, 18) + b"Xen\0" + (0x100000).to_bytes(4, "little")


@pytest.mark.parametrize("namesz", [0x1000, 0xFFFFFFFF])
def test_pvh_note_with_absurd_namesz_is_rejected(namesz):
    data = elf(notes=absurd_pvh_note(namesz))
    with pytest.raises(ImageError, match=r"malformed note at 0x[0-9a-f]+ in segment 0: namesz"):
        parse_elf(data, "bad-note")


def test_note_with_absurd_descsz_is_rejected():
    bad = struct.pack("<III", 4, 0x7FFFFFFF, 18) + b"Xen\0" + b"\0" * 4
    with pytest.raises(ImageError, match="malformed note"):
        parse_elf(elf(notes=note(b"GNU", 3, b"abcd") + bad), "bad-desc")


def test_well_formed_notes_still_parse():
    e = parse_elf(elf(notes=note(b"GNU", 3, b"1234567") + pvh_note(0x100000)))
    assert [(n.name, n.type) for n in e.notes] == [(b"GNU", 3), (b"Xen", 18)]


# -- a bzImage with a bad setup header ---------------------------------------------------------


def corrupt_bzimage(tmp_path):
    from tests.test_loader_bzimage import bzimage

    data = bytearray(bzimage())
    data[0x202:0x206] = b"HdrX"
    path = tmp_path / "bzImage"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("key", ["image", "kernel"])
def test_bzimage_with_a_bad_header_magic_says_so(tmp_path, key):
    path = corrupt_bzimage(tmp_path)
    with pytest.raises(ImageError) as exc:
        read_boot_source(**{key: str(path)})
    message = str(exc.value)
    assert "looks like a bzImage (boot sector signature 0xAA55 at 0x1fe)" in message
    assert 'bad setup header: no "HdrS" magic at 0x202 (found 48647258)' in message
    assert "not an ELF" not in message


def test_a_file_without_the_boot_signature_is_still_not_an_elf(tmp_path):
    path = tmp_path / "text"
    path.write_bytes(b"hello" * 200)
    with pytest.raises(ImageError, match="not an ELF image"):
        read_boot_source(image=str(path))


@pytest.mark.parametrize("codec", ["xz", "gzip", "bzip2"])
def test_a_payload_that_expands_past_the_limit_is_refused(codec):
    import bz2
    import gzip
    import lzma

    from osvmm.loader.bzimage import decompress

    compress = {
        "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ),
        "gzip": gzip.compress,
        "bzip2": bz2.compress,
    }[codec]
    bomb = compress(bytes(4 * MiB))  # a few KiB that expand to 4 MiB
    assert len(bomb) < 64 * 1024
    with pytest.raises(ImageError, match="decompresses to more than 1 MiB"):
        decompress(bomb, "bomb", limit=MiB)
    assert decompress(bomb, "bomb", limit=4 * MiB) == bytes(4 * MiB)


# -- many notes, sections and segments from one small file ------------------------------------


def elf_with_headers(phdrs: list[bytes], body: bytes, shdrs: bytes = b"", shnum: int = 0) -> bytes:
    """An ELF64 header, the given program headers, ``body``, then section headers."""
    ehsize, phsize = 64, 56
    body_off = ehsize + len(phdrs) * phsize
    shoff = body_off + len(body) if shnum else 0
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    fields = (2, 62, 1, 0x100000, ehsize, shoff, 0, ehsize, phsize, len(phdrs), 64, shnum, 0)
    return ident + struct.pack("<HHIQQQIHHHHHH", *fields) + b"".join(phdrs) + body + shdrs


def phdr(p_type: int, offset: int, paddr: int, filesz: int, memsz: int | None = None) -> bytes:
    memsz = filesz if memsz is None else memsz
    return struct.pack("<IIQQQQQQ", p_type, 5, offset, paddr, paddr, filesz, memsz, 4)


def test_note_segments_that_repeat_one_range_are_bounded():
    # 171 KiB: 1000 PT_NOTE headers over one 120 KB run of empty notes took over a
    # minute and a GiB (10 million notes).
    body_off = 64 + 1001 * 56
    phdrs = [phdr(1, body_off, 0x100000, 16)] + [phdr(4, body_off, 0, 120_000)] * 1000
    data = elf_with_headers(phdrs, bytes(120_000))
    with within(2), pytest.raises(ImageError, match="bomb: more than 4096 ELF notes"):
        parse_elf(data, "bomb")


def test_note_bytes_are_bounded():
    big = struct.pack("<III", 4, 512 * 1024, 1) + b"GNU\0" + bytes(512 * 1024)
    body_off = 64 + 5 * 56
    phdrs = [phdr(1, body_off, 0x100000, 16)] + [phdr(4, body_off, 0, len(big))] * 4
    with pytest.raises(ImageError, match="more than 1024 KiB of ELF notes"):
        parse_elf(elf_with_headers(phdrs, big), "fat")


def test_a_malformed_note_after_a_good_one_names_the_image():
    bad = struct.pack("<III", 4, 0x7FFFFFFF, 18) + b"Xen\0" + b"\0" * 4
    with pytest.raises(ImageError) as exc:
        parse_elf(elf(notes=note(b"GNU", 3, b"abcd") + bad), "img.elf")
    assert str(exc.value).startswith("img.elf: malformed note at ")


def test_section_names_are_read_a_bounded_length():
    # 65535 sections all naming offset 0 of a 1 MiB string table without a NUL.
    table = b"A" * MiB
    body_off = 64 + 56
    shnum = 0xFFFF
    strtab = struct.pack("<IIQQQQIIQQ", 0, 3, 0, 0, body_off + 16, len(table), 0, 0, 1, 0)
    shdrs = strtab * shnum
    data = elf_with_headers([phdr(1, body_off, 0x100000, 16)], bytes(16) + table, shdrs, shnum)
    with within(2):
        parse_elf(data, "names")
    tracemalloc.start()
    try:
        parsed = parse_elf(data, "names")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB  # not 65535 copies of the 1 MiB name
    assert len(parsed.section_names) == shnum and parsed.section_names[0] == "A" * 256


def test_segments_sharing_file_bytes_are_not_copied():
    # 200 PT_LOADs over the same 1 MiB of the file, at 200 disjoint addresses.
    body_off = 64 + 200 * 56
    phdrs = [phdr(1, body_off, 0x100000 + i * MiB, MiB) for i in range(200)]
    data = elf_with_headers(phdrs, b"\x90" * MiB)
    staged = StagedMemory(Machine.build(256 * MiB, 1).ram_ranges)
    tracemalloc.start()
    try:
        load_elf(data, staged, "shared")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, peak >> 20
    assert len(staged.writes) == 200 and bytes(staged.writes[-1][1]) == b"\x90" * MiB


def test_eight_byte_aligned_notes_parse_as_binutils_lays_them_out():
    # .note.gnu.property (p_align 8): a 4-byte name ends at 16, where the desc starts; a
    # walk that padded the name itself to 8 read past the segment and lost the note.
    prop = struct.pack("<III", 4, 16, 5) + b"GNU\0" + bytes(16)
    body_off = 64 + 2 * 56
    phdrs = [phdr(1, body_off + 32, 0x100000, 16), phdr(4, body_off, 0, 32)]
    phdrs[1] = phdrs[1][:-8] + struct.pack("<Q", 8)  # p_align 8
    parsed = parse_elf(elf_with_headers(phdrs, prop + bytes(16)), "prop")
    assert [(n.name, n.type, n.desc) for n in parsed.notes] == [(b"GNU", 5, bytes(16))]


def test_a_real_dynamic_binary_parses(tmp_path):
    import shutil

    ls = shutil.which("ls")
    if ls is None:
        pytest.skip("no ls on this host")
    from pathlib import Path

    from osvmm.loader.elf import ET_DYN, ET_EXEC

    parsed = parse_elf(Path(ls).read_bytes(), "ls", (ET_EXEC, ET_DYN))
    assert any(n.name == b"GNU" for n in parsed.notes)
