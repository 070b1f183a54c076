"""The loader on real images: the bundled guests (built by osvmm.guests.build) and
the Debian vmlinux, checked against GNU readelf as an independent parser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from osvmm.errors import BuildError
from osvmm.loader.elf import PT_LOAD, load_elf, parse_elf, pvh_entry
from osvmm.loader.result import read_image
from osvmm.vmm.memory import GuestMemory
from tests.helpers import VMLINUX

MiB = 1 << 20
READELF = shutil.which("readelf")


@pytest.fixture(scope="module")
def guests_dir() -> Path:
    build = pytest.importorskip("osvmm.guests.build")
    try:
        return build.build_guests()
    except BuildError as e:
        pytest.skip(f"bundled guests cannot be built here: {e}")


def readelf_loads(path: Path) -> list[tuple[int, int, int, int]]:
    """(p_offset, p_paddr, p_filesz, p_memsz) of each LOAD, as GNU readelf -lW reports."""
    out = subprocess.run([READELF, "-lW", str(path)], capture_output=True, text=True, check=True)
    loads = []
    for line in out.stdout.splitlines():
        f = line.split()
        if f and f[0] == "LOAD":
            loads.append((int(f[1], 16), int(f[3], 16), int(f[4], 16), int(f[5], 16)))
    return loads


def readelf_pvh_entry(path: Path) -> int | None:
    out = subprocess.run([READELF, "-nW", str(path)], capture_output=True, text=True, check=True)
    # Each note is an owner line; its "description data:" follows on the same
    # line (-W, older binutils) or on the next one.
    text = re.sub(r"\n\s+description data:", " description data:", out.stdout)
    for line in text.splitlines():
        if re.match(r"\s*Xen\s+0x0000000[48]\s.*\(0x00000012\)", line):
            data = line.split("description data:", 1)[1].split()
            return int.from_bytes(bytes(int(b, 16) for b in data), "little")
    return None


GUEST_KINDS = {
    "hello": "pvh",
    "smp": "pvh",
    "compute": "pvh",
    "ioloop": "pvh",
    "triplefault": "pvh",
    "hello64": "elf64",
}


@pytest.mark.parametrize("name", sorted(GUEST_KINDS))
def test_bundled_guest_loads(guests_dir, name):
    path = guests_dir / f"{name}.elf"
    if not path.exists():
        pytest.skip(f"the guest kit has no {name}.elf")
    data = read_image(path)
    mem = GuestMemory([(0, 64 * MiB)])
    try:
        img = load_elf(data, mem, name)
        assert img.kind == GUEST_KINDS[name]
        assert img.start <= img.entry < img.end
        elf = parse_elf(data, name)
        for ph in elf.phdrs:
            if ph.p_type == PT_LOAD and ph.p_filesz:
                got = mem.read(ph.p_paddr, ph.p_filesz)
                assert got == data[ph.p_offset : ph.p_offset + ph.p_filesz]
        if READELF:
            ours = [
                (p.p_offset, p.p_paddr, p.p_filesz, p.p_memsz)
                for p in elf.phdrs
                if p.p_type == PT_LOAD
            ]
            assert ours == readelf_loads(path)
            assert pvh_entry(elf) == readelf_pvh_entry(path)
    finally:
        mem.close()


@pytest.mark.skipif(
    not VMLINUX.exists(),
    reason="no Debian vmlinux in the cache: run scripts/fetch-debian-kernel",
)
@pytest.mark.skipif(READELF is None, reason="readelf (binutils) is not installed")
def test_debian_vmlinux_agrees_with_readelf():
    data = read_image(VMLINUX)
    elf = parse_elf(data, "vmlinux")
    ours = [
        (p.p_offset, p.p_paddr, p.p_filesz, p.p_memsz) for p in elf.phdrs if p.p_type == PT_LOAD
    ]
    assert ours == readelf_loads(VMLINUX)
    assert pvh_entry(elf) == readelf_pvh_entry(VMLINUX)
    assert "__ksymtab" in elf.section_names
