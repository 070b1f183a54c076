"""Guest image loaders (ELF/PVH, vmlinux, bzImage) and the kernel command-line builder.

Each loader is one function from image bytes and guest memory to a
``LoadedImage`` (kind, entry, extent, and the Linux setup header when there is one).
"""

from osvmm.loader.elf import load_elf
from osvmm.loader.result import KIND_ELF64, KIND_LINUX64, KIND_PVH, LoadedImage, read_image

__all__ = ["KIND_ELF64", "KIND_LINUX64", "KIND_PVH", "LoadedImage", "load_elf", "read_image"]
