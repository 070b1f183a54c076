"""Machine: one partition's guest-visible platform, derived and validated once.

A Machine says how much memory the partition has and where its RAM ranges lie
(``layout.ram_regions``, computed once and stored), which local APIC IDs its
vCPUs carry (those of the host cores it was given, so not necessarily
0..n-1), how CPUs and memory group into NUMA nodes and at what distances, and
which guest-physical ranges outside RAM the guest must leave alone (the
shared-memory channel window). It is built from the CLI (``Machine.build``)
or from a plan's placement (``osvmm.up.partition_config``) and then read,
never re-derived, by everything that needs one of these facts:

    boot/        the e820 map, MP table, ACPI MADT/SRAT/SLIT, boot_params
    vmm/         guest memory and its KVM memslots, the vCPUs and their APIC IDs
    hypercall/   the monitor's bounds on what a partition may name as its RAM

Construction validates: a Machine that exists is one the tables can describe.
"""

from __future__ import annotations

from collections.abc import Sequence

from osvmm.arch.x86 import irq, layout
from osvmm.arch.x86.layout import KVM_PRIVATE_SIZE, PAGE_SIZE
from osvmm.errors import ConfigError
from osvmm.records import Frozen

# The highest APIC ID an xAPIC (8-bit ID, 0xff = broadcast) can be given.
MAX_XAPIC_ID = 254
MAX_VCPUS = MAX_XAPIC_ID  # APIC IDs 0..253 and the I/O APIC's ID above them
# The most RAM a partition may have: KVM refuses a memory slot of 2^31 pages or more
# (KVM_MEM_MAX_NR_PAGES), and RAM above 4 GiB is one slot.
MAX_MEMORY = 8 << 40
# NUMA nodes of one partition: a default x86-64 Linux has 64 (NODES_SHIFT 6), and the
# SLIT, one byte per pair of nodes, must fit the ACPI tables' area.
MAX_NUMA_NODES = 64
# Memory split between NUMA nodes by Machine.build is aligned to this.
NODE_ALIGN = 2 * layout.MiB
# ACPI SLIT distances (ACPI 6.4 section 5.2.17).
LOCAL_DISTANCE = 10
REMOTE_DISTANCE = 20

Range = tuple[int, int]  # (guest-physical start, size)


class NumaNode(Frozen):
    """One NUMA node: its proximity domain, its vCPUs' APIC IDs, its RAM ranges."""

    node_id: int
    apic_ids: tuple[int, ...]
    mem_ranges: tuple[Range, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "apic_ids", tuple(self.apic_ids))
        object.__setattr__(self, "mem_ranges", tuple(tuple(r) for r in self.mem_ranges))


class Machine(Frozen):
    """One partition's guest-visible platform.

    ``memory``: bytes of RAM; ``ram_ranges`` (derived, stored) places them.
    ``apic_ids``: the local APIC ID of each vCPU in vCPU order; vCPU 0 is the
    bootstrap processor. ``numa_nodes``: empty means one node (0) with every
    vCPU and all RAM. ``reserved``: (start, size) ranges outside RAM that the
    e820 map marks reserved. ``distances``: the SLIT matrix, or None for 10 on
    the diagonal and 20 elsewhere. ``virtio_mmio``: how many virtio-mmio devices
    it has, in the slots of ``layout.virtio_mmio_slot`` (the DSDT describes them).
    """

    memory: int
    apic_ids: tuple[int, ...]
    numa_nodes: tuple[NumaNode, ...] = ()
    reserved: tuple[Range, ...] = ()
    distances: tuple[tuple[int, ...], ...] | None = None
    virtio_mmio: int = 0
    # ram_ranges: tuple[Range, ...], derived from memory (not a field: __post_init__)

    def __post_init__(self) -> None:
        if not isinstance(self.memory, int) or isinstance(self.memory, bool):
            raise ConfigError(f"partition memory {self.memory!r} is not a number of bytes")
        object.__setattr__(self, "ram_ranges", tuple(layout.ram_regions(self.memory)))
        object.__setattr__(self, "apic_ids", tuple(self.apic_ids))
        object.__setattr__(self, "reserved", tuple(tuple(r) for r in self.reserved))
        nodes = tuple(self.numa_nodes)
        if not nodes:
            nodes = (NumaNode(0, self.apic_ids, tuple(self.ram_ranges)),)
        object.__setattr__(self, "numa_nodes", nodes)
        if self.distances is not None:
            object.__setattr__(self, "distances", tuple(tuple(row) for row in self.distances))
        self._validate()

    # -- construction --------------------------------------------------------

    @classmethod
    def build(
        cls,
        memory: int,
        cpus: int | Sequence[int],
        numa_nodes: int = 1,
        channels: bool = False,
        virtio_mmio: int = 0,
    ) -> Machine:
        """A machine with memory and vCPUs split evenly across ``numa_nodes`` nodes.

        ``cpus`` is a vCPU count (APIC IDs 0..n-1) or the list of APIC IDs.
        Node i gets the i-th slice of RAM (2 MiB aligned; the last node takes
        the remainder) and the i-th slice of vCPUs (the first ``n % nodes``
        nodes one more). ``channels`` reserves the shared-memory channel window;
        ``virtio_mmio`` is the number of virtio-mmio devices (disks).
        The result is validated.
        """
        apic_ids = tuple(range(cpus)) if isinstance(cpus, int) else tuple(cpus)
        if numa_nodes < 1:
            raise ConfigError(f"a partition needs at least one NUMA node, not {numa_nodes}")
        if numa_nodes > MAX_NUMA_NODES:
            raise ConfigError(f"{numa_nodes} NUMA nodes: a partition has at most {MAX_NUMA_NODES}")
        if memory < layout.MIN_MEMORY:
            raise ConfigError(
                f"memory {memory} bytes is too small: a partition needs at least "
                f"{layout.MIN_MEMORY >> 20} MiB"
            )
        per_node = (memory // numa_nodes) // NODE_ALIGN * NODE_ALIGN
        if per_node == 0:
            raise ConfigError(
                f"{memory:#x} bytes of memory cannot be split into {numa_nodes} NUMA nodes"
            )
        regions = layout.ram_regions(memory)
        base, extra = divmod(len(apic_ids), numa_nodes)
        nodes = []
        cpu_at = 0
        for i in range(numa_nodes):
            start = i * per_node
            size = per_node if i < numa_nodes - 1 else memory - start
            ncpu = base + (1 if i < extra else 0)
            nodes.append(
                NumaNode(i, apic_ids[cpu_at : cpu_at + ncpu], _slice_ram(regions, start, size))
            )
            cpu_at += ncpu
        reserved = ((layout.CHANNEL_WINDOW_START, layout.CHANNEL_WINDOW_SIZE),) if channels else ()
        return cls(memory, apic_ids, tuple(nodes), reserved, virtio_mmio=virtio_mmio)

    # -- derived values ------------------------------------------------------

    @property
    def vcpus(self) -> int:
        return len(self.apic_ids)

    @property
    def ioapic_id(self) -> int:
        """The I/O APIC's ID: one after the highest local APIC ID (as SeaBIOS)."""
        return max(self.apic_ids) + 1

    @property
    def bsp_apic_id(self) -> int:
        return self.apic_ids[0]

    def distance(self, i: int, j: int) -> int:
        """SLIT distance between node i and node j."""
        if self.distances is not None:
            return self.distances[i][j]
        return LOCAL_DISTANCE if i == j else REMOTE_DISTANCE

    def node_of_apic(self, apic_id: int) -> int:
        for node in self.numa_nodes:
            if apic_id in node.apic_ids:
                return node.node_id
        raise ConfigError(f"APIC ID {apic_id} is in no NUMA node")

    # -- validation ----------------------------------------------------------

    def _validate(self) -> None:
        """Raise ConfigError if the tables could not describe this machine."""
        self._validate_memory()
        self._validate_cpus()
        self._validate_nodes()
        self._validate_reserved()
        self._validate_distances()
        if not isinstance(self.virtio_mmio, int) or not (
            0 <= self.virtio_mmio <= len(irq.VIRTIO_IRQS)
        ):
            raise ConfigError(
                f"{self.virtio_mmio!r} virtio devices: a partition has at most "
                f"{len(irq.VIRTIO_IRQS)}"
            )

    def _validate_memory(self) -> None:
        if self.memory < layout.MIN_MEMORY:
            raise ConfigError(
                f"partition memory {self.memory:#x} is below the minimum "
                f"{layout.MIN_MEMORY:#x} bytes"
            )
        if self.memory % PAGE_SIZE:
            raise ConfigError(f"partition memory {self.memory:#x} is not a multiple of 4 KiB")
        if self.memory > MAX_MEMORY:
            raise ConfigError(
                f"partition memory {self.memory:#x} bytes is over the {MAX_MEMORY >> 40} TiB "
                "a partition may have (KVM maps at most that in one memory slot)"
            )

    def _validate_cpus(self) -> None:
        if not self.apic_ids:
            raise ConfigError("a partition needs at least one vCPU")
        seen: set[int] = set()
        for a in self.apic_ids:
            if not isinstance(a, int) or a < 0 or a > MAX_XAPIC_ID:
                raise ConfigError(
                    f"APIC ID {a!r} is outside 0..{MAX_XAPIC_ID} (xAPIC; 255 is broadcast)"
                )
            if a in seen:
                raise ConfigError(f"APIC ID {a} is given to two vCPUs")
            seen.add(a)

    def _validate_nodes(self) -> None:
        if len(self.numa_nodes) > MAX_NUMA_NODES:
            raise ConfigError(
                f"{len(self.numa_nodes)} NUMA nodes: a partition has at most {MAX_NUMA_NODES}"
            )
        ids = sorted(n.node_id for n in self.numa_nodes)
        if ids != list(range(len(self.numa_nodes))):
            raise ConfigError(f"NUMA node ids must be 0..{len(self.numa_nodes) - 1}, not {ids}")
        cpu_owner: dict[int, int] = {}
        for node in self.numa_nodes:
            for a in node.apic_ids:
                if a in cpu_owner:
                    raise ConfigError(
                        f"APIC ID {a} is in NUMA nodes {cpu_owner[a]} and {node.node_id}"
                    )
                cpu_owner[a] = node.node_id
            if not node.mem_ranges:
                raise ConfigError(f"NUMA node {node.node_id} has no memory")
        unknown = sorted(set(cpu_owner) - set(self.apic_ids))
        if unknown:
            raise ConfigError(f"NUMA nodes name APIC IDs {unknown} that are not vCPUs")
        missing = sorted(set(self.apic_ids) - set(cpu_owner))
        if missing:
            raise ConfigError(f"vCPUs with APIC IDs {missing} are in no NUMA node")
        # The nodes' memory ranges must tile the RAM ranges exactly.
        pieces = sorted(
            (start, size, node.node_id)
            for node in self.numa_nodes
            for start, size in node.mem_ranges
        )
        for start, size, nid in pieces:
            if size <= 0 or start % PAGE_SIZE or size % PAGE_SIZE:
                raise ConfigError(
                    f"NUMA node {nid} range {start:#x}+{size:#x} is empty or not page aligned"
                )
        if _merge([(s, z) for s, z, _ in pieces], strict=True) != _merge(self.ram_ranges):
            raise ConfigError(
                "NUMA node memory ranges do not cover the partition's RAM exactly once"
            )

    def _validate_reserved(self) -> None:
        spans = [(s, z, "RAM") for s, z in self.ram_ranges] + [
            (layout.KVM_IDENTITY_MAP_ADDR, KVM_PRIVATE_SIZE, "KVM's identity map and TSS"),
            (
                layout.VIRTIO_MMIO_BASE,
                layout.VIRTIO_MMIO_SIZE * len(irq.VIRTIO_IRQS),
                "the virtio-mmio devices",
            ),
            (layout.IOAPIC_ADDR, PAGE_SIZE, "the I/O APIC page"),
            (layout.LAPIC_ADDR, PAGE_SIZE, "the local APIC page"),
        ]
        for start, size in self.reserved:
            if size <= 0 or start < 0 or start + size > 1 << 52:
                raise ConfigError(f"reserved range {start:#x}+{size:#x} is empty or out of range")
            for s, z, what in spans:
                if start < s + z and s < start + size:
                    raise ConfigError(
                        f"reserved range {start:#x}+{size:#x} overlaps {what} {s:#x}+{z:#x}"
                    )
            spans.append((start, size, "reserved range"))

    def _validate_distances(self) -> None:
        if self.distances is None:
            return
        n = len(self.numa_nodes)
        if len(self.distances) != n or any(len(row) != n for row in self.distances):
            raise ConfigError(f"the NUMA distance matrix must be {n}x{n}")
        for i, row in enumerate(self.distances):
            for j, d in enumerate(row):
                if i == j and d != LOCAL_DISTANCE:
                    raise ConfigError(f"NUMA distance {i}->{i} must be {LOCAL_DISTANCE}, not {d}")
                if i != j and not LOCAL_DISTANCE < d <= 255:
                    raise ConfigError(f"NUMA distance {i}->{j} must be in 11..255, not {d}")


def _slice_ram(regions: list[Range], offset: int, size: int) -> tuple[Range, ...]:
    """Guest-physical ranges holding RAM bytes [offset, offset+size) counted across regions."""
    out = []
    for start, rsize in regions:
        lo = max(offset, 0)
        hi = min(offset + size, rsize)
        if lo < hi:
            out.append((start + lo, hi - lo))
        offset -= rsize
    return tuple(out)


def _merge(ranges: list[Range], strict: bool = False) -> list[Range] | None:
    """Sorted ranges with adjacent ones joined; None if ``strict`` and two overlap."""
    out: list[list[int]] = []
    for start, size in sorted(ranges):
        if out and start < out[-1][0] + out[-1][1]:
            if strict:
                return None
            out[-1][1] = max(out[-1][1], start + size - out[-1][0])
        elif out and start == out[-1][0] + out[-1][1]:
            out[-1][1] += size
        else:
            out.append([start, size])
    return [(s, z) for s, z in out]
