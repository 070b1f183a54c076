"""The e820 memory map a partition's guest sees, placed as PC firmware places it.

For a machine with RAM [0, mem) below the MMIO hole (and the rest above 4 GiB):

    [0x0000_0000, 0x0009_fc00)  RAM          conventional memory (639 KiB)
    [0x0009_fc00, 0x0010_0000)  reserved     EBDA (MP table), VGA hole, option
                                             ROM and BIOS area (ACPI tables)
    [0x0010_0000, min(mem, 3 GiB))  RAM
    channel window               reserved     when the partition has channels
    [0xfffb_c000, 0xfffc_0000)  reserved     KVM's identity-map page and TSS
    [4 GiB, ...)                 RAM          what did not fit below the hole

What QEMU with SeaBIOS does, and so do we: the I/O APIC (0xfec00000) and local
APIC (0xfee00000) pages are not in the e820 map (Linux reserves them itself
from the MADT/MP table); the KVM identity-map and TSS pages are reserved
(QEMU's ``kvm_arch_init`` adds the same entry for its own placement); every
reserved range of the machine (the channel window) gets an entry so the guest
never takes it for free address space to place PCI BARs or hotplug memory.
"""

from __future__ import annotations

from osvmm.arch.x86 import layout
from osvmm.arch.x86.layout import KVM_PRIVATE_SIZE
from osvmm.machine import Machine
from osvmm.records import Frozen

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5


class E820Entry(Frozen):
    """One e820 entry, as in Linux's struct boot_e820_entry."""

    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def e820_map(machine: Machine) -> list[E820Entry]:
    """The partition's e820 map: sorted, non-overlapping (see the module docstring)."""
    entries = [
        E820Entry(0, layout.EBDA_START, E820_RAM),
        E820Entry(layout.EBDA_START, layout.HIGH_MEMORY_START - layout.EBDA_START, E820_RESERVED),
    ]
    for start, size in machine.ram_ranges:
        end = start + size
        start = max(start, layout.HIGH_MEMORY_START)
        if start < end:
            entries.append(E820Entry(start, end - start, E820_RAM))
    for start, size in machine.reserved:
        entries.append(E820Entry(start, size, E820_RESERVED))
    entries.append(E820Entry(layout.KVM_IDENTITY_MAP_ADDR, KVM_PRIVATE_SIZE, E820_RESERVED))
    entries.sort(key=lambda e: e.addr)
    for prev, cur in zip(entries, entries[1:], strict=False):
        assert prev.end <= cur.addr, f"e820 entries overlap: {prev} {cur}"
    return entries
