"""What a loader returns: one result object per loaded image (as linux-loader's
``KernelLoaderResult``), plus ``read_image`` that turns every file problem into
an ImageError."""

from __future__ import annotations

import os

from osvmm.errors import ImageError
from osvmm.files import read_input
from osvmm.records import Record

# Kinds of loaded image, and the entry convention the VMM uses for each.
KIND_PVH = "pvh"  # Xen PVH: 32-bit protected mode, ebx = hvm_start_info
KIND_ELF64 = "elf64"  # plain ELF64: 64-bit mode at e_entry, identity-mapped
KIND_LINUX64 = "linux64"  # Linux 64-bit boot protocol: rsi = boot_params

# A guest image larger than this is not a kernel we mean to load.
MAX_IMAGE_SIZE = 1 << 30


class LoadedImage(Record):
    """A guest image placed in guest memory.

    ``entry`` is guest-physical: the PVH 32-bit entry for kind "pvh",
    startup_64 for "linux64" (vmlinux: e_entry translated to physical;
    bzImage: load address + 0x200), e_entry for "elf64".
    ``start``/``end`` bound what was written (end exclusive); for Linux the
    kernel may use memory up to ``start + init_size`` (``footprint_end``).
    ``setup_header`` (Linux only) is an ``osvmm.loader.setup_header.SetupHeader``
    for the VMM to copy into boot_params.hdr.
    """

    kind: str
    entry: int
    start: int
    end: int
    name: str = "image"
    pvh_entry: int | None = None
    setup_header: object | None = None
    elf_class: int = 64
    linux: bool = False

    @property
    def footprint_end(self) -> int:
        """One past the highest address the image may use while it starts."""
        hdr = self.setup_header
        if hdr is not None and getattr(hdr, "init_size", 0):
            return max(self.end, self.start + hdr.init_size)
        return self.end


def read_image(path: str | os.PathLike, what: str = "image") -> bytes:
    """The bytes of a guest image file; ImageError if missing, not a regular file,
    larger than MAX_IMAGE_SIZE (told from its size, before reading), unreadable or empty."""
    p = os.fspath(path)
    data = read_input(p, f"{what} {p}", MAX_IMAGE_SIZE, ImageError)
    if not data:
        raise ImageError(f"{what} {p}: file is empty")
    return data
