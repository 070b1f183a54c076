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
