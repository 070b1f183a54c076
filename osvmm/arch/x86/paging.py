"""Identity-mapping page tables for the 64-bit entry (pure).

PML4 at PML4_ADDR -> one PDPT -> four page directories of 2 MiB pages:
guest-virtual = guest-physical for the first 4 GiB.
"""

from __future__ import annotations

import struct

from osvmm.arch.x86.layout import PAGE_SIZE, PD_ADDR, PDPT_ADDR, PML4_ADDR

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_PS = 1 << 7  # a 2 MiB page in a page directory
IDENTITY_MAP_GIB = 4


def identity_page_tables() -> list[tuple[int, bytes]]:
    """(guest-physical address, bytes) of the PML4, the PDPT and the page directories."""
    pml4 = struct.pack("<Q", PDPT_ADDR | PTE_PRESENT | PTE_WRITE) + bytes(PAGE_SIZE - 8)
    pdpt = b"".join(
        struct.pack("<Q", (PD_ADDR + i * PAGE_SIZE) | PTE_PRESENT | PTE_WRITE)
        for i in range(IDENTITY_MAP_GIB)
    ) + bytes(PAGE_SIZE - 8 * IDENTITY_MAP_GIB)
    pds = b"".join(
        struct.pack("<Q", (i << 21) | PTE_PRESENT | PTE_WRITE | PTE_PS)
        for i in range(512 * IDENTITY_MAP_GIB)
    )
    return [(PML4_ADDR, pml4), (PDPT_ADDR, pdpt), (PD_ADDR, pds)]
