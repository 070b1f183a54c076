"""ctypes mirrors of the <linux/kvm.h> and <asm/kvm.h> structures osvmm uses.

Field names are the header's. Each structure is followed by its size check;
tests/test_kvm_structs.py also compares sizes, offsets and ioctl numbers with
the installed kernel headers through a C compiler.
"""

from __future__ import annotations

import ctypes
import functools
from ctypes import c_int16, c_uint8, c_uint16, c_uint32, c_uint64

# -- memory slots -------------------------------------------------------------


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


assert ctypes.sizeof(kvm_userspace_memory_region) == 32


class kvm_translation(ctypes.Structure):
    """KVM_TRANSLATE: a guest linear address to its guest-physical address."""

    _fields_ = [
        ("linear_address", c_uint64),
        ("physical_address", c_uint64),
        ("valid", c_uint8),
        ("writeable", c_uint8),
        ("usermode", c_uint8),
        ("pad", c_uint8 * 5),
    ]


assert ctypes.sizeof(kvm_translation) == 24

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


assert ctypes.sizeof(kvm_dirty_log) == 16


class kvm_dirty_gfn(ctypes.Structure):
    """One entry of a vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING): page ``offset``
    (in pages) of memslot ``slot`` was written; ``flags`` is KVM_DIRTY_GFN_F_*."""

    _fields_ = [("flags", c_uint32), ("slot", c_uint32), ("offset", c_uint64)]


assert ctypes.sizeof(kvm_dirty_gfn) == 16
assert kvm_dirty_gfn.offset.offset == 8

KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_LOG_PAGE_OFFSET = 64  # a vCPU's ring is mmap'ed at this many pages into its fd

# -- registers ------------------------------------------------------------------


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


assert ctypes.sizeof(kvm_regs) == 144


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


assert ctypes.sizeof(kvm_segment) == 24


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


assert ctypes.sizeof(kvm_dtable) == 16

KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


assert ctypes.sizeof(kvm_sregs) == 312


class kvm_vcpu_events(ctypes.Structure):
    """Only its size matters to osvmm (it is part of kvm_sync_regs)."""

    _fields_ = [("raw", c_uint8 * 64)]


assert ctypes.sizeof(kvm_vcpu_events) == 64


class kvm_sync_regs(ctypes.Structure):
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


assert ctypes.sizeof(kvm_sync_regs) == 520

KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2

# -- CPUID ------------------------------------------------------------------------


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


assert ctypes.sizeof(kvm_cpuid_entry2) == 40

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0
KVM_MAX_CPUID_ENTRIES = 256


class kvm_cpuid2_header(ctypes.Structure):
    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


assert ctypes.sizeof(kvm_cpuid2_header) == 8


@functools.lru_cache(maxsize=32)
def kvm_cpuid2(nent: int) -> type[ctypes.Structure]:
    """struct kvm_cpuid2 with room for ``nent`` entries (a flexible array in C).
    Each of these sized types is made once per size (making a ctypes type takes
    some 25 us, a restore needs eight)."""

    class _kvm_cpuid2(ctypes.Structure):
        _fields_ = [
            ("nent", c_uint32),
            ("padding", c_uint32),
            ("entries", kvm_cpuid_entry2 * nent),
        ]

    return _kvm_cpuid2


# -- interrupts and devices ----------------------------------------------------------


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


assert ctypes.sizeof(kvm_irq_level) == 8


class kvm_irq_routing_irqchip(ctypes.Structure):
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class kvm_irq_routing_entry_u(ctypes.Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("pad", c_uint32 * 8)]


class kvm_irq_routing_entry(ctypes.Structure):
    _fields_ = [
        ("gsi", c_uint32),
        ("type", c_uint32),
        ("flags", c_uint32),
        ("pad", c_uint32),
        ("u", kvm_irq_routing_entry_u),
    ]


assert ctypes.sizeof(kvm_irq_routing_entry) == 48


class kvm_irq_routing_header(ctypes.Structure):
    """struct kvm_irq_routing without its flexible array of entries."""

    _fields_ = [("nr", c_uint32), ("flags", c_uint32)]


assert ctypes.sizeof(kvm_irq_routing_header) == 8


@functools.lru_cache(maxsize=32)
def kvm_irq_routing(n: int) -> type[ctypes.Structure]:
    """struct kvm_irq_routing with room for ``n`` entries."""

    class kvm_irq_routing(ctypes.Structure):
        _fields_ = [("nr", c_uint32), ("flags", c_uint32), ("entries", kvm_irq_routing_entry * n)]

    return kvm_irq_routing


KVM_IRQ_ROUTING_IRQCHIP = 1


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


assert ctypes.sizeof(kvm_pit_config) == 64

KVM_PIT_SPEAKER_DUMMY = 1


class kvm_irqfd(ctypes.Structure):
    """KVM_IRQFD: a write to eventfd ``fd`` raises GSI ``gsi`` (a device's interrupt
    leaves its thread without an ioctl or a vCPU)."""

    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


assert ctypes.sizeof(kvm_irqfd) == 32

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0


class kvm_ioeventfd(ctypes.Structure):
    """KVM_IOEVENTFD: a guest write of ``len`` bytes at ``addr`` (matching ``datamatch``
    with KVM_IOEVENTFD_FLAG_DATAMATCH) signals eventfd ``fd`` inside KVM: the vCPU
    goes on without an exit to the VMM."""

    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", ctypes.c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


assert ctypes.sizeof(kvm_ioeventfd) == 64

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_msi(ctypes.Structure):
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("flags", c_uint32),
        ("devid", c_uint32),
        ("pad", c_uint8 * 12),
    ]


assert ctypes.sizeof(kvm_msi) == 32


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", c_uint32)]


assert ctypes.sizeof(kvm_mp_state) == 4

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", ctypes.c_char * 1024)]


assert ctypes.sizeof(kvm_lapic_state) == 1024


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [
        ("cap", c_uint32),
        ("flags", c_uint32),
        ("args", c_uint64 * 4),
        ("pad", c_uint8 * 64),
    ]


assert ctypes.sizeof(kvm_enable_cap) == 104

KVM_X86_DISABLE_EXITS_MWAIT = 1 << 0
KVM_X86_DISABLE_EXITS_HLT = 1 << 1
KVM_X86_DISABLE_EXITS_PAUSE = 1 << 2
KVM_X86_DISABLE_EXITS_CSTATE = 1 << 3

# -- binary statistics ------------------------------------------------------------------


class kvm_stats_header(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("name_size", c_uint32),
        ("num_desc", c_uint32),
        ("id_offset", c_uint32),
        ("desc_offset", c_uint32),
        ("data_offset", c_uint32),
    ]


assert ctypes.sizeof(kvm_stats_header) == 24


class kvm_stats_desc(ctypes.Structure):
    """Followed in the file by ``name_size`` bytes of NUL-padded name."""

    _fields_ = [
        ("flags", c_uint32),
        ("exponent", c_int16),
        ("size", c_uint16),
        ("offset", c_uint32),
        ("bucket_size", c_uint32),
    ]


assert ctypes.sizeof(kvm_stats_desc) == 16

KVM_STATS_TYPE_MASK = 0xF
KVM_STATS_TYPE_CUMULATIVE = 0
KVM_STATS_TYPE_INSTANT = 1
KVM_STATS_TYPE_PEAK = 2
KVM_STATS_TYPE_LINEAR_HIST = 3
KVM_STATS_TYPE_LOG_HIST = 4

# -- struct kvm_run ------------------------------------------------------------------------
# The header is followed by a 256-byte exit union at offset 32, kvm_valid_regs
# at 288, kvm_dirty_regs at 296 and the 2048-byte sync-regs union at 304.


class kvm_run_io(ctypes.Structure):
    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    ]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_ex(ctypes.Structure):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("fail_entry", kvm_run_fail_entry),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("ex", kvm_run_ex),
        ("padding", ctypes.c_char * 256),
    ]


assert ctypes.sizeof(kvm_run_exit) == 256


class kvm_run_sync(ctypes.Union):
    _fields_ = [("regs", kvm_sync_regs), ("padding", ctypes.c_char * 2048)]


class kvm_run(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", kvm_run_sync),
    ]


assert kvm_run.exit.offset == 32
assert kvm_run.kvm_valid_regs.offset == 288
assert kvm_run.s.offset == 304
assert ctypes.sizeof(kvm_run) == 2352

# Exit reasons (KVM_EXIT_*).
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_MEMORY_FAULT = 39

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

EXIT_REASON_NAMES = {
    value: name[len("KVM_EXIT_") :].lower()
    for name, value in dict(globals()).items()
    if name.startswith("KVM_EXIT_") and not name.startswith("KVM_EXIT_IO_")
}

# -- vCPU and VM state: what a snapshot saves and restores (vmm/snapshot.py) -----------------
# KVM_GET/SET_FPU, _XSAVE, _XCRS, _MSRS, _VCPU_EVENTS (kvm_vcpu_events above, kept
# whole), _DEBUGREGS, _LAPIC and _MP_STATE (above) on a vCPU; KVM_GET/SET_IRQCHIP,
# _PIT2 and _CLOCK on the VM.


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", c_uint8 * 16 * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", c_uint8 * 16 * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


assert ctypes.sizeof(kvm_fpu) == 416


class kvm_xsave(ctypes.Structure):
    """The legacy 4 KiB XSAVE area (KVM_GET_XSAVE); KVM_GET_XSAVE2 may need more
    (``kvm_xsave2(size)``, size from KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2))."""

    _fields_ = [("region", c_uint32 * 1024)]


assert ctypes.sizeof(kvm_xsave) == 4096


@functools.lru_cache(maxsize=32)
def kvm_xsave2(size: int) -> type[ctypes.Structure]:
    """struct kvm_xsave with its flexible ``extra`` array: ``size`` bytes in all."""

    class _kvm_xsave(ctypes.Structure):
        _fields_ = [("region", c_uint32 * (max(size, 4096) // 4))]

    return _kvm_xsave


KVM_MAX_XCRS = 16


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


assert ctypes.sizeof(kvm_xcr) == 16


class kvm_xcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", c_uint64 * 16),
    ]


assert ctypes.sizeof(kvm_xcrs) == 392


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


assert ctypes.sizeof(kvm_msr_entry) == 16


class kvm_msrs_header(ctypes.Structure):
    """struct kvm_msrs without its flexible array of entries."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


assert ctypes.sizeof(kvm_msrs_header) == 8


@functools.lru_cache(maxsize=32)
def kvm_msrs(n: int) -> type[ctypes.Structure]:
    """struct kvm_msrs with room for ``n`` entries."""

    class _kvm_msrs(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * n)]

    return _kvm_msrs


class kvm_msr_list_header(ctypes.Structure):
    """struct kvm_msr_list without its flexible array of indices."""

    _fields_ = [("nmsrs", c_uint32)]


assert ctypes.sizeof(kvm_msr_list_header) == 4


@functools.lru_cache(maxsize=32)
def kvm_msr_list(n: int) -> type[ctypes.Structure]:
    class _kvm_msr_list(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * n)]

    return _kvm_msr_list


class kvm_debugregs(ctypes.Structure):
    _fields_ = [
        ("db", c_uint64 * 4),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    ]


assert ctypes.sizeof(kvm_debugregs) == 128

KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008


class kvm_irqchip_chip(ctypes.Union):
    """The irqchip union: the PIC's or the I/O APIC's state, kept as its bytes."""

    _fields_ = [("dummy", ctypes.c_char * 512)]


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", kvm_irqchip_chip)]


assert ctypes.sizeof(kvm_irqchip) == 520

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class kvm_pit_channel_state(ctypes.Structure):
    _fields_ = [
        ("count", c_uint32),
        ("latched_count", c_uint16),
        ("count_latched", c_uint8),
        ("status_latched", c_uint8),
        ("status", c_uint8),
        ("read_state", c_uint8),
        ("write_state", c_uint8),
        ("write_latch", c_uint8),
        ("rw_mode", c_uint8),
        ("mode", c_uint8),
        ("bcd", c_uint8),
        ("gate", c_uint8),
        ("count_load_time", ctypes.c_int64),
    ]


assert ctypes.sizeof(kvm_pit_channel_state) == 24


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", c_uint32),
        ("reserved", c_uint32 * 9),
    ]


assert ctypes.sizeof(kvm_pit_state2) == 112


class kvm_clock_data(ctypes.Structure):
    _fields_ = [
        ("clock", c_uint64),
        ("flags", c_uint32),
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    ]


assert ctypes.sizeof(kvm_clock_data) == 48

KVM_CLOCK_TSC_STABLE = 2
