"""KVM binary statistics (KVM_GET_STATS_FD): schema read once, values read on demand.

The file starts with a kvm_stats_header; descriptors (kvm_stats_desc + name)
follow at desc_offset, values (u64 each) at data_offset + desc.offset.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

from osvmm.kvm import structs as s


@dataclass(frozen=True)
class StatDesc:
    """One statistic's descriptor: where its value is in the data block."""

    name: str
    kind: int  # KVM_STATS_TYPE_*
    offset: int  # byte offset within the data block
    size: int  # number of u64 values


class StatsReader:
    """Reads one stats fd (a VM's or a vCPU's); owns the fd."""

    def __init__(self, fd: int):
        self.fd = fd
        hdr = s.kvm_stats_header.from_buffer_copy(
            os.pread(fd, ctypes.sizeof(s.kvm_stats_header), 0)
        )
        self.data_offset = hdr.data_offset
        desc_size = ctypes.sizeof(s.kvm_stats_desc) + hdr.name_size
        raw = os.pread(fd, desc_size * hdr.num_desc, hdr.desc_offset)
        self.descs: list[StatDesc] = []
        for i in range(hdr.num_desc):
            base = i * desc_size
            d = s.kvm_stats_desc.from_buffer_copy(raw, base)
            name_raw = raw[base + ctypes.sizeof(s.kvm_stats_desc) : base + desc_size]
            name = name_raw.split(b"\0", 1)[0].decode()
            self.descs.append(StatDesc(name, d.flags & s.KVM_STATS_TYPE_MASK, d.offset, d.size))
        self.data_size = max((d.offset + 8 * d.size for d in self.descs), default=0)

    def read(self) -> dict[str, int]:
        """Current values of every scalar statistic (histograms summed)."""
        data = os.pread(self.fd, self.data_size, self.data_offset)
        out = {}
        for d in self.descs:
            vals = struct.unpack_from(f"<{d.size}Q", data, d.offset)
            out[d.name] = vals[0] if d.size == 1 else sum(vals)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def exit_counts(values: dict[str, int]) -> dict[str, int]:
    """The exit-related subset of a vCPU's statistics: ``exits`` and every ``*_exits``."""
    keys = sorted(k for k in values if k == "exits" or k.endswith("_exits"))
    keys += [k for k in ("insn_emulation", "insn_emulation_fail", "hypercalls") if k in values]
    return {k: values[k] for k in keys}
