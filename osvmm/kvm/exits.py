"""The one place where ``struct kvm_run`` is decoded into exit values.

``decode_exit`` turns the mapped kvm_run into one value of a closed set:
IoOut, IoIn, MmioWrite, MmioRead, Hlt, Shutdown, FailEntry, InternalError,
SystemEvent, Interrupted, Unhandled. The exit loop dispatches on the type.
Decoding uses precompiled ``struct`` formats on the mapping (the port-I/O
path is the hot one: see docs/exit-path.md).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

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


class IoOut(NamedTuple):
    port: int
    size: int
    data: bytes  # size * count bytes (``rep outs`` gives count > 1)


class IoIn(NamedTuple):
    port: int
    size: int
    count: int
    data_offset: int  # where the VMM writes size * count bytes (Vcpu.complete_io_in)


class MmioWrite(NamedTuple):
    addr: int
    data: bytes


class MmioRead(NamedTuple):
    addr: int
    length: int


class Hlt(NamedTuple):
    pass


class Shutdown(NamedTuple):
    """A triple fault (or another shutdown condition) in the guest."""


class FailEntry(NamedTuple):
    hardware_entry_failure_reason: int
    cpu: int


class InternalError(NamedTuple):
    suberror: int
    data: tuple[int, ...]

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


class SystemEvent(NamedTuple):
    type: int
    data: tuple[int, ...]


class Interrupted(NamedTuple):
    """KVM_RUN returned because of a signal or immediate_exit (EINTR / KVM_EXIT_INTR)."""


class Unhandled(NamedTuple):
    reason: int

    @property
    def name(self) -> str:
        return s.EXIT_REASON_NAMES.get(self.reason, str(self.reason))


_HLT = Hlt()
_SHUTDOWN = Shutdown()
_INTR = Interrupted()


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
    return Unhandled(reason)
