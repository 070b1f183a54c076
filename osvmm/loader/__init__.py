"""Guest image loaders (ELF/PVH, vmlinux, bzImage) and the kernel command-line builder.

Each loader is one function from image bytes and guest memory to a
``LoadedImage`` (kind, entry, extent, and the Linux setup header when there is one).
"""

from osvmm.loader.bzimage import extract_vmlinux, load_bzimage, parse_setup_header
from osvmm.loader.cmdline import Cmdline
from osvmm.loader.elf import load_elf, load_vmlinux
from osvmm.loader.initrd import place_initrd
from osvmm.loader.result import KIND_ELF64, KIND_LINUX64, KIND_PVH, LoadedImage, read_image

__all__ = [
    "KIND_ELF64",
    "KIND_LINUX64",
    "KIND_PVH",
    "Cmdline",
    "LoadedImage",
    "extract_vmlinux",
    "load_bzimage",
    "load_elf",
    "load_vmlinux",
    "parse_setup_header",
    "place_initrd",
    "read_image",
]
