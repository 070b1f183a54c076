"""Probe this host's KVM for instructions its emulator cannot run at CPL0.

On hosts with hardware virtualization every guest instruction runs natively
and nothing here is needed. On hosts where KVM emulates kernel-mode guest
code (nested "PVM" KVM, see docs/host-accommodations.md) some instructions a
stock Linux kernel uses early are missing from the emulator. Each probe runs
a few bytes of 64-bit code at CPL0 in a throwaway VM:

  - cx16:  ``lock cmpxchg16b`` (SLUB): if it fails, CPUID.01H:ECX.CX16 is
           cleared in Linux partitions' CPUID;
  - xsave: ``xrstor`` (FPU init): if it fails, ``noxsave`` is added to Linux
           partitions' command lines.

A probe "needs" its accommodation only when the code hit an emulation
failure; results are cached for the process. ``quirks_for(source)`` turns
them into the ``Quirks`` that ``osvmm.boot.prepare`` applies: only Linux
kernels get any, and a host without a usable /dev/kvm gets none (the
partition's own KVM open then says why).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

from osvmm.arch.x86 import layout
from osvmm.arch.x86.regs import long64_entry
from osvmm.boot.image import NO_QUIRKS, BootSource, Quirks
from osvmm.boot.prepare import write_long_mode_tables
from osvmm.errors import KvmUnavailable
from osvmm.kvm.exits import InternalError, IoOut
from osvmm.vmm.bringup import create_vcpu, create_vm
from osvmm.vmm.memory import GuestMemory

CODE_ADDR = layout.HIGH_MEMORY_START
DATA_ADDR = CODE_ADDR + 0x100  # 64-byte aligned operand
CR4_OSXSAVE = 1 << 18
_EXIT = bytes([0xB0, 0x00, 0xE6, 0xF4])  # mov al, 0; out 0xf4, al


def _rip_rel(insn_prefix: bytes, insn_len: int, at: int) -> bytes:
    return insn_prefix + struct.pack("<i", DATA_ADDR - (CODE_ADDR + at + insn_len))


def _cx16_code() -> bytes:
    # lock cmpxchg16b [rip + disp32]: f0 48 0f c7 0d disp32
    return _rip_rel(bytes([0xF0, 0x48, 0x0F, 0xC7, 0x0D]), 9, 0) + _EXIT


def _xrstor_code() -> bytes:
    # xor eax, eax; xor edx, edx; xrstor [rip + disp32]: 0f ae 2d disp32 (RFBM 0: restores nothing)
    head = bytes([0x31, 0xC0, 0x31, 0xD2])
    return head + _rip_rel(bytes([0x0F, 0xAE, 0x2D]), 7, len(head)) + _EXIT


@dataclass(frozen=True)
class ProbeResult:
    """What one probe of the host found."""

    name: str
    needed: bool
    detail: str


def _run_probe(kvm, name: str, code: bytes, cr4_extra: int = 0) -> ProbeResult:
    mem = GuestMemory([(0, 4 * layout.MiB)])
    write_long_mode_tables(mem)
    mem.write(CODE_ADDR, code)
    vm = vcpu = None
    try:
        vm = create_vm(kvm, mem, pit=False)
        entry = long64_entry(CODE_ADDR)
        vcpu = create_vcpu(vm, kvm.supported_cpuid(), 0, 1, entry=entry)
        if cr4_extra:
            sregs = vcpu.get_sregs()
            sregs.cr4 |= cr4_extra
            vcpu.set_sregs(sregs)
        for _ in range(8):
            ex = vcpu.run()
            if isinstance(ex, IoOut) and ex.port == 0xF4:
                return ProbeResult(name, False, "runs")
            if isinstance(ex, InternalError):
                return ProbeResult(name, True, ex.describe())
            if not isinstance(ex, IoOut):
                return ProbeResult(name, False, f"inconclusive ({type(ex).__name__})")
        return ProbeResult(name, False, "inconclusive (no exit)")
    finally:
        if vcpu is not None:
            vcpu.close()
        if vm is not None:
            vm.close()
        mem.close()


@functools.cache
def probe_host() -> dict[str, ProbeResult]:
    from osvmm.kvm import Kvm

    kvm = Kvm()
    try:
        return {
            "cx16": _run_probe(kvm, "cx16", _cx16_code()),
            "xsave": _run_probe(kvm, "xsave", _xrstor_code(), CR4_OSXSAVE),
        }
    finally:
        kvm.close()


CX16_NOTE = (
    "host accommodation: CPUID CX16 cleared (this host's KVM cannot emulate cmpxchg16b at CPL0)"
)
XSAVE_NOTE = (
    "host accommodation: 'noxsave' added to the command line (this host's KVM "
    "cannot emulate xrstor at CPL0)"
)


def quirks_for(source: BootSource) -> Quirks:
    """What booting ``source`` on this host needs adapted (nothing but for Linux)."""
    if not source.linux:
        return NO_QUIRKS
    try:
        probes = probe_host()
    except KvmUnavailable:
        return NO_QUIRKS
    masks, words, notes = [], [], []
    if probes["cx16"].needed:
        masks.append("cx16")
        notes.append(CX16_NOTE)
    if probes["xsave"].needed:
        words.append("noxsave")
        notes.append(XSAVE_NOTE)
    return Quirks(tuple(masks), tuple(words), tuple(notes))
