"""Model-specific registers a vCPU starts with (pure): what firmware would leave.

A PC's firmware enables the MTRRs before it boots an OS, with write-back as
the default memory type (Firecracker writes the same value). KVM starts a
vCPU with IA32_MTRR_DEF_TYPE 0, MTRRs disabled, and Linux then disables PAT as
well ("x86/PAT: MTRRs disabled, skipping PAT initialization too."): no
write-combining mappings, and "CPU MTRRs all blank". Every vCPU gets
the same value, as firmware sets it on every CPU (Linux checks that they
agree). Names and bits: Intel SDM vol. 3, 12.11.2.1; AMD APM vol. 2, 7.7.1.
"""

from __future__ import annotations

IA32_MTRR_DEF_TYPE = 0x2FF
MTRR_DEF_TYPE_E = 1 << 11  # MTRRs enabled
MTRR_TYPE_WB = 0x06  # write-back


def boot_msrs() -> dict[int, int]:
    """{MSR index: value} to set on every vCPU before it runs."""
    return {IA32_MTRR_DEF_TYPE: MTRR_DEF_TYPE_E | MTRR_TYPE_WB}
