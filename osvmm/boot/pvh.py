"""The Xen PVH boot ABI's start info (xen/include/public/arch-x86/hvm/start_info.h).

A PVH kernel is entered with %ebx = the guest-physical address of a
``struct hvm_start_info``; version 1 carries the memory map (the same entries
as e820, type numbers included), the command line and the RSDP address.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint32, c_uint64

XEN_HVM_START_MAGIC_VALUE = 0x336EC578


class hvm_start_info(ctypes.Structure):
    _fields_ = [
        ("magic", c_uint32),
        ("version", c_uint32),
        ("flags", c_uint32),
        ("nr_modules", c_uint32),
        ("modlist_paddr", c_uint64),
        ("cmdline_paddr", c_uint64),
        ("rsdp_paddr", c_uint64),
        ("memmap_paddr", c_uint64),
        ("memmap_entries", c_uint32),
        ("reserved", c_uint32),
    ]


assert ctypes.sizeof(hvm_start_info) == 56


class hvm_memmap_table_entry(ctypes.Structure):
    _fields_ = [("addr", c_uint64), ("size", c_uint64), ("type", c_uint32), ("reserved", c_uint32)]


assert ctypes.sizeof(hvm_memmap_table_entry) == 24


class hvm_modlist_entry(ctypes.Structure):
    _fields_ = [
        ("paddr", c_uint64),
        ("size", c_uint64),
        ("cmdline_paddr", c_uint64),
        ("reserved", c_uint64),
    ]


assert ctypes.sizeof(hvm_modlist_entry) == 32


def build_start_info(
    memmap: list[tuple[int, int, int]],
    memmap_addr: int,
    cmdline_addr: int = 0,
    rsdp_addr: int = 0,
    modules: list[tuple[int, int]] = (),
    modlist_addr: int = 0,
) -> tuple[bytes, bytes, bytes]:
    """Return (start info, memory map, module list) bytes.

    ``memmap``: (addr, size, e820 type) entries; ``modules``: (paddr, size),
    e.g. an initrd, listed at ``modlist_addr``.
    """
    info = hvm_start_info(
        magic=XEN_HVM_START_MAGIC_VALUE,
        version=1,
        nr_modules=len(modules),
        modlist_paddr=modlist_addr if modules else 0,
        cmdline_paddr=cmdline_addr,
        rsdp_paddr=rsdp_addr,
        memmap_paddr=memmap_addr,
        memmap_entries=len(memmap),
    )
    table = b"".join(bytes(hvm_memmap_table_entry(a, s, t)) for a, s, t in memmap)
    mods = b"".join(bytes(hvm_modlist_entry(p, s)) for p, s in modules)
    return bytes(info), table, mods
