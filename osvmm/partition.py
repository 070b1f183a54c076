"""A partition: one guest with its memory, VM, vCPUs and devices.

``Partition.build`` is the boot recipe, in order, on one screen:

    1. plan       the guest-visible platform (memory, APIC IDs, NUMA nodes)
    2. memory     guest RAM mapped on the host, bound to its NUMA node, huge
                  pages advised, optionally prefaulted and locked (enforce.py)
    3. vm         the KVM VM with its in-kernel LAPICs, I/O APIC, PIC and PIT;
                  HLT/PAUSE exits disabled on dedicated cores
    4. memslots   guest RAM registered with KVM
    5. devices    COM1 (8250) and isa-debug-exit on the port bus
    6. image      the kernel or image loaded, the boot interface written
    7. vcpus      created with their CPUID; the BSP gets the entry registers,
                  the APs wait for INIT/SIPI in the in-kernel LAPIC

``start`` runs one thread per vCPU, each first pinning itself to its host
CPU (dedicated) or to the pool (floating); ``wait`` returns a RunResult when the
guest ends (debug exit, power-off, fault) or ``stop`` is called.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from osvmm import enforce
from osvmm.arch.x86 import cpuid as x86_cpuid
from osvmm.arch.x86 import layout
from osvmm.arch.x86.regs import apply_entry_state
from osvmm.boot.plan import BootPlan
from osvmm.devices.bus import PortBus
from osvmm.devices.debug_exit import DEBUG_EXIT_PORT, DebugExit, exit_status
from osvmm.devices.mmio import MmioBus
from osvmm.devices.power import register_power_devices
from osvmm.devices.serial import COM1_IRQ, COM1_PORT, Serial
from osvmm.errors import ConfigError, OsvmmError
from osvmm.kvm import Kvm
from osvmm.kvm.stats import StatsReader
from osvmm.memory import GuestMemory
from osvmm.vcpu import VcpuThread, install_kick_handler


@dataclass
class PartitionConfig:
    name: str = "guest"
    image: str | None = None  # an ELF image: PVH, plain ELF64, or a Linux vmlinux
    kernel: str | None = None  # a Linux kernel: bzImage or vmlinux
    initrd: str | None = None
    cmdline: str = ""
    memory: int = 64 * layout.MiB
    vcpus: int = 1
    apic_ids: tuple[int, ...] | None = None  # default 0..vcpus-1
    numa_nodes: int = 1
    console: Callable[[bytes], None] = field(default=lambda data: None, repr=False)
    cpuid_mask: tuple[str, ...] = ()
    partition_id: int = 0  # its index in the plan (the hypercall ABI's partition id)
    # Mark the channel window (layout.CHANNEL_WINDOW_*) reserved in the e820 map, so a
    # kernel never puts anything where CHANNEL_ATTACH maps a channel.
    reserve_channel_window: bool = False
    # Enforcement (osvmm/enforce.py). The defaults leave the host alone, as `osvmm run` does.
    host_cpus: tuple[int, ...] = ()  # dedicated host CPUs: vCPU i pinned to host_cpus[i]
    float_cpus: tuple[int, ...] = ()  # floating: every vCPU allowed on these (the pool)
    node: int | None = None  # bind guest memory to this host NUMA node (mbind)
    hugepages: bool = False  # madvise(MADV_HUGEPAGE) where THP allows
    prefault: bool = False  # populate all guest memory at build and mlock it
    disable_exits: bool = False  # KVM_CAP_X86_DISABLE_EXITS HLT|PAUSE (dedicated cores)


@dataclass
class RunResult:
    status: int  # the osvmm process exit status this run stands for
    reason: str
    fault: OsvmmError | None = None
    reset: bool = False  # the guest asked for a reset (a supervisor restarts it)


class Partition:
    def __init__(self, config: PartitionConfig, kvm: Kvm | None = None):
        self.config = config
        self.kvm = kvm
        self._own_kvm = kvm is None
        self.vm = None
        self.memory: GuestMemory | None = None
        self.vcpus = []
        self.threads: list[VcpuThread] = []
        self.stats_readers: list[StatsReader] = []
        self.image = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.result: RunResult | None = None
        self.boot_log: list[str] = []  # what the VMM adapted for this host (printed by the CLI)
        self.cpuid_mask: list[str] = list(config.cpuid_mask)
        self.enforcement: list[str] = []  # what enforce.py applied, one note each

    # -- the recipe ------------------------------------------------------------
    def build(self) -> Partition:
        cfg = self.config
        if cfg.vcpus < 1:
            raise ConfigError(f"--cpus must be at least 1, not {cfg.vcpus}")
        if cfg.memory < layout.MIN_MEMORY:
            raise ConfigError(
                f"--memory {cfg.memory} bytes is too small: a partition needs at least "
                f"{layout.MIN_MEMORY >> 20} MiB"
            )
        apic_ids = cfg.apic_ids or tuple(range(cfg.vcpus))
        if cfg.host_cpus and len(cfg.host_cpus) != cfg.vcpus:
            raise ConfigError(
                f"partition {cfg.name!r}: {len(cfg.host_cpus)} host CPUs for {cfg.vcpus} vCPUs"
            )
        if self.kvm is None:
            self.kvm = Kvm()
        max_vcpus = self.kvm.check_extension(66) or self.kvm.check_extension(9)  # MAX/NR_VCPUS
        if cfg.vcpus > max_vcpus:
            raise ConfigError(f"--cpus {cfg.vcpus}: this host's KVM allows at most {max_vcpus}")

        # 1. plan
        self.plan = BootPlan.simple(
            cfg.memory, apic_ids, cfg.numa_nodes, channels=cfg.reserve_channel_window
        )
        # 2. memory
        self.memory = GuestMemory(layout.ram_regions(cfg.memory))
        self._enforce_memory()
        # 3. vm
        vm = self.vm = self.kvm.create_vm()
        if cfg.disable_exits:
            self.enforcement.append(enforce.disable_exits(vm))
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        vm.create_irqchip()
        vm.create_pit2()
        # 4. memslots
        for slot, region in enumerate(self.memory.regions):
            vm.set_user_memory_region(slot, region.gpa, region.size, region.host_addr)
        self._next_slot = len(self.memory.regions)
        self.extra_slots: dict[int, tuple[int, int]] = {}  # gpa -> (slot, size)
        # 5. devices
        self.serial = Serial(cfg.console, irq=lambda level: vm.irq_line(COM1_IRQ, level))
        self.pio = PortBus()
        self.pio.register(COM1_PORT, 8, self.serial)
        self.pio.register(DEBUG_EXIT_PORT, 1, DebugExit(self._debug_exit))
        register_power_devices(
            self.pio,
            on_poweroff=lambda: self.finish(0, "the guest powered off"),
            on_reset=lambda: self.reset(-1),
        )
        self.mmio = MmioBus()
        # 6. image and boot interface
        from osvmm.boot.setup import load_and_prepare

        self.image, entry_state = load_and_prepare(self)
        # 7. vcpus
        supported = self.kvm.supported_cpuid()
        vm.set_boot_cpu_id(apic_ids[0])
        for index, apic_id in enumerate(apic_ids):
            vcpu = vm.create_vcpu(apic_id)
            vcpu.set_cpuid(
                x86_cpuid.vcpu_cpuid(supported, apic_id, len(apic_ids), tuple(self.cpuid_mask))
            )
            if index == 0:
                sregs, regs = vcpu.get_sregs(), vcpu.get_regs()
                regs.__init__()  # all general registers zero but what the entry sets
                apply_entry_state(entry_state, sregs, regs)
                vcpu.set_sregs(sregs)
                vcpu.set_regs(regs)
            self.vcpus.append(vcpu)
            self.stats_readers.append(StatsReader(vcpu.stats_fd()))
            thread = VcpuThread(vcpu, index, self.pio, self.mmio, self)
            thread.on_start = self._vcpu_on_start(thread)
            self.threads.append(thread)
        return self

    # -- enforcement (osvmm/enforce.py) ---------------------------------------------
    def _enforce_memory(self) -> None:
        cfg = self.config
        for region in self.memory.regions:
            notes = []
            if cfg.node is not None:
                notes.append(enforce.bind_memory(region.host_addr, region.size, cfg.node))
            if cfg.hugepages:
                notes.append(enforce.advise_huge(region.mem))
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

    def vcpu_tids(self) -> list[int | None]:
        """The host thread id of each vCPU (None before it started)."""
        return [getattr(t, "tid", None) for t in self.threads]

    # -- hooks for the partitioning layer ------------------------------------------
    def add_port_hook(self, port: int, fn) -> None:
        """Route exits on ``port`` to ``fn(vcpu_thread, exit)`` on every vCPU (it may
        read and write that vCPU's registers: the hypercall port)."""
        for t in self.threads:
            t.port_hooks[port] = fn

    def map_extra(self, gpa: int, size: int, host_addr: int, readonly: bool = False) -> int:
        """Map host memory (a shared channel) at ``gpa``; returns the memslot used."""
        from osvmm.kvm.structs import KVM_MEM_READONLY

        slot = self._next_slot
        self._next_slot += 1
        flags = KVM_MEM_READONLY if readonly else 0
        self.vm.set_user_memory_region(slot, gpa, size, host_addr, flags)
        self.extra_slots[gpa] = (slot, size)
        return slot

    def unmap_extra(self, gpa: int) -> None:
        slot, _ = self.extra_slots.pop(gpa)
        self.vm.set_user_memory_region(slot, gpa, 0, 0)  # size 0 deletes the slot

    # -- running -----------------------------------------------------------------
    def start(self) -> None:
        install_kick_handler()
        for t in self.threads:
            t.start()

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
    def exit_stats(self) -> list[dict]:
        """Per vCPU: KVM's exit statistics and the exits the VMM handled, by kind."""
        from osvmm.kvm.stats import exit_counts

        out = []
        for t, reader in zip(self.threads, self.stats_readers, strict=True):
            handled = t.handled_counts()
            out.append({"vcpu": t.index, "kvm": exit_counts(reader.read()), "vmm": handled})
        return out

    def close(self) -> None:
        for t in self.threads:
            if t.alive:
                t.kick()
                t.join(5)
        for r in self.stats_readers:
            r.close()
        for v in self.vcpus:
            v.close()
        if self.vm is not None:
            self.vm.close()
        if self.memory is not None:
            self.memory.close()
        if self._own_kvm and self.kvm is not None:
            self.kvm.close()
