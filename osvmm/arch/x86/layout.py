"""The guest-physical layout of a partition: documented constants only.

Low memory (below 1 MiB) holds what the VMM writes for the boot interface;
the kernel or image loads at 1 MiB and up. docs/boot-interface.md draws it.

    0x0000_0000  real-mode IVT and BDA (left zero)
    0x0000_0500  GDT used by the 64-bit entry convention (selectors 0x10/0x18)
    0x0000_0520  IDT (empty, limit 0: any exception before the guest's own IDT
                 is a triple fault, reported as such)
    0x0000_6000  PVH hvm_start_info, then its memory map
    0x0000_7000  Linux boot_params (the zero page)
    0x0000_8ff0  initial stack pointer for the 64-bit entry (grows down)
    0x0000_9000  PML4, 0xa000 PDPT, 0xb000-0xefff four PDs: identity map of
                 the first 4 GiB with 2 MiB pages (64-bit entry only)
    0x0002_0000  kernel command line (CMDLINE_MAX bytes)
    0x0009_fc00  EBDA: MP floating pointer and MP configuration table
    0x000e_0000  ACPI tables (RSDP first, so the legacy BIOS-area scan finds it)
    0x0010_0000  kernel / ELF image (1 MiB)
    ...          RAM up to the partition's size, or up to MMIO_HOLE_START
    0xc000_0000  32-bit MMIO hole (1 GiB): virtio-mmio devices (a page each),
                 shared-memory channel window, I/O APIC, local APIC
    0x1_0000_0000 RAM above the hole when the partition has more than 3 GiB
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4 * KiB

GDT_ADDR = 0x500
IDT_ADDR = 0x520
PVH_START_INFO_ADDR = 0x6000
PVH_MEMMAP_ADDR = 0x6040
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_POINTER = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four pages, 0xb000-0xefff
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
EBDA_START = 0x9FC00
MPTABLE_ADDR = EBDA_START
BIOS_AREA_START = 0xA0000  # VGA hole, option ROMs and BIOS: reserved up to 1 MiB
ACPI_TABLES_ADDR = 0xE0000
ACPI_TABLES_MAX = 0x20000
HIGH_MEMORY_START = 0x100000  # 1 MiB: where kernels and images load

MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000
# virtio-mmio devices: one page each from the start of the hole, as many as
# irq.VIRTIO_IRQS has IRQs (``virtio_mmio_slot``). Not RAM and not in the e820
# map (as the APIC pages): the DSDT describes each (boot/acpi/dsdt.py) and the
# virtio_mmio driver claims its page itself; a plan's reserved ranges may not
# overlap them (machine.py).
VIRTIO_MMIO_BASE = 0xC000_0000
VIRTIO_MMIO_SIZE = 0x1000
# Shared-memory channels are mapped here, one after another (the hypercall ABI).
CHANNEL_WINDOW_START = 0xD000_0000
CHANNEL_WINDOW_SIZE = 0x1000_0000
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000

# Selectors of the 64-bit entry convention (the Linux 64-bit boot protocol's).
BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20

# KVM needs three pages for the TSS and one for the identity map below 4 GiB
# on Intel hosts; they sit at the top of the MMIO hole, under the LAPIC's page.
KVM_TSS_ADDR = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000
# KVM's identity-map page and its three TSS pages, reserved in the e820 map.
KVM_PRIVATE_SIZE = KVM_TSS_ADDR + 3 * PAGE_SIZE - KVM_IDENTITY_MAP_ADDR

MIN_MEMORY = 2 * MiB

# Transparent huge pages (2 MiB) pay where a partition touches most of each 2 MiB
# it has: a kernel's RAM. A small guest touches a few KiB here and there, and each
# 2 MiB range it touches becomes a whole huge page (4 MiB per extra 16 MiB
# partition instead of 0.3 MiB). With a plan's default, ``hugepages = "auto"``,
# only RAM ranges of at least this size are advised (vmm/enforce.py).
HUGEPAGE_MIN_RANGE = 128 * MiB


def virtio_mmio_slot(index: int) -> tuple[int, int]:
    """(MMIO base, ISA IRQ) of virtio-mmio device ``index`` (0-based, in the order a
    partition's devices are given)."""
    from osvmm.arch.x86.irq import VIRTIO_IRQS

    if not 0 <= index < len(VIRTIO_IRQS):
        raise ValueError(f"virtio device {index}: a partition has at most {len(VIRTIO_IRQS)}")
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE, VIRTIO_IRQS[index]


def ram_regions(mem_size: int) -> list[tuple[int, int]]:
    """Guest-physical RAM ranges for a partition of ``mem_size`` bytes.

    RAM starts at 0; what does not fit below the MMIO hole goes above 4 GiB.
    """
    if mem_size <= MMIO_HOLE_START:
        return [(0, mem_size)]
    return [(0, MMIO_HOLE_START), (MMIO_HOLE_END, mem_size - MMIO_HOLE_START)]
