"""Register state at guest entry (pure): the PVH entry and the 64-bit entry.

PVH (Xen PVH boot ABI): 32-bit protected mode, paging off, flat CS/DS,
%ebx = guest-physical address of hvm_start_info, EFLAGS.IF = 0.

64-bit entry (osvmm's convention for plain ELF64 images, and Linux's 64-bit
boot protocol): long mode with the identity map of paging.py, GDT at
GDT_ADDR with CS=0x10, DS=ES=SS=0x18, RSP=BOOT_STACK_POINTER, interrupts off;
RBX = hvm_start_info for ELF64 images, RSI = boot_params for Linux.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from osvmm.arch.x86 import gdt
from osvmm.arch.x86.layout import BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PML4_ADDR
from osvmm.records import Frozen

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1


class EntryState(Frozen):
    """The registers a guest is entered with (its entry convention's)."""

    mode: str  # "pvh32" or "long64"
    rip: int
    rsp: int = 0
    rbx: int = 0
    rsi: int = 0
    rflags: int = RFLAGS_RESERVED
    cr0: int = 0
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    segments: Mapping = MappingProxyType({})  # name -> kvm_segment fields (gdt.py)
    gdt: tuple[int, int] = (0, 0)  # base, limit
    idt: tuple[int, int] = (0, 0)


def pvh_entry(entry: int, start_info_addr: int) -> EntryState:
    return EntryState(
        mode="pvh32",
        rip=entry,
        rbx=start_info_addr,
        cr0=CR0_PE | CR0_ET,
        segments=gdt.flat32_segments(),
    )


def long64_entry(entry: int, rbx: int = 0, rsi: int = 0) -> EntryState:
    entries = gdt.boot_gdt()
    return EntryState(
        mode="long64",
        rip=entry,
        rsp=BOOT_STACK_POINTER,
        rbx=rbx,
        rsi=rsi,
        cr0=CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
        cr3=PML4_ADDR,
        cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA,
        segments=gdt.boot_segments(),
        gdt=(GDT_ADDR, 8 * len(entries) - 1),
        idt=(IDT_ADDR, 0),
    )


def apply_entry_state(state: EntryState, sregs, regs) -> None:
    """Write ``state`` into a kvm_sregs (as read from the vCPU) and a fresh kvm_regs."""
    for name in ("cs", "tr"):
        seg = getattr(sregs, name)
        for k, v in state.segments[name].items():
            setattr(seg, k, v)
    for name in ("ds", "es", "fs", "gs", "ss"):
        seg = getattr(sregs, name)
        for k, v in state.segments["data"].items():
            setattr(seg, k, v)
    sregs.gdt.base, sregs.gdt.limit = state.gdt
    sregs.idt.base, sregs.idt.limit = state.idt
    sregs.cr0 = state.cr0
    sregs.cr3 = state.cr3
    sregs.cr4 = state.cr4
    sregs.efer = state.efer
    regs.rip = state.rip
    regs.rsp = state.rsp
    regs.rbx = state.rbx
    regs.rsi = state.rsi
    regs.rflags = state.rflags
