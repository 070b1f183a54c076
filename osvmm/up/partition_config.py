"""From a placed plan to what one partition is built from: its Machine and config.

``machine_of`` derives a partition's Machine once, when the supervisor starts
(RAM from the plan's memory, the APIC IDs of its placement, the channel window
reserved when the plan gives it a channel); the supervisor keeps it and every
boot of that partition, and the hypercall monitor's bounds, read it.
``check_boot`` prepares each partition's boot image once (pure: nothing is
opened or mapped) so ``osvmm up`` refuses a plan whose images do not load
before any partition starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from osvmm.boot.image import NO_QUIRKS, read_boot_source
from osvmm.boot.prepare import prepare
from osvmm.errors import ConfigError, OsvmmError
from osvmm.guests import resolve_image
from osvmm.machine import Machine
from osvmm.plan.placement import Assignment, PartitionAssignment
from osvmm.vmm.partition import PartitionConfig


def machine_of(assignment: Assignment, placement: PartitionAssignment) -> Machine:
    spec = placement.spec
    channels = bool(assignment.plan.channels_of(spec.name))
    try:
        return Machine.build(
            spec.memory,
            placement.apic_ids,
            1,
            channels=channels,
            virtio_mmio=len(spec.drives)
            + len(spec.nets)
            + len(assignment.plan.networks_of(spec.name))
            + (spec.vsock is not None),
        )
    except ConfigError as err:
        raise ConfigError(f"partition {spec.name!r}: {err}") from None


def dirty_ring_setting() -> int:
    """The dirty ring an ``osvmm up`` partition asks for (bytes per vCPU; 0: the
    dirty bitmap): OSVMM_DIRTY_RING if set (a power of two of at least 4096, or 0),
    else vmm/dirty_ring.py's default. The host may offer less, or no ring."""
    from osvmm.vmm.dirty_ring import DEFAULT_RING_BYTES, MIN_RING_BYTES

    text = os.environ.get("OSVMM_DIRTY_RING")
    if text is None:
        return DEFAULT_RING_BYTES
    try:
        size = int(text, 0)
    except ValueError:
        size = -1
    if size and (size < MIN_RING_BYTES or size & (size - 1)):
        raise ConfigError(
            f"OSVMM_DIRTY_RING={text!r}: not 0 nor a power of two of at least {MIN_RING_BYTES}"
        )
    return size


def partition_config(
    assignment: Assignment,
    placement: PartitionAssignment,
    machine: Machine,
    console: Callable[[bytes], None],
    restore: bool = False,
    networks: dict | None = None,
) -> PartitionConfig:
    """``restore``: resume the plan's ``restore`` snapshot (its memory copied into the
    partition's own, bound to its node) instead of booting its image. ``networks``:
    the supervisor's vmm/switch_port.py SwitchNetwork per plan network, whose ports
    (one per member, in ``members`` order) become the partition's network NICs."""
    spec = placement.spec
    switch_nics = ()
    if networks is not None:
        switch_nics = tuple(
            (networks[net.name].port(net.members.index(spec.name)), net.mac(spec.name))
            for net in assignment.plan.networks_of(spec.name)
        )
    return PartitionConfig(
        machine=machine,
        name=spec.name,
        image=resolve_image(spec.image) if spec.image else None,
        kernel=spec.kernel,
        initrd=spec.initrd,
        cmdline=spec.cmdline or "",
        console=console,
        host_cpus=placement.cpus,
        float_cpus=() if placement.cpus else assignment.pool,
        node=placement.node,
        hugepages=spec.hugepages,
        prefault=spec.prefault,
        disable_exits=bool(placement.cpus),
        dirty_ring=dirty_ring_setting(),
        restore=spec.restore if restore else None,
        restore_lazy=False,
        drives=spec.drives,
        nets=spec.nets,
        switch_nics=switch_nics,
        vsock=spec.vsock,
    )


def check_boot(assignment: Assignment, held_elsewhere: bool = False) -> dict[str, Machine]:
    """Every partition's Machine, after checking that each one's boot prepares (its
    image, kernel, initrd and command line), that each disk image can be opened as
    one (vmm/blockfile.py, closed again), that nothing else holds its vsock's
    socket path (vmm/vsock_uds.py) and that its ``restore`` snapshot reads
    whole and fits it (its machine, disks, NICs: those on taps with the plan's tap
    NICs' MACs, those on networks on this plan's networks of those names with
    their MACs, and vsock); the first
    failure as a ConfigError. ``held_elsewhere``: the partitions come from another
    VMM (``--incoming``, ``--takeover``), which may hold the images locked and
    listen on the socket: neither is a failure then."""
    machines = {}
    for placement in assignment.partitions:
        machine = machine_of(assignment, placement)
        config = partition_config(assignment, placement, machine, lambda data: None)
        try:
            source = read_boot_source(config.image, config.kernel, config.initrd)
            disks = []  # closed again; their path, size and mode stay for the restore's check
            if config.drives:
                from osvmm.vmm.blockfile import open_drive

                try:
                    for drive in config.drives:
                        disks.append(
                            open_drive(drive.path, drive.readonly, "drive", not held_elsewhere)
                        )
                finally:
                    for disk in disks:
                        disk.close()
            if config.vsock is not None:
                from osvmm.vmm.vsock_uds import check_uds_path

                check_uds_path(config.vsock.uds, "vsock", held_elsewhere)
            prepare(source, machine, config.cmdline, NO_QUIRKS)
            if placement.spec.restore:
                check_restore(assignment, placement, machine, placement.spec.restore, disks)
        except OsvmmError as err:
            raise ConfigError(f"partition {placement.name!r}: {err}") from None
        machines[placement.name] = machine
    return machines


def check_restore(
    assignment: Assignment,
    placement: PartitionAssignment,
    machine: Machine,
    directory: str,
    disks: list | None = None,
) -> None:
    """That the snapshot in ``directory`` reads whole and fits the partition: its
    NICs (those on taps: as many tap NICs in the plan, each with its MAC, the tap
    may be another; those on networks on this plan's networks of those names,
    with their MACs), its machine, its disks (``disks``,
    opened as by ``check_boot``; None: left to the build, which reopens them) and
    its vsock; else a SnapshotError. Nothing is kept open."""
    from osvmm.vmm.snapshot import Snapshot, check_disks, check_networks, check_nics, check_vsock
    from osvmm.vmm.tap import default_mac

    snap = Snapshot.read(directory)
    try:
        # The NICs first: a missing network also makes another machine.
        macs = [net.mac or default_mac(net.tap) for net in placement.spec.nets]
        check_nics(snap.state, macs, "restore")
        nics = [
            (net.name, net.mac(placement.name))
            for net in assignment.plan.networks_of(placement.name)
        ]
        check_networks(snap.state, nics, "restore")
        snap.check_machine(machine, "restore")
        if disks is not None:
            check_disks(snap.state, disks, "restore")
        check_vsock(snap.state, placement.spec.vsock, "restore")
    finally:
        snap.close()
