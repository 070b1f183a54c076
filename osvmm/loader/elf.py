"""ELF images: a parser written from the System V ABI / ELF spec, and ``load_elf``.

Three kinds of ELF are loaded, told apart by their notes:
  - "pvh": an ELF32 or ELF64 with the Xen note XEN_ELFNOTE_PHYS32_ENTRY
    (type 18, name "Xen", desc a 32- or 64-bit physical entry), entered in
    32-bit protected mode as the PVH boot ABI says (QEMU accepts ELF32 too);
  - "linux64": a Linux vmlinux (see vmlinux.py), entered at startup_64 by the
    64-bit boot protocol, even when it also has the PVH note;
  - "elf64": any other x86-64 ELF64 executable, entered in 64-bit mode at e_entry.
PT_LOAD segments load at p_paddr; p_memsz beyond p_filesz is zero-filled.
Every inconsistency raises ImageError with one line naming the image.
"""

from __future__ import annotations

import ctypes

from osvmm.arch.x86.layout import HIGH_MEMORY_START, MiB
from osvmm.errors import ImageError
from osvmm.loader.result import KIND_ELF64, KIND_LINUX64, KIND_PVH, LoadedImage
from osvmm.loader.vmlinux import (
    XEN_ELFNOTE_PHYS32_ENTRY,
    XEN_NOTE_NAME,
    default_setup_header,
    is_linux_note,
)
from osvmm.records import Frozen, Record

# e_ident
EI_NIDENT = 16
ELFMAG = b"\x7fELF"
EI_CLASS = 4
EI_DATA = 5
EI_VERSION = 6
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
# e_type
ET_EXEC = 2
ET_DYN = 3  # a shared object, or a position-independent executable
# e_machine
EM_386 = 3
EM_X86_64 = 62
# p_type
PT_LOAD = 1
PT_INTERP = 3  # a dynamically linked program names its interpreter
PT_NOTE = 4
PN_XNUM = 0xFFFF
# Bounds on what a parse may collect from a small file.
MAX_NOTES = 4096
MAX_NOTE_BYTES = 1 << 20  # names and descs of all notes
MAX_SECTION_NAME = 256
# sh_type
SHT_NOTE = 7

MACHINE_NAMES = {EM_386: "i386", EM_X86_64: "x86-64"}
TYPE_NAMES = {ET_EXEC: "ET_EXEC", ET_DYN: "ET_DYN"}


class Elf32_Ehdr(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("e_ident", ctypes.c_uint8 * EI_NIDENT),
        ("e_type", ctypes.c_uint16),
        ("e_machine", ctypes.c_uint16),
        ("e_version", ctypes.c_uint32),
        ("e_entry", ctypes.c_uint32),
        ("e_phoff", ctypes.c_uint32),
        ("e_shoff", ctypes.c_uint32),
        ("e_flags", ctypes.c_uint32),
        ("e_ehsize", ctypes.c_uint16),
        ("e_phentsize", ctypes.c_uint16),
        ("e_phnum", ctypes.c_uint16),
        ("e_shentsize", ctypes.c_uint16),
        ("e_shnum", ctypes.c_uint16),
        ("e_shstrndx", ctypes.c_uint16),
    ]


class Elf64_Ehdr(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("e_ident", ctypes.c_uint8 * EI_NIDENT),
        ("e_type", ctypes.c_uint16),
        ("e_machine", ctypes.c_uint16),
        ("e_version", ctypes.c_uint32),
        ("e_entry", ctypes.c_uint64),
        ("e_phoff", ctypes.c_uint64),
        ("e_shoff", ctypes.c_uint64),
        ("e_flags", ctypes.c_uint32),
        ("e_ehsize", ctypes.c_uint16),
        ("e_phentsize", ctypes.c_uint16),
        ("e_phnum", ctypes.c_uint16),
        ("e_shentsize", ctypes.c_uint16),
        ("e_shnum", ctypes.c_uint16),
        ("e_shstrndx", ctypes.c_uint16),
    ]


class Elf32_Phdr(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("p_type", ctypes.c_uint32),
        ("p_offset", ctypes.c_uint32),
        ("p_vaddr", ctypes.c_uint32),
        ("p_paddr", ctypes.c_uint32),
        ("p_filesz", ctypes.c_uint32),
        ("p_memsz", ctypes.c_uint32),
        ("p_flags", ctypes.c_uint32),
        ("p_align", ctypes.c_uint32),
    ]


class Elf64_Phdr(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("p_type", ctypes.c_uint32),
        ("p_flags", ctypes.c_uint32),
        ("p_offset", ctypes.c_uint64),
        ("p_vaddr", ctypes.c_uint64),
        ("p_paddr", ctypes.c_uint64),
        ("p_filesz", ctypes.c_uint64),
        ("p_memsz", ctypes.c_uint64),
        ("p_align", ctypes.c_uint64),
    ]


class Elf32_Shdr(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("sh_name", ctypes.c_uint32),
        ("sh_type", ctypes.c_uint32),
        ("sh_flags", ctypes.c_uint32),
        ("sh_addr", ctypes.c_uint32),
        ("sh_offset", ctypes.c_uint32),
        ("sh_size", ctypes.c_uint32),
        ("sh_link", ctypes.c_uint32),
        ("sh_info", ctypes.c_uint32),
        ("sh_addralign", ctypes.c_uint32),
        ("sh_entsize", ctypes.c_uint32),
    ]


class Elf64_Shdr(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("sh_name", ctypes.c_uint32),
        ("sh_type", ctypes.c_uint32),
        ("sh_flags", ctypes.c_uint64),
        ("sh_addr", ctypes.c_uint64),
        ("sh_offset", ctypes.c_uint64),
        ("sh_size", ctypes.c_uint64),
        ("sh_link", ctypes.c_uint32),
        ("sh_info", ctypes.c_uint32),
        ("sh_addralign", ctypes.c_uint64),
        ("sh_entsize", ctypes.c_uint64),
    ]


class Elf_Nhdr(ctypes.LittleEndianStructure):
    """Elf32_Nhdr and Elf64_Nhdr are the same: three 4-byte words."""

    _pack_ = 1
    _fields_ = [
        ("n_namesz", ctypes.c_uint32),
        ("n_descsz", ctypes.c_uint32),
        ("n_type", ctypes.c_uint32),
    ]


assert ctypes.sizeof(Elf32_Ehdr) == 52
assert ctypes.sizeof(Elf64_Ehdr) == 64
assert ctypes.sizeof(Elf32_Phdr) == 32
assert ctypes.sizeof(Elf64_Phdr) == 56
assert ctypes.sizeof(Elf32_Shdr) == 40
assert ctypes.sizeof(Elf64_Shdr) == 64
assert ctypes.sizeof(Elf_Nhdr) == 12


class Note(Frozen):
    """One ELF note: name, type, descriptor."""

    name: bytes  # without the terminating NUL
    type: int
    desc: bytes


class ElfFile(Record):
    """A parsed (not yet loaded) ELF image."""

    name: str
    elf_class: int  # 32 or 64
    ehdr: Elf32_Ehdr | Elf64_Ehdr
    phdrs: list
    notes: list[Note]
    section_names: list[str]

    @property
    def loads(self) -> list:
        return [p for p in self.phdrs if p.p_type == PT_LOAD and p.p_memsz > 0]


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _parse_notes(
    data: bytes,
    off: int,
    size: int,
    align: int,
    out: list[Note],
    image: str,
    where: str,
    budget: list[int],
) -> None:
    """Notes in data[off:off+size] appended to ``out``; a note whose name or desc runs
    past the block is an ImageError (a PVH entry note the walk skipped would boot the
    image the wrong way), and so are more than MAX_NOTES notes or more than
    ``budget[0]`` bytes of them in all (segments may repeat one another's range)."""
    align = 8 if align == 8 else 4
    end = off + size
    while off + ctypes.sizeof(Elf_Nhdr) <= end:
        if len(out) >= MAX_NOTES:
            raise ImageError(
                f"{image}: more than {MAX_NOTES} ELF notes (a kernel has a few dozen; "
                "note segments or sections that repeat one another?)"
            )
        nh = Elf_Nhdr.from_buffer_copy(data, off)
        name_off = off + ctypes.sizeof(Elf_Nhdr)
        # The desc starts at the next ``align`` boundary after the name, counted from
        # the note's start (for 8: a 4-byte name ends at 16, as .note.gnu.property's).
        desc_off = off + _align(ctypes.sizeof(Elf_Nhdr) + nh.n_namesz, align)
        next_off = desc_off + _align(nh.n_descsz, align)
        if desc_off + nh.n_descsz > end:
            raise ImageError(
                f"{image}: malformed note at {off:#x} in {where}: namesz {nh.n_namesz:#x} "
                f"and descsz {nh.n_descsz:#x} run past its end {end:#x}"
            )
        budget[0] -= nh.n_namesz + nh.n_descsz
        if budget[0] < 0:
            raise ImageError(f"{image}: more than {MAX_NOTE_BYTES >> 10} KiB of ELF notes")
        note_name = data[name_off : name_off + nh.n_namesz].rstrip(b"\0")
        out.append(Note(note_name, nh.n_type, data[desc_off : desc_off + nh.n_descsz]))
        off = next_off


def _section_notes_and_names(
    data: bytes, ehdr, cls, notes: list[Note], name: str, budget: list[int]
) -> list[str]:
    """Section names, and notes from SHT_NOTE sections when no PT_NOTE gave any.

    Section headers are not needed to load an image (strip may drop them), so
    a missing or inconsistent section table is ignored, not an error.
    """
    shdr_t = Elf64_Shdr if cls == 64 else Elf32_Shdr
    shsz = ctypes.sizeof(shdr_t)
    if ehdr.e_shoff == 0 or ehdr.e_shnum == 0 or ehdr.e_shentsize != shsz:
        return []
    if ehdr.e_shoff + ehdr.e_shnum * shsz > len(data):
        return []
    shdrs = [shdr_t.from_buffer_copy(data, ehdr.e_shoff + i * shsz) for i in range(ehdr.e_shnum)]
    want_notes = not notes
    for i, sh in enumerate(shdrs):
        if want_notes and sh.sh_type == SHT_NOTE and sh.sh_offset + sh.sh_size <= len(data):
            where = f"section {i}"
            _parse_notes(
                data, sh.sh_offset, sh.sh_size, sh.sh_addralign, notes, name, where, budget
            )
    names: list[str] = []
    if ehdr.e_shstrndx < len(shdrs):
        strtab = shdrs[ehdr.e_shstrndx]
        if strtab.sh_offset + strtab.sh_size <= len(data):
            table = data[strtab.sh_offset : strtab.sh_offset + strtab.sh_size]
            for sh in shdrs:
                if sh.sh_name < len(table):
                    # At most MAX_SECTION_NAME bytes of each: 65535 sections naming one
                    # long unterminated string would otherwise copy it 65535 times.
                    raw = table[sh.sh_name : sh.sh_name + MAX_SECTION_NAME]
                    names.append(raw.split(b"\0", 1)[0].decode("latin-1"))
    return names


def parse_elf(data: bytes, name: str = "image", e_types: tuple[int, ...] = (ET_EXEC,)) -> ElfFile:
    """Parse and check an ELF header, its program headers and notes.

    ``e_types``: the accepted e_type values (a guest image must be ET_EXEC; a
    host program may also be a static PIE, ET_DYN).
    """
    if len(data) < EI_NIDENT or data[:4] != ELFMAG:
        raise ImageError(f"{name}: not an ELF image (bad magic)")
    ident = data[:EI_NIDENT]
    if ident[EI_CLASS] == ELFCLASS64:
        cls, ehdr_t, phdr_t = 64, Elf64_Ehdr, Elf64_Phdr
    elif ident[EI_CLASS] == ELFCLASS32:
        cls, ehdr_t, phdr_t = 32, Elf32_Ehdr, Elf32_Phdr
    else:
        raise ImageError(f"{name}: unknown ELF class {ident[EI_CLASS]}")
    if ident[EI_DATA] != ELFDATA2LSB:
        raise ImageError(f"{name}: not a little-endian ELF (EI_DATA {ident[EI_DATA]})")
    if ident[EI_VERSION] != EV_CURRENT:
        raise ImageError(f"{name}: unknown ELF version {ident[EI_VERSION]}")
    if len(data) < ctypes.sizeof(ehdr_t):
        raise ImageError(
            f"{name}: truncated ELF header ({len(data)} of {ctypes.sizeof(ehdr_t)} bytes)"
        )
    ehdr = ehdr_t.from_buffer_copy(data)
    if ehdr.e_type not in e_types:
        want = " or ".join(TYPE_NAMES[t] for t in e_types)
        raise ImageError(f"{name}: not an executable ELF (e_type {ehdr.e_type}, want {want})")
    phsz = ctypes.sizeof(phdr_t)
    if ehdr.e_phnum == 0:
        raise ImageError(f"{name}: ELF has no program headers")
    if ehdr.e_phnum == PN_XNUM:
        raise ImageError(f"{name}: ELF with PN_XNUM (65535+) program headers is not supported")
    if ehdr.e_phentsize != phsz:
        raise ImageError(f"{name}: e_phentsize is {ehdr.e_phentsize}, expected {phsz}")
    ph_end = ehdr.e_phoff + ehdr.e_phnum * phsz
    if ph_end > len(data):
        raise ImageError(
            f"{name}: program headers at {ehdr.e_phoff:#x}..{ph_end:#x} "
            f"lie outside the file ({len(data)} bytes)"
        )
    phdrs = [phdr_t.from_buffer_copy(data, ehdr.e_phoff + i * phsz) for i in range(ehdr.e_phnum)]
    notes: list[Note] = []
    budget = [MAX_NOTE_BYTES]
    for i, ph in enumerate(phdrs):
        if ph.p_type in (PT_LOAD, PT_NOTE) and ph.p_offset + ph.p_filesz > len(data):
            raise ImageError(
                f"{name}: segment {i} file range {ph.p_offset:#x}+{ph.p_filesz:#x} "
                f"lies outside the file ({len(data)} bytes)"
            )
        if ph.p_type == PT_NOTE:
            where = f"segment {i}"
            _parse_notes(data, ph.p_offset, ph.p_filesz, ph.p_align, notes, name, where, budget)
    section_names = _section_notes_and_names(data, ehdr, cls, notes, name, budget)
    return ElfFile(name, cls, ehdr, phdrs, notes, section_names)


def pvh_entry(elf: ElfFile) -> int | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY address, or None when the image has no PVH note."""
    for n in elf.notes:
        if n.name == XEN_NOTE_NAME and n.type == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(n.desc) not in (4, 8):
                raise ImageError(
                    f"{elf.name}: PVH entry note has a {len(n.desc)}-byte desc (want 4 or 8)"
                )
            entry = int.from_bytes(n.desc, "little")
            if entry >= 1 << 32:
                raise ImageError(f"{elf.name}: PVH entry {entry:#x} is above 4 GiB")
            return entry
    return None


def is_linux(elf: ElfFile) -> bool:
    if any(is_linux_note(n.name, n.type, n.desc) for n in elf.notes):
        return True
    return "__ksymtab" in elf.section_names


def _physical_entry(elf: ElfFile, linux: bool) -> int:
    """e_entry as a physical address.

    The ELF spec makes e_entry virtual: translate it through the PT_LOAD that
    holds it (e_entry - p_vaddr + p_paddr). An x86-64 vmlinux links its e_entry
    physical (ENTRY(phys_startup_64)) while its segments are virtual, one of
    them (.data..percpu) at p_vaddr 0: for Linux a physical match comes first,
    so the entry is never taken for an offset into the per-CPU segment.
    """
    e = elf.ehdr.e_entry

    def virtual():
        for ph in elf.loads:
            if ph.p_vaddr <= e < ph.p_vaddr + ph.p_memsz:
                return e - ph.p_vaddr + ph.p_paddr
        return None

    def physical():
        for ph in elf.loads:
            if ph.p_paddr <= e < ph.p_paddr + ph.p_memsz:
                return e
        return None

    order = (physical, virtual) if linux else (virtual, physical)
    for find in order:
        entry = find()
        if entry is not None:
            return entry
    raise ImageError(f"{elf.name}: entry point {e:#x} is not inside any PT_LOAD segment")


def _check_segments(elf: ElfFile, mem) -> tuple[int, int]:
    """Check every PT_LOAD against guest memory; return the (start, end) extent."""
    name = elf.name
    loads = elf.loads
    if not loads:
        raise ImageError(f"{name}: ELF has no PT_LOAD segment")
    start = min(p.p_paddr for p in loads)
    end = max(p.p_paddr + p.p_memsz for p in loads)
    for ph in loads:
        if ph.p_filesz > ph.p_memsz:
            raise ImageError(
                f"{name}: PT_LOAD at {ph.p_paddr:#x} has p_filesz {ph.p_filesz:#x} "
                f"> p_memsz {ph.p_memsz:#x}"
            )
        if ph.p_paddr < HIGH_MEMORY_START:
            raise ImageError(
                f"{name}: PT_LOAD at {ph.p_paddr:#x} is below 1 MiB "
                f"(the low MiB holds the boot interface)"
            )
    # In address order, segments are disjoint exactly when each ends before the
    # next begins: one sort and one pass, however many segments there are.
    ordered = sorted(loads, key=lambda p: (p.p_paddr, p.p_memsz))
    for ph, nxt in zip(ordered, ordered[1:], strict=False):
        if nxt.p_paddr < ph.p_paddr + ph.p_memsz:
            raise ImageError(
                f"{name}: PT_LOAD segments at {ph.p_paddr:#x} and {nxt.p_paddr:#x} overlap"
            )
    if end > mem.end:
        need = -(-end // MiB)
        raise ImageError(
            f"{name}: image needs {need} MiB of guest memory "
            f"but the partition has {mem.size // MiB} MiB"
        )
    for ph in loads:
        if not mem.contains(ph.p_paddr, ph.p_memsz):
            raise ImageError(
                f"{name}: PT_LOAD {ph.p_paddr:#x}+{ph.p_memsz:#x} is not inside guest RAM "
                f"(it crosses the MMIO hole)"
            )
    return start, end


def load_elf(data: bytes, mem, name: str = "image") -> LoadedImage:
    """Check an ELF image, load its PT_LOAD segments into ``mem``, say how to enter it."""
    elf = parse_elf(data, name)
    machine = elf.ehdr.e_machine
    pvh = pvh_entry(elf)
    linux = elf.elf_class == 64 and machine == EM_X86_64 and is_linux(elf)
    if linux:
        kind = KIND_LINUX64
    elif pvh is not None:
        if machine not in (EM_386, EM_X86_64):
            raise ImageError(f"{name}: PVH image for machine {machine}, not x86")
        kind = KIND_PVH
    elif elf.elf_class == 32:
        raise ImageError(f"{name}: ELF32 image without a PVH entry note (only PVH ELF32 boots)")
    elif machine != EM_X86_64:
        what = MACHINE_NAMES.get(machine, f"machine {machine}")
        raise ImageError(f"{name}: ELF64 for {what}, not x86-64")
    else:
        kind = KIND_ELF64
    start, end = _check_segments(elf, mem)
    if kind == KIND_PVH:
        entry = pvh
        if not start <= entry < end:
            raise ImageError(f"{name}: PVH entry {entry:#x} is outside the image")
    else:
        entry = _physical_entry(elf, linux)

    view = memoryview(data).toreadonly()
    for ph in elf.loads:
        # A view, not a copy: segments may share file bytes, and their sum is bounded
        # by guest memory, not by the file.
        mem.write(ph.p_paddr, view[ph.p_offset : ph.p_offset + ph.p_filesz])
        if ph.p_memsz > ph.p_filesz:
            mem.fill(ph.p_paddr + ph.p_filesz, ph.p_memsz - ph.p_filesz)

    return LoadedImage(
        kind=kind,
        entry=entry,
        start=start,
        end=end,
        name=name,
        pvh_entry=pvh,
        setup_header=default_setup_header(start, end) if linux else None,
        elf_class=elf.elf_class,
        linux=linux,
    )


def load_vmlinux(data: bytes, mem, name: str = "vmlinux"):
    """Load a Linux vmlinux ELF; ImageError unless it is one (kind "linux64")."""
    img = load_elf(data, mem, name)
    if not img.linux:
        raise ImageError(f"{name}: not a Linux kernel (no Linux ELF note or __ksymtab section)")
    return img
