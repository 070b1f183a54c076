"""What boot reads and what it returns: BootSource in, BootImage out.

``read_boot_source`` reads the files a partition boots from (an ELF image, or
a Linux kernel and its initrd) and says which convention boots them; every
file problem is an ImageError there, before any resource is taken.
``osvmm.boot.prepare.prepare`` then turns a source, a Machine, the command
line and the host's Quirks into a BootImage: the bytes to write at which
guest-physical addresses, the register state at entry, the CPUID features to
hide and the notes for the user. No guest memory exists yet while it runs:
loaders write into ``StagedMemory``, which records the writes and checks each
against the Machine's RAM; the VMM copies them into guest memory later
(``BootImage.write_to``).
"""

from __future__ import annotations

from osvmm.arch.x86.regs import EntryState
from osvmm.errors import ConfigError, GuestMemoryError, ImageError
from osvmm.loader.elf import is_linux, parse_elf
from osvmm.loader.result import LoadedImage, read_image
from osvmm.loader.setup_header import BOOT_FLAG, HDRS_MAGIC
from osvmm.records import Frozen

HDRS_OFFSET = 0x202  # the setup header's "HdrS" magic (Documentation/arch/x86/boot.rst)
BOOT_FLAG_OFFSET = 0x1FE  # boot_flag: 0xAA55, the boot sector signature
ELF_MAGIC = b"\x7fELF"


def is_bzimage(data: bytes) -> bool:
    return data[HDRS_OFFSET : HDRS_OFFSET + 4] == HDRS_MAGIC.to_bytes(4, "little")


def looks_like_boot_sector(data: bytes) -> bool:
    """Whether ``data`` ends its first sector with 0xAA55, as a bzImage's does."""
    return data[BOOT_FLAG_OFFSET : BOOT_FLAG_OFFSET + 2] == BOOT_FLAG.to_bytes(2, "little")


class BootSource(Frozen):
    """The files a partition boots: their names, bytes, and the convention."""

    name: str  # the image or kernel path (for messages)
    data: bytes
    linux: bool  # Linux 64-bit boot protocol (bzImage or vmlinux); else PVH or ELF64
    initrd: bytes | None = None


def read_boot_source(
    image: str | None = None, kernel: str | None = None, initrd: str | None = None
) -> BootSource:
    """Read what to boot: ``image`` (ELF: PVH, ELF64 or a vmlinux) or ``kernel``
    (bzImage or vmlinux), and ``initrd`` for a Linux kernel."""
    if image and kernel:
        raise ConfigError("give either IMAGE or --kernel, not both")
    if not image and not kernel:
        raise ConfigError("nothing to boot: give an IMAGE (or guests:NAME) or --kernel")
    path = kernel or image
    data = read_image(path, "kernel" if kernel else "image")
    if is_bzimage(data):
        linux = True
    elif data[:4] != ELF_MAGIC and looks_like_boot_sector(data):
        found = data[HDRS_OFFSET : HDRS_OFFSET + 4].hex() or "nothing"
        raise ImageError(
            f"{path}: looks like a bzImage (boot sector signature 0xAA55 at 0x1fe) "
            f'with a bad setup header: no "HdrS" magic at 0x202 (found {found}); '
            "the file is corrupt"
        )
    elif kernel:
        linux = True  # a vmlinux; the loader says so if it is not one
    else:
        if data[:4] != ELF_MAGIC:
            raise ImageError(f"{path}: not an ELF image (and no bzImage setup header)")
        linux = is_linux(parse_elf(data, path))
    if initrd and not linux:
        raise ConfigError("--initrd needs a Linux kernel; this image is not one")
    initrd_data = read_image(initrd, "initrd") if initrd else None
    return BootSource(path, data, linux, initrd_data)


class Quirks(Frozen):
    """What this host needs a Linux kernel to avoid (osvmm.vmm.host_quirks)."""

    cpuid_mask: tuple[str, ...] = ()  # CPUID features to clear (arch.x86.cpuid names)
    cmdline_words: tuple[str, ...] = ()  # words added to the kernel command line
    notes: tuple[str, ...] = ()  # one line each, for the user


NO_QUIRKS = Quirks()


class StagedMemory:
    """The guest-physical address space of a Machine before it exists: writes are
    recorded in order, each checked against the RAM ranges (the loaders' interface)."""

    def __init__(self, ram_ranges):
        self.ranges = tuple(ram_ranges)
        self.writes: list[tuple[int, bytes | memoryview | ZeroFill]] = []

    @property
    def size(self) -> int:
        return sum(size for _, size in self.ranges)

    @property
    def end(self) -> int:
        return max(start + size for start, size in self.ranges)

    def contains(self, gpa: int, size: int = 1) -> bool:
        return size >= 0 and any(s <= gpa and gpa + size <= s + z for s, z in self.ranges)

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        """Record ``data`` for ``gpa``: a copy, or the view itself when it is read-only
        (a loader's slice of the image, which nothing changes)."""
        if not self.contains(gpa, len(data)):
            raise GuestMemoryError(
                f"guest range {gpa:#x}+{len(data):#x} is not inside guest memory"
            )
        if not (isinstance(data, memoryview) and data.readonly):
            data = bytes(data)
        self.writes.append((gpa, data))

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        if byte:
            self.write(gpa, bytes([byte]) * size)
            return
        if not self.contains(gpa, size):
            raise GuestMemoryError(f"guest range {gpa:#x}+{size:#x} is not inside guest memory")
        self.writes.append((gpa, ZeroFill(size)))


class ZeroFill(Frozen):
    """``size`` zero bytes, staged by their size alone: an ELF's .bss (p_memsz beyond
    p_filesz) may be most of guest memory, and a small image must not make the VMM
    hold that much in bytes while it prepares the boot."""

    size: int

    def __len__(self) -> int:
        return self.size


class BootImage(Frozen):
    """A partition's boot, ready to write: bytes at addresses, the entry state, the
    CPUID features to hide, and what was adapted for this host (notes)."""

    image: LoadedImage
    writes: tuple[tuple[int, bytes | memoryview | ZeroFill], ...]
    entry: EntryState
    cpuid_mask: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    cmdline: bytes = b""  # as written for the guest, NUL included

    def write_to(self, memory) -> None:
        """Copy every staged write into guest memory (``GuestMemory.write``), in order."""
        for gpa, data in self.writes:
            if isinstance(data, ZeroFill):
                memory.fill(gpa, data.size)
            else:
                memory.write(gpa, data)
