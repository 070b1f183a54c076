"""Where the initial ramdisk goes, as the Linux/x86 boot protocol asks.

boot.rst: the initrd should sit as high as possible in memory, its last byte
at or below initrd_addr_max (inclusive), page aligned, in RAM, clear of the
kernel (its whole init_size footprint). The 64-bit boot protocol does allow
an initrd above 4 GiB (ext_ramdisk_image), but only when the kernel sets
XLF_CAN_BE_LOADED_ABOVE_4G; keeping it below 4 GiB works for every kernel.
"""

from __future__ import annotations

from osvmm.arch.x86.layout import MMIO_HOLE_START, PAGE_SIZE, MiB
from osvmm.errors import ImageError


def place_initrd(ram_top: int, initrd_len: int, initrd_addr_max: int, kernel_end: int) -> int:
    """The guest-physical address for an initrd of ``initrd_len`` bytes.

    ``ram_top``: one past the last byte of the RAM block that starts at 0
    (the partition's size, or MMIO_HOLE_START when RAM continues above 4 GiB);
    ``initrd_addr_max``: the setup header's (highest address the initrd may use);
    ``kernel_end``: one past the kernel's footprint (LoadedImage.footprint_end).
    """
    if initrd_len <= 0:
        raise ImageError("initrd is empty")
    top = min(ram_top, initrd_addr_max + 1, MMIO_HOLE_START)
    addr = (top - initrd_len) & ~(PAGE_SIZE - 1)
    floor = -(-kernel_end // PAGE_SIZE) * PAGE_SIZE
    if addr < floor:
        room = max(0, top - floor)
        raise ImageError(
            f"initrd of {initrd_len / MiB:.1f} MiB does not fit between the kernel's end "
            f"{kernel_end:#x} and {top:#x} ({room / MiB:.1f} MiB free); "
            "give the partition more memory"
        )
    return addr
