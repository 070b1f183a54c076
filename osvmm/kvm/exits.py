"""The one place where the mapped ``struct kvm_run`` is read and written.

Reading:
``decode_exit`` turns the mapped kvm_run into one value of a closed set:
IoOut, IoIn, MmioWrite, MmioRead, Hlt, Shutdown, FailEntry, InternalError,
SystemEvent, Interrupted, DirtyRingFull, Unhandled. The exit loop dispatches on the type.
Decoding uses precompiled ``struct`` formats on the mapping (the port-I/O
path is the hot one: ``RUN_HEADER``).

Writing: the data of an ``in`` or an MMIO read before the next KVM_RUN
(``complete_io_in``, ``complete_mmio_read``), ``immediate_exit``, and the
synchronized registers (``SyncRegs``: KVM_CAP_SYNC_REGS, the vCPU's general
registers in kvm_run itself, read and written without an ioctl).
"""

from __future__ import annotations

import functools
import struct
from collections import namedtuple

from osvmm.kvm import structs as s

_EXIT_OFF = s.kvm_run.exit.offset
_REASON = struct.Struct("<I")  # exit_reason at offset 8
# The fast path's view: exit_reason and the io fields of the union in one unpack
# (reason, direction, size, port, count, data_offset); see Vcpu.run_header.
RUN_HEADER = struct.Struct("<8xI20xBBHIQ")
assert RUN_HEADER.size == _EXIT_OFF + 16
_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
_FAIL = struct.Struct("<QI")
_INTERNAL_HDR = struct.Struct("<II")
_SYSEV_HDR = struct.Struct("<II")


# Each exit is a named tuple (``collections.namedtuple``: ``typing.NamedTuple`` would
# import ``typing`` on ``osvmm run``'s path, docs/performance.md "Cold start").
# IoOut.data: size * count bytes (``rep outs`` gives count > 1). IoIn.data_offset:
# where the VMM writes size * count bytes (Vcpu.complete_io_in).
IoOut = namedtuple("IoOut", "port size data")
IoIn = namedtuple("IoIn", "port size count data_offset")
MmioWrite = namedtuple("MmioWrite", "addr data")
MmioRead = namedtuple("MmioRead", "addr length")
Hlt = namedtuple("Hlt", "")
Shutdown = namedtuple("Shutdown", "")  # a triple fault (or another shutdown condition)
FailEntry = namedtuple("FailEntry", "hardware_entry_failure_reason cpu")
SystemEvent = namedtuple("SystemEvent", "type data")
Interrupted = namedtuple("Interrupted", "")  # KVM_RUN ended by a signal or immediate_exit
# KVM_EXIT_DIRTY_RING_FULL: the vCPU's dirty ring must be harvested and reset before
# it runs again (vmm/dirty_ring.py).
DirtyRingFull = namedtuple("DirtyRingFull", "")


class InternalError(namedtuple("InternalError", "suberror data")):
    """KVM_EXIT_INTERNAL_ERROR: a suberror and its data words."""

    __slots__ = ()

    def describe(self) -> str:
        """A one-line description, with instruction bytes for emulation failures."""
        names = {
            s.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
            s.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
            s.KVM_INTERNAL_ERROR_DELIVERY_EV: "exit during event delivery",
            s.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
        }
        text = names.get(self.suberror, f"internal error {self.suberror}")
        insn = self.instruction_bytes()
        if insn is not None:
            text += f", instruction bytes {insn.hex(' ') if insn else '(none)'}"
        return text

    def instruction_bytes(self) -> bytes | None:
        """For an emulation failure with KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
        (<linux/kvm.h> struct emulation_failure): data[0] = flags, then data[1..2] hold
        ``u8 insn_size; u8 insn_bytes[15]``."""
        if self.suberror != s.KVM_INTERNAL_ERROR_EMULATION or len(self.data) < 3:
            return None
        if not self.data[0] & 1:
            return None
        raw = struct.pack("<QQ", self.data[1], self.data[2])
        size = min(raw[0], 15)
        return raw[1 : 1 + size]


class Unhandled(namedtuple("Unhandled", "reason")):
    """An exit reason the VMM does not handle."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return s.EXIT_REASON_NAMES.get(self.reason, str(self.reason))


_HLT = Hlt()
_SHUTDOWN = Shutdown()
_INTR = Interrupted()
_RING_FULL = DirtyRingFull()


def decode_exit(mm, reason: int | None = None):
    """Decode the exit recorded in the kvm_run mapping ``mm``."""
    if reason is None:
        reason = _REASON.unpack_from(mm, 8)[0]
    if reason == s.KVM_EXIT_IO:
        direction, size, port, count, data_offset = _IO.unpack_from(mm, _EXIT_OFF)
        if direction == s.KVM_EXIT_IO_OUT:
            return IoOut(port, size, mm[data_offset : data_offset + size * count])
        return IoIn(port, size, count, data_offset)
    if reason == s.KVM_EXIT_MMIO:
        addr, data, length, is_write = _MMIO.unpack_from(mm, _EXIT_OFF)
        if is_write:
            return MmioWrite(addr, data[:length])
        return MmioRead(addr, length)
    if reason == s.KVM_EXIT_INTR:
        return _INTR
    if reason == s.KVM_EXIT_HLT:
        return _HLT
    if reason == s.KVM_EXIT_SHUTDOWN:
        return _SHUTDOWN
    if reason == s.KVM_EXIT_FAIL_ENTRY:
        return FailEntry(*_FAIL.unpack_from(mm, _EXIT_OFF))
    if reason == s.KVM_EXIT_INTERNAL_ERROR:
        suberror, ndata = _INTERNAL_HDR.unpack_from(mm, _EXIT_OFF)
        ndata = min(ndata, 16)
        data = struct.unpack_from(f"<{ndata}Q", mm, _EXIT_OFF + 8)
        return InternalError(suberror, data)
    if reason == s.KVM_EXIT_SYSTEM_EVENT:
        etype, ndata = _SYSEV_HDR.unpack_from(mm, _EXIT_OFF)
        ndata = min(ndata, 16)
        return SystemEvent(etype, struct.unpack_from(f"<{ndata}Q", mm, _EXIT_OFF + 8))
    if reason == s.KVM_EXIT_DIRTY_RING_FULL:
        return _RING_FULL
    return Unhandled(reason)


# -- writing kvm_run -----------------------------------------------------------------------------

_MMIO_DATA_OFF = _EXIT_OFF + s.kvm_run_mmio.data.offset
_IMMEDIATE_EXIT_OFF = s.kvm_run.immediate_exit.offset
_VALID_REGS_OFF = s.kvm_run.kvm_valid_regs.offset
_DIRTY_REGS_OFF = s.kvm_run.kvm_dirty_regs.offset
_SYNC_REGS_OFF = s.kvm_run.s.offset  # s.regs: struct kvm_regs comes first in kvm_sync_regs
_U64 = struct.Struct("<Q")
_DIRTY_REGS = _U64.pack(s.KVM_SYNC_X86_REGS)


def complete_io_in(mm, data_offset: int, data: bytes) -> None:
    """Give an ``in`` instruction its data (IoIn.data_offset) before the next run."""
    mm[data_offset : data_offset + len(data)] = data


def complete_mmio_read(mm, data: bytes) -> None:
    mm[_MMIO_DATA_OFF : _MMIO_DATA_OFF + len(data)] = data


def set_immediate_exit(mm, value: bool) -> None:
    mm[_IMMEDIATE_EXIT_OFF] = 1 if value else 0


# The hypercall path's view of the synchronized registers: the first six of
# kvm_regs (rax, rbx, rcx, rdx, rsi, rdi) in one unpack, and RAX written together
# with the dirty mark in one pack (kvm_dirty_regs is the u64 right before s.regs).
_FIRST_REGS = struct.Struct("<6Q")
_DIRTY_AND_RAX = struct.Struct("<QQ")
assert _DIRTY_REGS_OFF + 8 == _SYNC_REGS_OFF and s.kvm_regs.rax.offset == 0
assert s.kvm_regs.rdi.offset == 40


class SyncRegs:
    """The general registers KVM keeps in kvm_run (KVM_SYNC_X86_REGS).

    ``enable()`` asks KVM to store them at every exit; ``regs`` is a live
    ``kvm_regs`` view of them; after changing any, ``mark_dirty()`` makes KVM
    load them at the next KVM_RUN (it clears the mark itself). The hot path
    (a hypercall) uses ``first()`` and ``return_rax(value)``: one unpack, one
    pack, no ctypes field access."""

    def __init__(self, mm):
        self._mm = mm
        self.regs = s.kvm_regs.from_buffer(mm, _SYNC_REGS_OFF)
        # The hot path's two accessors, bound to this mapping: C callables, no
        # Python frame of their own (after an exit, every frame runs with cold caches).
        self.first = functools.partial(_FIRST_REGS.unpack_from, mm, _SYNC_REGS_OFF)
        self.return_rax = functools.partial(
            _DIRTY_AND_RAX.pack_into, mm, _DIRTY_REGS_OFF, s.KVM_SYNC_X86_REGS
        )

    def enable(self) -> None:
        _U64.pack_into(self._mm, _VALID_REGS_OFF, s.KVM_SYNC_X86_REGS)

    def disable(self) -> None:
        """Neither store nor load them any more (a partition made ready for a new boot)."""
        _U64.pack_into(self._mm, _VALID_REGS_OFF, 0)
        _U64.pack_into(self._mm, _DIRTY_REGS_OFF, 0)

    def mark_dirty(self) -> None:
        self._mm[_DIRTY_REGS_OFF : _DIRTY_REGS_OFF + 8] = _DIRTY_REGS

    # first() -> (rax, rbx, rcx, rdx, rsi, rdi) as KVM stored them at this exit;
    # return_rax(value): RAX set (0 <= value < 2**64) and the registers marked dirty,
    # in one write. Both are set per mapping in __init__.
