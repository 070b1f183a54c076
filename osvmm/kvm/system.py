"""Kvm, Vm and Vcpu: one object per KVM file descriptor, one ioctl path.

Every ioctl goes through ``_ioctl`` (libc's ioctl through ctypes, so that
buffers over 1024 bytes and arguments over 2^31 work) and fails with
``KvmError(errno, request name)``. The one exception is ``Vcpu.run``, the hot
path, which calls ``fcntl.ioctl`` directly (fewer layers per exit) and maps
its OSError the same way.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

from osvmm.errors import KvmError, KvmUnavailable
from osvmm.kvm import exits
from osvmm.kvm import ioctls as io
from osvmm.kvm import structs as s
from osvmm.kvm.exits import RUN_HEADER, SyncRegs, decode_exit

KVM_API_VERSION = 12
_INTERRUPTED = (s.KVM_EXIT_INTR, 0, 0, 0, 0, 0)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg=None) -> int:
    """Issue one ioctl; ``arg`` is None, an int, or a ctypes object passed by reference."""
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    ret = _libc.ioctl(fd, request, ptr)
    if ret < 0:
        raise KvmError(ctypes.get_errno(), io.NAMES.get(request, hex(request)))
    return ret


class Kvm:
    """/dev/kvm: capabilities, supported CPUID, VM creation."""

    def __init__(self, path: str | None = None):
        # OSVMM_KVM names another device node (tests use it to show a missing /dev/kvm).
        path = path or os.environ.get("OSVMM_KVM", "/dev/kvm")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: this host has no KVM (load kvm_intel or kvm_amd, "
                "or enable nested virtualization)"
            ) from None
        except PermissionError:
            raise KvmUnavailable(
                f"{path}: permission denied (run as root or join the group that owns it)"
            ) from None
        except OSError as e:
            raise KvmUnavailable(f"{path}: {e.strerror}") from None
        version = _ioctl(self.fd, io.KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"{path}: KVM API version {version}, osvmm needs 12")

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, io.KVM_CHECK_EXTENSION, cap)

    def max_vcpus(self) -> int:
        """vCPUs one VM may have (KVM_CAP_MAX_VCPUS, else the recommended NR_VCPUS)."""
        return self.check_extension(io.KVM_CAP_MAX_VCPUS) or self.check_extension(
            io.KVM_CAP_NR_VCPUS
        )

    def tsc_deadline_timer(self) -> bool:
        """Whether KVM's LAPIC emulates TSC-deadline mode (the VMM announces it)."""
        return bool(self.check_extension(io.KVM_CAP_TSC_DEADLINE_TIMER))

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, io.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[s.kvm_cpuid_entry2]:
        cpuid = s.kvm_cpuid2(s.KVM_MAX_CPUID_ENTRIES)()
        cpuid.nent = s.KVM_MAX_CPUID_ENTRIES
        _ioctl(self.fd, io.KVM_GET_SUPPORTED_CPUID, cpuid)
        return [s.kvm_cpuid_entry2.from_buffer_copy(e) for e in cpuid.entries[: cpuid.nent]]

    def create_vm(self) -> Vm:
        return Vm(self, _ioctl(self.fd, io.KVM_CREATE_VM, 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- state for snapshots (vmm/snapshot.py) ------------------------------------
    def msr_index_list(self) -> list[int]:
        """The MSRs KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST)."""
        n = 64
        while True:
            lst = s.kvm_msr_list(n)(nmsrs=n)
            try:
                _ioctl(self.fd, io.KVM_GET_MSR_INDEX_LIST, lst)
            except KvmError as err:
                if err.errno == errno.E2BIG and lst.nmsrs > n:
                    n = lst.nmsrs
                    continue
                raise
            return list(lst.indices[: lst.nmsrs])


class Vm:
    """A VM file descriptor: memory slots, the in-kernel irqchip and PIT, vCPUs."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self._sync_regs: bool | None = None
        self.dirty_ring_size = 0  # bytes per vCPU; 0: no dirty ring (the bitmap)

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, io.KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0
    ) -> None:
        region = s.kvm_userspace_memory_region(slot, flags, gpa, size, host_addr)
        _ioctl(self.fd, io.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, io.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self.fd, io.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        _ioctl(self.fd, io.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        _ioctl(self.fd, io.KVM_CREATE_PIT2, s.kvm_pit_config(flags=flags))

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, io.KVM_IRQ_LINE, s.kvm_irq_level(irq, level))

    def set_gsi_routing(self, routes: list[tuple[int, int, int]]) -> None:
        """Replace the GSI routing table: (GSI, irqchip, pin) irqchip routes."""
        table = s.kvm_irq_routing(len(routes))(nr=len(routes))
        for i, (gsi, chip, pin) in enumerate(routes):
            entry = table.entries[i]
            entry.gsi, entry.type = gsi, s.KVM_IRQ_ROUTING_IRQCHIP
            entry.u.irqchip.irqchip, entry.u.irqchip.pin = chip, pin
        _ioctl(self.fd, io.KVM_SET_GSI_ROUTING, table)

    def signal_msi(self, address: int, data: int) -> int:
        msi = s.kvm_msi(address & 0xFFFFFFFF, address >> 32, data)
        return _ioctl(self.fd, io.KVM_SIGNAL_MSI, msi)

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        """Have KVM signal eventfd ``fd`` on a guest write of ``length`` bytes (1, 2,
        4 or 8) at MMIO address ``addr`` (a port with ``pio``), only of the value
        ``datamatch`` when it is given (KVM_IOEVENTFD); ``deassign`` undoes one."""
        flags = 0
        if datamatch is not None:
            flags |= s.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= s.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= s.KVM_IOEVENTFD_FLAG_DEASSIGN
        req = s.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        _ioctl(self.fd, io.KVM_IOEVENTFD, req)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        """Have a write to eventfd ``fd`` raise GSI ``gsi`` (an edge: KVM sets the
        line and lowers it again) through the GSI routing (KVM_IRQFD)."""
        flags = s.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        _ioctl(self.fd, io.KVM_IRQFD, s.kvm_irqfd(fd=fd, gsi=gsi, flags=flags))

    def set_boot_cpu_id(self, vcpu_id: int) -> None:
        _ioctl(self.fd, io.KVM_SET_BOOT_CPU_ID, vcpu_id)

    def enable_cap(self, cap: int, *args: int) -> None:
        ec = s.kvm_enable_cap(cap=cap)
        for i, a in enumerate(args):
            ec.args[i] = a
        _ioctl(self.fd, io.KVM_ENABLE_CAP, ec)

    def supports_sync_regs(self) -> bool:
        """Whether KVM keeps the general registers in kvm_run (exits.SyncRegs); asked
        once per VM (every boot of a partition kept built asks again)."""
        if self._sync_regs is None:
            cap = self.check_extension(io.KVM_CAP_SYNC_REGS)
            self._sync_regs = bool(cap & s.KVM_SYNC_X86_REGS)
        return self._sync_regs

    def disable_exits(self, bits: int) -> int:
        """Disable the exits named by ``bits`` (KVM_X86_DISABLE_EXITS_*) if KVM offers
        all of them (before any vCPU exists); returns what KVM offers."""
        offered = self.check_extension(io.KVM_CAP_X86_DISABLE_EXITS)
        if offered & bits == bits:
            self.enable_cap(io.KVM_CAP_X86_DISABLE_EXITS, bits)
        return offered

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        return Vcpu(self, vcpu_id, _ioctl(self.fd, io.KVM_CREATE_VCPU, vcpu_id))

    def enable_dirty_ring(self, size: int) -> None:
        """KVM's dirty ring of ``size`` bytes per vCPU (vmm/dirty_ring.py), before any
        vCPU exists; KVM_GET_DIRTY_LOG is refused from then on."""
        self.enable_cap(io.KVM_CAP_DIRTY_LOG_RING, size)
        self.dirty_ring_size = size

    def reset_dirty_rings(self) -> int:
        """Let KVM reuse the ring entries the VMM marked RESET (KVM_RESET_DIRTY_RINGS)."""
        return _ioctl(self.fd, io.KVM_RESET_DIRTY_RINGS)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- state for snapshots (vmm/snapshot.py) ------------------------------------
    def get_irqchip(self, chip_id: int) -> s.kvm_irqchip:
        """A PIC's (KVM_IRQCHIP_PIC_MASTER/SLAVE) or the I/O APIC's state."""
        chip = s.kvm_irqchip(chip_id=chip_id)
        _ioctl(self.fd, io.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: s.kvm_irqchip) -> None:
        _ioctl(self.fd, io.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> s.kvm_pit_state2:
        pit = s.kvm_pit_state2()
        _ioctl(self.fd, io.KVM_GET_PIT2, pit)
        return pit

    def set_pit2(self, pit: s.kvm_pit_state2) -> None:
        _ioctl(self.fd, io.KVM_SET_PIT2, pit)

    def get_clock(self) -> s.kvm_clock_data:
        clock = s.kvm_clock_data()
        _ioctl(self.fd, io.KVM_GET_CLOCK, clock)
        return clock

    def set_clock(self, clock: s.kvm_clock_data) -> None:
        """Set the KVM clock (only ``clock`` is given: no realtime adjustment)."""
        _ioctl(self.fd, io.KVM_SET_CLOCK, s.kvm_clock_data(clock=clock.clock))

    def get_dirty_log(self, slot: int, pages: int) -> bytearray:
        """The dirty bitmap of memslot ``slot`` (``pages`` pages, one bit each), and
        clear it (KVM_GET_DIRTY_LOG; the slot has KVM_MEM_LOG_DIRTY_PAGES)."""
        bitmap = (ctypes.c_uint64 * ((pages + 63) // 64))()
        _ioctl(self.fd, io.KVM_GET_DIRTY_LOG, s.kvm_dirty_log(slot, 0, ctypes.addressof(bitmap)))
        return bytearray(bitmap)


class Vcpu:
    """A vCPU file descriptor with its mapped ``struct kvm_run``."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int):
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self.run_mmap = mmap.mmap(
            fd, vm.kvm.vcpu_mmap_size(), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self.sync = SyncRegs(self.run_mmap)
        self.dirty_ring = None  # the mapped dirty ring, where the VM has one

    def map_dirty_ring(self) -> mmap.mmap:
        """Map this vCPU's dirty ring (the VM's ring size, at KVM_DIRTY_LOG_PAGE_OFFSET pages)."""
        if self.dirty_ring is None:
            self.dirty_ring = mmap.mmap(
                self.fd,
                self.vm.dirty_ring_size,
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
                offset=s.KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE,
            )
        return self.dirty_ring

    # -- the hot path --------------------------------------------------------
    def run(self):
        """Enter the guest until the next exit; returns the decoded exit (exits.py)."""
        return decode_exit(self.run_mmap, self.run_header()[0])

    def run_header(self) -> tuple[int, int, int, int, int, int]:
        """The fast path: enter the guest, return (reason, direction, size, port,
        count, data_offset) from one unpack. The io fields mean something only for
        KVM_EXIT_IO; any other reason is decoded with ``decode(reason)``. EINTR and
        EAGAIN come back as KVM_EXIT_INTR."""
        try:
            fcntl.ioctl(self.fd, io.KVM_RUN, 0)
        except OSError as e:
            if e.errno in (errno.EINTR, errno.EAGAIN):
                return _INTERRUPTED
            raise KvmError(e.errno, "KVM_RUN") from None
        return RUN_HEADER.unpack_from(self.run_mmap, 0)

    def decode(self, reason: int):
        return decode_exit(self.run_mmap, reason)

    def complete_io_in(self, exit_, data: bytes) -> None:
        """Give an ``in`` instruction its data before the next ``run``."""
        exits.complete_io_in(self.run_mmap, exit_.data_offset, data)

    def complete_mmio_read(self, data: bytes) -> None:
        exits.complete_mmio_read(self.run_mmap, data)

    def set_immediate_exit(self, value: bool) -> None:
        exits.set_immediate_exit(self.run_mmap, value)

    def complete_pending(self) -> None:
        """Finish an exit KVM still owes the guest (the data of an ``in`` or an MMIO
        read, registers marked dirty) without entering it: KVM_RUN with immediate_exit
        set, as the KVM API asks before a vCPU's state is read or replaced."""
        self.set_immediate_exit(True)
        try:
            fcntl.ioctl(self.fd, io.KVM_RUN, 0)
        except OSError as e:
            if e.errno not in (errno.EINTR, errno.EAGAIN):
                raise KvmError(e.errno, "KVM_RUN") from None
        finally:
            self.set_immediate_exit(False)

    # -- state -----------------------------------------------------------------
    def get_regs(self) -> s.kvm_regs:
        regs = s.kvm_regs()
        _ioctl(self.fd, io.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: s.kvm_regs) -> None:
        _ioctl(self.fd, io.KVM_SET_REGS, regs)

    def get_sregs(self) -> s.kvm_sregs:
        sregs = s.kvm_sregs()
        _ioctl(self.fd, io.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        _ioctl(self.fd, io.KVM_SET_SREGS, sregs)

    def translate(self, linear_address: int) -> int | None:
        """The guest-physical address of a linear address in the vCPU's current
        paging mode (KVM_TRANSLATE), or None when it is not mapped."""
        tr = s.kvm_translation(linear_address=linear_address)
        _ioctl(self.fd, io.KVM_TRANSLATE, tr)
        return tr.physical_address if tr.valid else None

    def set_cpuid(self, entries: list[s.kvm_cpuid_entry2]) -> None:
        cpuid = s.kvm_cpuid2(len(entries))()
        cpuid.nent = len(entries)
        for i, e in enumerate(entries):
            cpuid.entries[i] = e
        _ioctl(self.fd, io.KVM_SET_CPUID2, cpuid)

    def stats_fd(self) -> int:
        return _ioctl(self.fd, io.KVM_GET_STATS_FD)

    def close(self) -> None:
        if self.fd >= 0:
            del self.sync
            self.run_mmap.close()
            if self.dirty_ring is not None:
                self.dirty_ring.close()
                self.dirty_ring = None
            os.close(self.fd)
            self.fd = -1

    # -- state for snapshots (vmm/snapshot.py) ------------------------------------
    def _get(self, request: int, struct_type):
        value = struct_type()
        _ioctl(self.fd, request, value)
        return value

    def get_fpu(self) -> s.kvm_fpu:
        return self._get(io.KVM_GET_FPU, s.kvm_fpu)

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        _ioctl(self.fd, io.KVM_SET_FPU, fpu)

    def get_xsave(self, size: int = 4096):
        """The XSAVE area: KVM_GET_XSAVE, or KVM_GET_XSAVE2 for ``size`` over 4 KiB
        (KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM gives it)."""
        if size > ctypes.sizeof(s.kvm_xsave):
            return self._get(io.KVM_GET_XSAVE2, s.kvm_xsave2(size))
        return self._get(io.KVM_GET_XSAVE, s.kvm_xsave)

    def set_xsave(self, xsave) -> None:
        _ioctl(self.fd, io.KVM_SET_XSAVE, xsave)

    def get_xcrs(self) -> s.kvm_xcrs:
        return self._get(io.KVM_GET_XCRS, s.kvm_xcrs)

    def set_xcrs(self, xcrs: s.kvm_xcrs) -> None:
        _ioctl(self.fd, io.KVM_SET_XCRS, xcrs)

    def get_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        """(index, value) of the leading MSRs of ``indices`` KVM could read: KVM stops
        at the first one it cannot, so fewer than asked means that one failed."""
        msrs = s.kvm_msrs(len(indices))(nmsrs=len(indices))
        for entry, index in zip(msrs.entries, indices, strict=True):
            entry.index = index
        n = _ioctl(self.fd, io.KVM_GET_MSRS, msrs)
        return [(e.index, e.data) for e in msrs.entries[:n]]

    def set_msrs(self, values: list[tuple[int, int]]) -> int:
        """Write (index, value) pairs; returns how many KVM took (it stops at the
        first it refuses)."""
        msrs = s.kvm_msrs(len(values))(nmsrs=len(values))
        for entry, (index, data) in zip(msrs.entries, values, strict=True):
            entry.index, entry.data = index, data
        return _ioctl(self.fd, io.KVM_SET_MSRS, msrs)

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        return self._get(io.KVM_GET_VCPU_EVENTS, s.kvm_vcpu_events)

    def set_vcpu_events(self, events: s.kvm_vcpu_events) -> None:
        _ioctl(self.fd, io.KVM_SET_VCPU_EVENTS, events)

    def get_debugregs(self) -> s.kvm_debugregs:
        return self._get(io.KVM_GET_DEBUGREGS, s.kvm_debugregs)

    def set_debugregs(self, dregs: s.kvm_debugregs) -> None:
        _ioctl(self.fd, io.KVM_SET_DEBUGREGS, dregs)

    def get_lapic(self) -> s.kvm_lapic_state:
        return self._get(io.KVM_GET_LAPIC, s.kvm_lapic_state)

    def set_lapic(self, lapic: s.kvm_lapic_state) -> None:
        _ioctl(self.fd, io.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> int:
        return self._get(io.KVM_GET_MP_STATE, s.kvm_mp_state).mp_state

    def set_mp_state(self, mp_state: int) -> None:
        _ioctl(self.fd, io.KVM_SET_MP_STATE, s.kvm_mp_state(mp_state))

    def tsc_khz(self) -> int:
        """The guest TSC frequency in kHz (KVM_GET_TSC_KHZ)."""
        return _ioctl(self.fd, io.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        _ioctl(self.fd, io.KVM_SET_TSC_KHZ, khz)
