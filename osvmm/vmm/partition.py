"""A partition: one guest with its machine, memory, VM, vCPUs and devices.

``Partition.build`` is the boot recipe, in order, on one screen. Inputs come
first: nothing is opened, mapped or created until what to boot has been read
and the whole boot image prepared, so a bad image, initrd or command line is
reported before /dev/kvm is touched.

    1. inputs     the image (or kernel and initrd) read; the host's quirks for
                  it; the boot image prepared (osvmm.boot.prepare: pure); or, to
                  resume a snapshot, the snapshot read and checked whole
                  (vmm/snapshot.py)
    2. memory     guest RAM mapped on the host at the Machine's RAM ranges,
                  bound to its NUMA node, huge pages advised, optionally
                  prefaulted and locked (enforce.py)
    3. vm         the KVM VM with its in-kernel LAPICs, I/O APIC, PIC and PIT,
                  guest RAM as memslots (bringup.py: registered before the
                  irqchip, which makes each registration after it wait for a
                  grace period); HLT/PAUSE exits disabled on dedicated cores
    4. devices    COM1 (8250), isa-debug-exit, the power ports, the CMOS RTC and
                  the ACPI PM timer on the port bus; virtio-blk, virtio-net and
                  virtio-vsock devices on the MMIO bus, their ioeventfds and
                  irqfds (vmm/virtio.py), their disk images, taps and vsock
                  socket opened and checked in step 1 (the Machine has as
                  many virtio-mmio slots: the DSDT announces them)
    5. image      the boot image written into guest memory
    6. vcpus      created with their CPUID; the BSP gets the entry registers,
                  the APs wait for INIT/SIPI in the in-kernel LAPIC

A partition resumed from a snapshot (``PartitionConfig.restore``) takes its
memory from the snapshot in step 2 (mapped copy-on-write, or copied), skips
step 5, creates its vCPUs with the CPUID they had, and then gets every vCPU's,
the VM's and the devices' state back (vmm/snapshot.py ``apply``).
``snapshot`` writes one of a running partition with its vCPUs parked
(``paused``).

``start`` runs one thread per vCPU, each first pinning itself to its host
CPU (dedicated) or to the pool (floating); ``wait`` returns a RunResult when the
guest ends (debug exit, power-off, fault) or ``stop`` is called.

Kept built (``osvmm up``): a partition built ``reusable`` captures its reset
image (vmm/reset.py) before its first run; after a run ``recycle`` makes it as
built again (vCPU, interrupt controller, PIT and clock state put back, memory
zeroed and the boot image written again, devices new, its vCPU threads made and
held at a gate), and the next ``start`` only opens the gate.

The partitioning layer (osvmm.hypercall.live, osvmm.writemon) reaches a
partition only through the small interface at the end of this class: port
hooks, MMIO devices, shared memory slots, read-only RAM pages and the handler
of writes into them, MSIs, guest memory and the console.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

from osvmm.arch.x86.cpuid import vcpu_cpuid
from osvmm.arch.x86.layout import HUGEPAGE_MIN_RANGE
from osvmm.boot.image import NO_QUIRKS, BootImage, read_boot_source
from osvmm.boot.prepare import prepare
from osvmm.devices.bus import PortBus
from osvmm.devices.debug_exit import DEBUG_EXIT_PORT, DebugExit, exit_status
from osvmm.devices.mmio import MmioBus
from osvmm.devices.pm_timer import register_pm_timer
from osvmm.devices.power import register_power_devices
from osvmm.devices.rtc import register_rtc
from osvmm.devices.serial import COM1_IRQ, COM1_PORT, Serial
from osvmm.errors import ConfigError, OsvmmError, SnapshotError, VmmBug
from osvmm.kvm import Kvm
from osvmm.kvm.ioctls import KVM_CAP_NR_MEMSLOTS
from osvmm.kvm.structs import KVM_MEM_READONLY
from osvmm.machine import Machine
from osvmm.records import Record
from osvmm.vmm import enforce
from osvmm.vmm.bringup import create_vcpu, create_vm
from osvmm.vmm.memory import GuestMemory
from osvmm.vmm.memslots import Memslots
from osvmm.vmm.vcpu import Gate, VcpuThread, install_kick_handler

MSI_ADDRESS_BASE = 0xFEE0_0000  # MSI address: 0xfee00000 | destination APIC ID << 12
# How long start() waits for the boot vCPU's thread to pass its gate (it then lets go
# of the GIL in KVM_RUN); only a host too busy to schedule it waits the whole time.
ENTER_WAIT_S = 0.05


def discard(data: bytes) -> None:
    """A console that goes nowhere (PartitionConfig's default)."""


class PartitionConfig(Record):
    """What to build: the machine, what it boots, where its console goes, and what
    the host enforces. The defaults leave the host alone, as ``osvmm run`` does."""

    machine: Machine
    name: str = "guest"
    image: str | None = None  # an ELF image: PVH, plain ELF64, or a Linux vmlinux
    kernel: str | None = None  # a Linux kernel: bzImage or vmlinux
    initrd: str | None = None
    cmdline: str = ""
    console: Callable[[bytes], None] = discard
    # Enforcement (osvmm/vmm/enforce.py).
    host_cpus: tuple[int, ...] = ()  # dedicated host CPUs: vCPU i pinned to host_cpus[i]
    float_cpus: tuple[int, ...] = ()  # floating: every vCPU allowed on these (the pool)
    node: int | None = None  # bind guest memory to this host NUMA node (mbind)
    # madvise(MADV_HUGEPAGE) where THP allows: True for all guest RAM, None ("auto")
    # for RAM ranges of at least layout.HUGEPAGE_MIN_RANGE, False never.
    hugepages: bool | None = False
    prefault: bool = False  # populate all guest memory at build and mlock it
    disable_exits: bool = False  # KVM_CAP_X86_DISABLE_EXITS HLT|PAUSE (dedicated cores)
    # KVM's dirty ring of this many bytes per vCPU for a migration's dirty log, where
    # the host has it (vmm/dirty_ring.py); 0: the dirty bitmap. Set by osvmm up (a
    # partition that can migrate); ``osvmm run``'s cannot.
    dirty_ring: int = 0
    # Resume a snapshot (a directory, or a vmm.snapshot.Snapshot already read) instead
    # of booting; its memory mapped from the snapshot copy-on-write (``restore_lazy``)
    # or copied into the partition's own memory.
    restore: object = None
    restore_lazy: bool = True
    # Capture the reset image at build (vmm/reset.py), so that ``recycle`` can make
    # the partition ready for another boot (osvmm up); ``osvmm run`` boots once.
    reusable: bool = False
    # Disks: raw images as virtio-blk devices (plan/drives.py Drive), in slot order;
    # then NICs on host taps as virtio-net devices (plan/drives.py Net: --net, a plan's nets).
    drives: tuple = ()
    nets: tuple = ()
    # Then NICs on a plan's networks: (vmm/switch_port.py SwitchPort, MAC) pairs; the
    # ports belong to the supervisor's networks and outlive this partition.
    switch_nics: tuple = ()
    # Last, a vsock device (plan/drives.py Vsock): its host side a Unix socket.
    vsock: object = None


def input_stamps(config: PartitionConfig) -> tuple:
    """(path, inode, size, mtime) of each boot input, or the error reading it gave."""
    out = []
    for path in (config.image, config.kernel, config.initrd):
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError as e:
            out.append((path, e.errno))
        else:
            out.append((path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _close_made(vcpus: list) -> None:
    """Close the vCPUs a ReadyVm made that a failed build did not take."""
    for vcpu in vcpus:
        if vcpu is not None:
            vcpu.close()


def _quirks_for(source):
    """The host's quirks for ``source`` (vmm/host_quirks.py probes the host, for Linux
    only: its module is imported only then, start-up time)."""
    if not source.linux:
        return NO_QUIRKS
    from osvmm.vmm.host_quirks import quirks_for

    return quirks_for(source)


class RunResult(Record):
    """How a run ended."""

    status: int  # the osvmm process exit status this run stands for
    reason: str
    fault: OsvmmError | None = None
    reset: bool = False  # the guest asked for a reset (a supervisor restarts it)


class Partition:
    def __init__(self, config: PartitionConfig, kvm: Kvm | None = None, ready=None):
        """``ready``: a vmm/ready.py ReadyVm made for this partition's machine, which a
        restore takes instead of making its VM (one that does not fit is closed)."""
        self.config = config
        self.machine = config.machine
        self.kvm = kvm
        self._own_kvm = kvm is None
        self._ready = ready
        self.built_ready = False  # built on a ReadyVm (vmm/ready.py)
        self.vm = None
        self.memory: GuestMemory | None = None
        self.boot: BootImage | None = None
        self.vcpus = []
        self.threads: list[VcpuThread] = []
        self._stats_fds: list[int] = []  # each vCPU's KVM statistics fd (from build)
        self.stats_readers: list = []  # kvm/stats.py StatsReader per vCPU, made when asked
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.result: RunResult | None = None
        self._resumed: str | None = None  # what it was resumed from (Snapshot.origin)
        self.enforcement: list[str] = []  # what enforce.py applied, one note each
        self._shared_slots: dict[int, tuple[int, int]] = {}  # gpa -> (memslot, size)
        self.slots: Memslots | None = None
        self._sync_regs = False
        self._slots_lock = threading.Lock()
        self._park_lock = threading.Lock()  # one parker at a time (paused, protect_pages)
        self.cpuids: list[list] = []  # the CPUID entries set on each vCPU
        self.tsc_khz: list[int] = []  # each vCPU's TSC frequency (a migration's profile)
        self.devices: dict[str, object] = {}  # name -> a device model with state()/restore()
        # A resumed snapshot's state of the layers above (the hypercall monitor's) and
        # its images beside guest memory (channels): theirs to apply.
        self.snapshot_extra: dict | None = None
        self.snapshot_images: dict[str, bytearray] = {}
        self._reset = None  # vmm/reset.py ResetImage, captured at build when config.reusable
        self._recycled = False  # made ready by recycle(), not started since
        # How many times recycle() made it ready again: its vCPU threads, and what
        # was installed on them (port hooks, a RAM write handler), are this many's.
        self.generation = 0
        self._gate = Gate()  # opened by start(): the vCPU threads run
        self._entered = Gate()  # the boot vCPU's thread is past the gate
        self._armed = False  # the vCPU threads are started, held at the gate
        self._inputs: tuple = ()  # what the boot inputs were when build read them
        self._stats_base: list[dict[str, int]] = []  # KVM's counts at the last recycle
        self._disks: list = []  # vmm/blockfile.py RawImage per drive, opened in step 1
        self._taps: list = []  # vmm/tap.py Tap per NIC, attached in step 1
        self._vsock = None  # vmm/vsock_uds.py UdsBackend, listening from step 1
        self.virtio = None  # vmm/virtio.py VirtioDevices

    @property
    def boot_log(self) -> tuple[str, ...]:
        """What the VMM adapted for this host (printed by the CLI, logged by ``up``)."""
        if self.boot is None and self._resumed is not None:
            return (f"resumed {self._resumed}",)
        return self.boot.notes if self.boot is not None else ()

    # -- the recipe ------------------------------------------------------------
    def build(self) -> Partition:
        cfg, machine = self.config, self.machine
        if cfg.host_cpus and len(cfg.host_cpus) != machine.vcpus:
            raise ConfigError(
                f"partition {cfg.name!r}: {len(cfg.host_cpus)} host CPUs for {machine.vcpus} vCPUs"
            )
        # 1. inputs
        snap = None
        if cfg.restore is not None:
            snap = self._read_snapshot()
        else:
            self._inputs = input_stamps(cfg)
            source = read_boot_source(cfg.image, cfg.kernel, cfg.initrd)
            nics = len(cfg.nets) + len(cfg.switch_nics)
            vsocks = int(cfg.vsock is not None)
            if len(cfg.drives) + nics + vsocks != machine.virtio_mmio:
                raise VmmBug(
                    f"partition {cfg.name!r}: {len(cfg.drives)} disks, {nics} NICs and "
                    f"{vsocks} vsock on a machine with {machine.virtio_mmio} virtio-mmio devices"
                )
            self.boot = prepare(source, machine, cfg.cmdline, _quirks_for(source))
        try:
            self._open_disks()
            if snap is not None:  # the snapshot's disks and NICs, before anything is built
                from osvmm.vmm.snapshot import check_disks, check_networks, check_nics, check_vsock

                who = f"partition {cfg.name!r}"
                check_disks(snap.state, self._disks, who)
                check_nics(snap.state, self._macs(), who)
                check_networks(snap.state, self._network_nics(), who)
                check_vsock(snap.state, cfg.vsock, who)
            return self._build(snap)
        except BaseException:
            self._close_disks()
            raise
        finally:
            if self._ready is not None:  # taken by _build, or of no use: closed
                self._ready.close()
                self._ready = None
            if snap is not None and snap is not cfg.restore:
                snap.close()  # read here; one given by the caller is the caller's to close

    def _open_disks(self) -> None:
        """Every drive's image opened, checked and locked (vmm/blockfile.py), and every
        NIC's tap attached (vmm/tap.py), the vsock's socket listening
        (vmm/vsock_uds.py); or none."""
        drives, nets = self.config.drives, self.config.nets
        handed = getattr(self.config.restore, "take_handed", None)
        if handed is not None and (handed := handed()):  # a takeover's, open already
            from osvmm.vmm.device_handover import adopt

            who = f"partition {self.config.name!r}"
            self._disks, self._taps, self._vsock = adopt(handed, self.config, who)
            return
        try:
            if drives:
                from osvmm.vmm.blockfile import open_drive

                for drive in drives:
                    self._disks.append(open_drive(drive.path, drive.readonly))
            if nets:
                from osvmm.vmm.tap import open_tap

                for net in nets:
                    self._taps.append(open_tap(net.tap))
            if self.config.vsock is not None:
                from osvmm.vmm.vsock_uds import open_vsock_uds

                self._vsock = open_vsock_uds(self.config.vsock.uds)
        except BaseException:
            self._close_disks()
            raise

    def _close_disks(self) -> None:
        if self.virtio is not None:
            self.virtio.close()  # closes the images it was given
            self.virtio = None
        for backend in (*self._disks, *self._taps):
            backend.close()
        if self._vsock is not None:
            self._vsock.close()
        self._disks = []
        self._taps = []
        self._vsock = None

    def _read_snapshot(self):
        from osvmm.vmm.snapshot import Snapshot

        cfg = self.config
        snap = cfg.restore if isinstance(cfg.restore, Snapshot) else Snapshot.read(cfg.restore)
        try:
            snap.check_machine(self.machine, f"partition {cfg.name!r}")
        except BaseException:
            if snap is not cfg.restore:
                snap.close()
            raise
        return snap

    def _build(self, snap) -> Partition:
        cfg, machine, boot = self.config, self.machine, self.boot
        if self.kvm is None:
            self.kvm = Kvm()
        max_vcpus = self.kvm.max_vcpus()
        if machine.vcpus > max_vcpus:
            raise ConfigError(f"--cpus {machine.vcpus}: this host's KVM allows at most {max_vcpus}")
        # 2. memory (3. the VM: a ReadyVm's, its memslots on the address space the
        # snapshot's memory is mapped over; else made now, the memory registered
        # before its irqchip, vmm/bringup.py)
        ready = None
        made: list = [None] * machine.vcpus  # vCPUs made ahead, not yet the partition's
        offered = self._ready or getattr(snap, "ready", None)  # given, or a migration's
        if offered is not None and offered.fits(cfg, snap):
            ready = offered.take()
            self.vm, made = ready[0], ready[1]  # closed with the partition from now on
            self.built_ready = True
        self.memory = GuestMemory([])
        try:
            if snap is not None:
                reserved = ready[2] if ready is not None else None
                snap.map_memory(self.memory, cfg.restore_lazy, self._ram_backing, reserved)
            else:
                for gpa, size in machine.ram_ranges:
                    self.memory.add_region(gpa, size, self._ram_backing(size))
            if ready is not None:
                offered.check(self.memory)
            self._enforce_memory()
        except BaseException:
            _close_made(made)
            raise
        if ready is None:
            vm = self.vm = create_vm(self.kvm, self.memory)
        else:
            vm = self.vm
        try:
            self.slots = Memslots(vm, self.memory.regions, vm.check_extension(KVM_CAP_NR_MEMSLOTS))
            if cfg.dirty_ring and ready is None:  # before any vCPU (a ReadyVm's has it)
                from osvmm.vmm.dirty_ring import enable

                enable(vm, cfg.dirty_ring)
            if cfg.disable_exits:
                self.enforcement.append(enforce.disable_exits(vm))
            # 4. devices
            self._make_devices()
            self.mmio = MmioBus()
            if self._disks or self._taps or cfg.switch_nics or self._vsock is not None:
                self._make_virtio()
            # 5. image and boot interface
            if boot is not None:
                boot.write_to(self.memory)
            # 6. vcpus
            supported = self.kvm.supported_cpuid()
            deadline = self.kvm.tsc_deadline_timer()
            if ready is None:
                vm.set_boot_cpu_id(machine.bsp_apic_id)
            if snap is not None:
                from osvmm.vmm import snapshot

                snapshot.check_host(self.kvm, snapshot.vcpu_profile(snap.state), supported)
            for index, apic_id in enumerate(machine.apic_ids):
                if snap is not None:  # the CPUID the vCPU had
                    entry, cpuid = None, snapshot.vcpu_cpuid_entries(snap.state, index)
                else:
                    entry = boot.entry if index == 0 else None
                    cpuid = vcpu_cpuid(supported, apic_id, machine.vcpus, boot.cpuid_mask, deadline)
                vcpu = create_vcpu(
                    vm,
                    supported,
                    apic_id,
                    machine.vcpus,
                    entry=entry,
                    cpuid=cpuid,
                    made=made[index],
                )
                made[index] = None  # the partition's now (closed with it)
                self.cpuids.append(cpuid)
                self.tsc_khz.append(vcpu.tsc_khz())
                self.vcpus.append(vcpu)
                # Its statistics fd now: KVM_GET_STATS_FD waits for the vCPU's lock,
                # which a running vCPU holds. Read only when asked (_kvm_exit_counts).
                self._stats_fds.append(vcpu.stats_fd())
            if vm.dirty_ring_size:
                from osvmm.vmm.dirty_ring import DirtyRings

                self.slots.rings = DirtyRings(vm, vm.dirty_ring_size)
                for vcpu in self.vcpus:
                    self.slots.rings.add(vcpu.map_dirty_ring())
        except BaseException:
            _close_made(made)
            raise
        self._make_threads()
        if snap is not None:
            snapshot.apply(self, snap)
            self.snapshot_extra = snap.extra
            self.snapshot_images = snap.extra_images()
            self._resumed = snap.origin
        elif cfg.reusable:
            from osvmm.vmm.reset import ResetImage

            self._reset = ResetImage.capture(self.kvm, vm, self.vcpus)
        return self

    def _make_devices(self) -> None:
        """The port devices, as new (build, and again for every later boot)."""
        vm = self.vm
        self.serial = Serial(self.config.console, irq=lambda level: vm.irq_line(COM1_IRQ, level))
        self.pio = PortBus()
        self.pio.register(COM1_PORT, 8, self.serial)
        self.pio.register(DEBUG_EXIT_PORT, 1, DebugExit(self._debug_exit))
        self.devices = {"serial": self.serial}
        self.devices.update(
            register_power_devices(
                self.pio,
                on_poweroff=lambda: self.finish(0, "the guest powered off"),
                on_reset=lambda: self.reset(-1),
            )
        )
        self.devices["rtc"] = register_rtc(self.pio, now=time.time)
        self.devices["pm_timer"] = register_pm_timer(self.pio, monotonic_ns=time.monotonic_ns)

    def _make_virtio(self) -> None:
        """The virtio-blk, virtio-net and virtio-vsock devices on the MMIO bus, notified and
        interrupting through KVM eventfds, each served on a thread of its own
        (vmm/virtio.py)."""
        from osvmm.vmm.virtio import VirtioDevices

        self.virtio = VirtioDevices()
        for disk in self._disks:
            self.virtio.add_blk(self.vm, self.memory, self.mmio, disk, self.fault)
        for tap, mac in zip(self._taps, self._macs(), strict=True):
            self.virtio.add_net(self.vm, self.memory, self.mmio, tap, mac, self.fault)
        for port, mac in self.config.switch_nics:
            port.attach()
            self.virtio.add_net(self.vm, self.memory, self.mmio, port, mac, self.fault)
        if self._vsock is not None:
            cid = self.config.vsock.cid
            self.virtio.add_vsock(self.vm, self.memory, self.mmio, self._vsock, cid, self.fault)
        self._disks = []  # the devices own them now
        self._taps = []
        self._vsock = None

    def _macs(self) -> list[bytes]:
        """The MAC of each tap NIC: given, or derived from its tap's name."""
        from osvmm.vmm.tap import default_mac

        return [
            net.mac or default_mac(tap.name)
            for net, tap in zip(self.config.nets, self._taps, strict=True)
        ]

    def _network_nics(self) -> list[tuple[str, bytes]]:
        """(network name, MAC) of each NIC on a plan's network, in slot order."""
        return [(port.network.name, mac) for port, mac in self.config.switch_nics]

    def _make_threads(self) -> None:
        self.threads = []
        self._gate = Gate()
        self._entered = Gate()
        self._armed = False
        for index, vcpu in enumerate(self.vcpus):
            thread = VcpuThread(vcpu, index, self.pio, self.mmio, self)
            thread.on_start = self._vcpu_on_start(thread)
            if index == 0:
                thread.on_enter = self._entered.set
            if self.slots.rings is not None:
                thread.dirty_ring_full = self.slots.rings.ring_full
            self.threads.append(thread)

    def _arm_threads(self) -> None:
        """Start the vCPU threads held at the gate (named and pinned, not yet running)."""
        for t in self.threads:
            t.start(self._gate)
        self._armed = True

    def _end_threads(self, timeout: float = 5) -> None:
        """Stop every vCPU thread, a held one included, and wait for it."""
        for t in self.threads:
            if t.alive:
                t.kick()
        self._gate.set()  # a thread held at the gate sees the stop and ends
        for t in self.threads:
            t.join(timeout)

    # -- kept built (osvmm up) -----------------------------------------------------
    def recycle(self) -> None:
        """Make a partition whose run has ended ready for its next ``start``, as
        ``build`` left it: the vCPUs, interrupt controllers, PIT and kvmclock as
        captured before the first run (vmm/reset.py), guest memory zeroed and the
        boot image written again, the port devices new, no shared or read-only
        memslots, the COM1 line low, no run result, and the vCPU threads made and
        held at their gate, so that ``start`` has only to open it. Needs
        ``config.reusable``; the boot inputs stay those ``build`` read
        (``inputs_changed`` tells when they changed on disk)."""
        name = self.config.name
        if self._reset is None:
            raise VmmBug(f"partition {name!r} was not built reusable")
        if self.result is None and self._armed and self._gate.is_set():
            raise VmmBug(f"partition {name!r} is running: stop it before recycling it")
        self.memory.check_own("recycled")  # a takeover's memory is the new VMM's
        if self.virtio is not None and self.virtio.handed_off:
            raise SnapshotError(f"partition {name!r}: its devices are another VMM's now")
        self._end_threads()  # held at the gate when it was stopped before it started
        if any(t.alive for t in self.threads):
            raise VmmBug(f"partition {name!r}: a vCPU thread did not end")
        for vcpu in self.vcpus:
            vcpu.complete_pending()  # an exit KVM still owes is finished before the reset
            vcpu.sync.disable()
        self._sync_regs = False
        for gpa in list(self._shared_slots):
            self.unmap_shared(gpa)
        if self.slots.readonly:
            self.slots.set_readonly(())
        if self.slots.log_dirty:  # a migration's
            self.slots.set_dirty_logging(False)
        self.memory.written_pages = None
        self.vm.irq_line(COM1_IRQ, 0)
        if self.virtio is not None:  # waits for a queue being served: nothing after it
            self.virtio.reset()  # writes into guest memory, zeroed next
        # The PIT and the LAPIC timers stop here: nothing raises an interrupt after it.
        self._reset.apply(self.vm, self.vcpus)
        self.memory.zero()
        self.boot.write_to(self.memory)
        self._make_devices()
        self.mmio.unclaimed.clear()
        self._make_threads()
        self._arm_threads()
        self._stats_base = self._kvm_exit_counts()
        self._done.clear()
        self.result = None
        self._recycled = True
        self.generation += 1

    def inputs_changed(self) -> bool:
        """Whether the image, kernel or initrd on disk differ from what ``build`` read
        (then a kept partition is closed and a new one built)."""
        return input_stamps(self.config) != self._inputs

    # -- enforcement (osvmm/vmm/enforce.py) ---------------------------------------------
    def _ram_backing(self, size: int) -> str:
        return enforce.ram_backing(self._wants_huge(size))

    def _wants_huge(self, size: int) -> bool:
        hugepages = self.config.hugepages
        return bool(hugepages or (hugepages is None and size >= HUGEPAGE_MIN_RANGE))

    def _enforce_memory(self) -> None:
        cfg = self.config
        for region in self.memory.regions:
            notes = []
            if region.backing == "anonymous":
                notes.append("anonymous memory (this host gives shared memory no huge pages)")
            if cfg.node is not None:
                notes.append(enforce.bind_memory(region.host_addr, region.size, cfg.node))
            if self._wants_huge(region.size):
                notes.append(enforce.advise_huge(region.mem, shared=region.backing == "memfd"))
            if cfg.prefault:
                notes.append(enforce.prefault(region.mem))
                notes.append(enforce.lock(region.host_addr, region.size))
            if notes:
                where = f"{region.gpa:#x}+{region.size >> 10}K"
                self.enforcement.append(f"{where}: " + ", ".join(notes))

    def _vcpu_on_start(self, thread: VcpuThread):
        """Run first on each vCPU thread: name it (/proc comm), pin it, note its tid."""
        cfg = self.config
        cpus = {cfg.host_cpus[thread.index]} if cfg.host_cpus else set(cfg.float_cpus)

        def on_start() -> None:
            thread.tid = threading.get_native_id()
            enforce.name_thread(enforce.thread_name(cfg.name, thread.index))
            if cpus:
                try:
                    enforce.pin_thread(cpus)
                except OsvmmError as err:  # the partition stops with the reason
                    thread.stop_requested = True
                    self.fault(err)

        return on_start

    # -- pausing and snapshots (vmm/snapshot.py) --------------------------------------
    @contextmanager
    def paused(self):
        """Every running vCPU held out of KVM_RUN for the block (VcpuThread.park: each
        leaves through the interrupted-exit path, its last exit completed), then let
        go. One pauser at a time; vCPUs not started, or stopping, are left alone."""
        with self._park_lock:
            parked = []
            try:
                for t in self.threads:
                    if t.park():
                        parked.append(t)
                yield
            finally:
                for t in parked:
                    t.unpark()

    @contextmanager
    def quiesced(self):
        """``paused``, and the virtio devices' threads stopped too (each between two
        requests, vmm/virtio.py): guest memory and every device's state stay as
        they are for the block (a snapshot, a migration's stop-and-copy, a
        takeover); they start again only if the partition still runs after it."""
        with self.paused():
            if self.virtio is None:
                yield
            else:
                with self.virtio.quiesced(resume=lambda: self.running):
                    yield

    def snapshot(self, directory: str, extra=None, then=None):
        """Write a snapshot of the running partition into ``directory`` with its vCPUs
        paused; returns (vmm.snapshot.Written, milliseconds paused). ``extra()``, called
        while paused, gives the layers above's (state, images); ``then()`` runs before
        the vCPUs go on (a stop: they never do)."""
        from osvmm.vmm import snapshot

        if not self.running:
            raise SnapshotError(f"partition {self.config.name!r} is not running")
        t0 = time.perf_counter()
        with self.quiesced():
            if not self.running:
                raise SnapshotError(f"partition {self.config.name!r} ended")
            state, images = extra() if extra is not None else ({}, {})
            written = snapshot.write(self, directory, state, images)
            if then is not None:
                then()
            paused_ms = (time.perf_counter() - t0) * 1000
        return written, paused_ms

    def track_dirty(self, on: bool) -> None:
        """Start (or stop) tracking which guest pages change: KVM's dirty log for the
        guest's writes, GuestMemory.written_pages for the VMM's (a migration)."""
        with self._slots_lock:
            self.slots.set_dirty_logging(on)
            self.memory.written_pages = set() if on else None

    @property
    def dirty_log(self) -> str:
        """How the guest's writes are tracked: "dirty ring" or "dirty bitmap"."""
        return "dirty bitmap" if self.slots.rings is None else "dirty ring"

    @property
    def dirty_ring_full_exits(self) -> int:
        """KVM_EXIT_DIRTY_RING_FULL exits handled so far (0 with the bitmap)."""
        return 0 if self.slots.rings is None else self.slots.rings.full_exits

    def dirty_pages(self) -> list[int]:
        """The guest-physical pages changed since the last call (sorted), and forget them."""
        with self._slots_lock:
            pages = set(self.slots.dirty_pages())
            if self.memory.written_pages:
                pages |= self.memory.written_pages
                self.memory.written_pages = set()
        return sorted(pages)

    def vcpu_tids(self) -> list[int | None]:
        """The host thread id of each vCPU (None before it started)."""
        return [getattr(t, "tid", None) for t in self.threads]

    # -- running -----------------------------------------------------------------
    def start(self) -> None:
        """Run the vCPUs: their threads made ahead by ``recycle`` (or now) are let go.
        Returns once the boot vCPU's thread is past its gate (at most ENTER_WAIT_S):
        a thread let go needs the GIL to reach KVM_RUN, and the caller, holding it,
        would otherwise keep it until its own next blocking call (an answer to
        send, say), so that the guest would start that much later."""
        install_kick_handler()
        if self.virtio is not None:
            self.virtio.start(self.config.name)
        if not self._armed:
            self._arm_threads()
        self._recycled = False
        self._gate.set()
        self._entered.wait(ENTER_WAIT_S)

    def wait(self, timeout: float | None = None) -> RunResult | None:
        if not self._done.wait(timeout):
            return None
        for t in self.threads:
            t.join(5)
        return self.result

    def stop(self, status: int = 0, reason: str = "stopped by the VMM") -> None:
        self.finish(status, reason)

    # -- what vCPU threads and devices report -------------------------------------
    def finish(
        self, status: int, reason: str, fault: OsvmmError | None = None, reset: bool = False
    ) -> None:
        with self._lock:
            if self.result is not None:
                return
            self.result = RunResult(status, reason, fault, reset)
        for t in self.threads:
            t.kick()
        self._done.set()

    def fault(self, err: OsvmmError) -> None:
        self.finish(err.exit_status, str(err), err)

    def reset(self, vcpu_index: int) -> None:
        """The guest asked for a reset: ``osvmm run`` ends (as QEMU -no-reboot); a
        supervisor (``osvmm up``) restarts the partition."""
        self.finish(0, "the guest reset the machine", reset=True)

    def _debug_exit(self, value: int) -> None:
        self.finish(exit_status(value), f"debug exit with value {value}")

    # -- statistics ----------------------------------------------------------------
    def device_stats(self) -> list[dict]:
        """Per virtio device, in slot order: vmm/virtio.py DeviceThread.describe."""
        return [dev.describe() for dev in self.virtio.devices] if self.virtio is not None else []

    def exit_stats(self) -> list[dict]:
        """Per vCPU: KVM's exit statistics and the exits the VMM handled, by kind."""
        out = []
        for i, (t, kvm) in enumerate(zip(self.threads, self._kvm_exit_counts(), strict=True)):
            if self._stats_base:  # a recycled partition counts this boot's exits only
                base = self._stats_base[i]
                kvm = {k: n - base.get(k, 0) for k, n in kvm.items()}
            out.append({"vcpu": t.index, "kvm": kvm, "vmm": t.handled_counts()})
        return out

    def _kvm_exit_counts(self) -> list[dict[str, int]]:
        """KVM's exit counts of each vCPU since it was created. The statistics files'
        schemas are read at the first call (``osvmm run`` without --stats never asks)."""
        from osvmm.kvm.stats import StatsReader, exit_counts

        with self._lock:
            if not self.stats_readers:
                self.stats_readers = [StatsReader(fd) for fd in self._stats_fds]
        return [exit_counts(r.read()) for r in self.stats_readers]

    def remove_host_files(self) -> None:
        """What ``close`` would leave behind when the process ends without it: the
        vsock's socket file (vmm/vsock_uds.py). Memory, fds and the VM the kernel
        reclaims with the process."""
        if self.virtio is not None:
            self.virtio.remove_host_files()
        if self._vsock is not None:
            self._vsock.unlink()

    def close(self) -> None:
        self._end_threads()
        self._close_disks()
        for fd in self._stats_fds:  # StatsReader owns its fd: closed here once for all
            os.close(fd)
        self._stats_fds = []
        self.stats_readers = []
        for v in self.vcpus:
            v.close()
        if self.vm is not None:
            self.vm.close()
        if self.memory is not None:
            self.memory.close()
        if self._own_kvm and self.kvm is not None:
            self.kvm.close()

    # -- the interface of the partitioning layer (osvmm.hypercall.live) -----------
    @property
    def running(self) -> bool:
        """Built, not closed, and its run not ended (a recycled partition: once started)."""
        return (
            self.vm is not None and self.vm.fd >= 0 and self.result is None and not self._recycled
        )

    def add_port_hook(self, port: int, fn) -> None:
        """Route exits on ``port`` to ``fn(vcpu, exit)`` on every vCPU, on that vCPU's
        thread (it may read and write the vCPU's registers: the hypercall port)."""
        self.add_port_hooks(port, [fn] * len(self.threads))

    def add_port_hooks(self, port: int, fns) -> None:
        """``add_port_hook`` with a hook of its own for each vCPU (``fns[i]``: vCPU i's)."""
        if len(fns) != len(self.threads):
            raise ValueError(f"{len(fns)} port hooks for {len(self.threads)} vCPUs")
        for t, fn in zip(self.threads, fns, strict=True):
            t.port_hooks[port] = fn

    def add_mmio_device(self, gpa: int, size: int, device) -> None:
        self.mmio.register(gpa, size, device)

    def map_shared(self, gpa: int, size: int, host_addr: int, writable: bool) -> None:
        """Map host memory shared with others (a channel) at ``gpa``, in a memslot of
        its own; read-only unless ``writable`` (a guest write then exits as MMIO)."""
        if gpa in self._shared_slots:
            raise ValueError(f"{gpa:#x} is already mapped")
        with self._slots_lock:
            slot = self.slots.take()
            flags = 0 if writable else KVM_MEM_READONLY
            try:
                self.vm.set_user_memory_region(slot, gpa, size, host_addr, flags)
            except BaseException:
                self.slots.give(slot)
                raise
            self._shared_slots[gpa] = (slot, size)

    def unmap_shared(self, gpa: int) -> None:
        with self._slots_lock:
            slot, _ = self._shared_slots.pop(gpa)
            self.vm.set_user_memory_region(slot, gpa, 0, 0)  # size 0 deletes the slot
            self.slots.give(slot)

    def shared_mappings(self) -> dict[int, int]:
        """What ``map_shared`` mapped: guest-physical address -> size."""
        return {gpa: size for gpa, (_, size) in self._shared_slots.items()}

    def set_ram_write_handler(self, fn) -> None:
        """``fn(thread, addr, data) -> bool`` sees, on the writing vCPU's thread, each
        guest write into RAM mapped read-only (``protect_pages``); it returns True when
        ``addr`` was guest RAM (then the write is its business: apply it or not)."""
        for t in self.threads:
            t.ram_write = fn

    def protect_pages(self, ranges) -> None:
        """Map exactly ``ranges`` (page-aligned guest-physical RAM) read-only, the rest
        of RAM writable. Running vCPUs are parked while the memslots change."""
        if ranges and any(t.ram_write is None for t in self.threads):
            raise ValueError("protect_pages without a RAM write handler")
        # Parked first, the slots lock taken after: a vCPU in a hypercall that maps a
        # channel (map_shared) takes that lock before it can park.
        with self.paused(), self._slots_lock:
            self.slots.set_readonly(ranges)

    def protected_pages(self) -> tuple[tuple[int, int], ...]:
        """The guest-physical RAM ranges mapped read-only now."""
        return self.slots.readonly if self.slots is not None else ()

    def enable_sync_regs(self) -> bool:
        """Have KVM store each vCPU's general registers in kvm_run at every exit
        (KVM_CAP_SYNC_REGS), so ``vcpu_rip`` needs no ioctl; False where unsupported."""
        if not self.vm.supports_sync_regs():
            return False
        for v in self.vcpus:
            v.sync.enable()
        self._sync_regs = True
        return True

    def vcpu_rip(self, thread) -> int:
        """RIP of the vCPU of ``thread`` at its current exit (on that thread)."""
        if self._sync_regs:
            return thread.vcpu.sync.regs.rip
        return thread.vcpu.get_regs().rip

    def vcpu_cpl(self, thread) -> int:
        """The current privilege level of the vCPU of ``thread`` (CS.RPL), on that thread."""
        return thread.vcpu.get_sregs().cs.selector & 3

    def translate(self, thread, vaddr: int) -> int | None:
        """The guest-physical address of ``vaddr`` in the vCPU's current address
        space (KVM_TRANSLATE), or None when it is not mapped."""
        return thread.vcpu.translate(vaddr)

    def raise_msi(self, vcpu_index: int, vector: int) -> None:
        """An MSI with ``vector`` to the LAPIC of vCPU ``vcpu_index`` (a doorbell)."""
        apic_id = self.machine.apic_ids[vcpu_index]
        self.vm.signal_msi(MSI_ADDRESS_BASE | apic_id << 12, vector)

    def read_guest(self, gpa: int, length: int) -> bytes:
        return self.memory.read(gpa, length)

    def write_guest(self, gpa: int, data: bytes) -> None:
        self.memory.write(gpa, data)

    def console_write(self, data: bytes) -> None:
        """Bytes to the partition's console sink, as if the guest had printed them."""
        self.config.console(data)
