"""SRAT and SLIT: the NUMA topology, built only for plans with more than one node.

SRAT (revision 3): one Processor Local APIC Affinity entry per vCPU (its
node as proximity domain) and one Memory Affinity entry per RAM range of each
node. SLIT (revision 1): the node-to-node distance matrix, 10 on the diagonal.
Proximity domain numbers are the machine's node ids, 0..n-1, which index the SLIT.
"""

from __future__ import annotations

import struct

from osvmm.boot.acpi.common import table
from osvmm.machine import Machine

SRAT_REVISION = 3
SLIT_REVISION = 1
SRAT_PROCESSOR_AFFINITY = 0
SRAT_MEMORY_AFFINITY = 1
AFFINITY_ENABLED = 1 << 0


def build_srat(machine: Machine) -> bytes:
    body = struct.pack("<I8x", 1)  # reserved: 1 for compatibility with old OSes
    for apic_id in machine.apic_ids:
        node = machine.node_of_apic(apic_id)
        body += struct.pack(
            "<BBBBIB3sI",
            SRAT_PROCESSOR_AFFINITY,
            16,
            node & 0xFF,  # proximity domain [7:0]
            apic_id,
            AFFINITY_ENABLED,
            0,  # local SAPIC EID
            (node >> 8).to_bytes(3, "little"),  # proximity domain [31:8]
            0,  # clock domain
        )
    for node in machine.numa_nodes:
        for start, size in node.mem_ranges:
            body += struct.pack(
                "<BBIHQQIIQ",
                SRAT_MEMORY_AFFINITY,
                40,
                node.node_id,
                0,
                start,
                size,
                0,
                AFFINITY_ENABLED,
                0,
            )
    return table(b"SRAT", SRAT_REVISION, body)


def build_slit(machine: Machine) -> bytes:
    n = len(machine.numa_nodes)
    body = struct.pack("<Q", n)
    body += bytes(machine.distance(i, j) for i in range(n) for j in range(n))
    return table(b"SLIT", SLIT_REVISION, body)
