"""What a loader returns: one result object per loaded image (as linux-loader's
``KernelLoaderResult``), plus ``read_image`` that turns every file problem into
an ImageError."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from osvmm.errors import ImageError

# Kinds of loaded image, and the entry convention the VMM uses for each.
KIND_PVH = "pvh"  # Xen PVH: 32-bit protected mode, ebx = hvm_start_info
KIND_ELF64 = "elf64"  # plain ELF64: 64-bit mode at e_entry, identity-mapped
KIND_LINUX64 = "linux64"  # Linux 64-bit boot protocol: rsi = boot_params

# A guest image larger than this is not a kernel we mean to load.
MAX_IMAGE_SIZE = 1 << 30


@dataclass
class LoadedImage:
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
    setup_header: object | None = field(default=None, repr=False)
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
    """The bytes of a guest image file; ImageError if missing, unreadable or empty."""
    p = os.fspath(path)
    try:
        if os.path.isdir(p):
            raise ImageError(f"{what} {p}: is a directory, not an image file")
        with open(p, "rb") as f:
            data = f.read(MAX_IMAGE_SIZE + 1)
    except FileNotFoundError:
        raise ImageError(f"{what} {p}: no such file") from None
    except PermissionError:
        raise ImageError(f"{what} {p}: permission denied") from None
    except OSError as e:
        raise ImageError(f"{what} {p}: cannot read: {e.strerror or e}") from None
    if not data:
        raise ImageError(f"{what} {p}: file is empty")
    if len(data) > MAX_IMAGE_SIZE:
        raise ImageError(f"{what} {p}: larger than {MAX_IMAGE_SIZE >> 20} MiB")
    return data
