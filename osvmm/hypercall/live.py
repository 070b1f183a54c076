"""The live side of the hypercall interface: the VMM applies what ``monitor.step`` says.

One ``LiveMonitor`` serves every partition of a VMM process. ``bind`` installs
its handler on a partition's hypercall port (``Partition.add_port_hook``); a
hypercall exit then runs, on that vCPU's own thread:

    1. registers   a0..a3 from RDI, RSI, RBX, RCX (KVM sync regs in kvm_run
                   where the host has them: no ioctl), the call number from
                   the 4 bytes the ``out`` wrote (EAX)
    2. step        ``monitor.step`` on the shared state, under one lock
    3. effects     applied in order, still under the lock (so the memslots
                   always match the state's attachments):
                     MapChannel      a memslot of the channel's shared memory,
                                     KVM_MEM_READONLY unless writable
                     UnmapChannel    that memslot removed
                     RaiseInterrupt  KVM_SIGNAL_MSI on the *target's* VM: its
                                     in-kernel LAPIC gets the vector, no round
                                     trip through the target's VMM thread
                     ConsoleWrite    the bytes to the console sink, prefixed
                     WriteGuest      the bytes to the caller's RAM
    4. result      RAX (sync regs marked dirty, or KVM_SET_REGS)
    5. lifecycle   PartitionLifecycle goes to the ``lifecycle`` callback after
                   the lock is released (a supervisor's stop/start/restart);
                   without one, SHUTDOWN and REBOOT end the caller's run (as
                   ``osvmm run`` does for a power-off or a reset)

Each channel is one anonymous shared mapping of the host, the same pages in
every member that attaches it. A write by a read-only member exits as an MMIO
write (its memslot is read-only); the VMM counts it and the guest goes on, the
memory unchanged. So does any access to the channel window where nothing is
attached.

With ``check=True`` every step is followed by the model checker's transition
invariants (``checker.check_transition``) on the real state, and by a
comparison of each partition's channel memslots with the state's attachments;
a failure is recorded in ``violations`` (tests assert it stays empty).

Events the ABI does not make (a guest that resets or powers off through its
ports, a supervisor restarting a partition on its own) are told to the
monitor with ``partition_stopped`` / ``partition_started``, so its state keeps
matching the partitions: a stopped partition holds no channel.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from osvmm.arch.x86 import layout
from osvmm.errors import OsvmmError
from osvmm.hypercall import abi, checker, monitor
from osvmm.hypercall.abi import HYPERCALL_PORT, ControlOp
from osvmm.hypercall.monitor import (
    RUNNING,
    STOPPED,
    ChannelConfig,
    ConsoleWrite,
    MapChannel,
    MonitorConfig,
    MonitorState,
    PartitionConfig,
    PartitionLifecycle,
    RaiseInterrupt,
    UnmapChannel,
    WriteGuest,
)
from osvmm.kvm.exits import IoOut
from osvmm.kvm.structs import KVM_SYNC_X86_REGS, kvm_run

KVM_CAP_SYNC_REGS = 74
MSI_ADDRESS_BASE = 0xFEE0_0000  # MSI address: 0xfee00000 | destination APIC ID << 12

# struct kvm_run: kvm_valid_regs, kvm_dirty_regs, then s.regs (struct kvm_regs).
_VALID_OFF = kvm_run.kvm_valid_regs.offset
_DIRTY_OFF = kvm_run.kvm_dirty_regs.offset
_REGS_OFF = kvm_run.s.offset
_SYNC_ARGS = struct.Struct("<8xQQ8xQQ")  # rbx, rcx, rsi, rdi of kvm_regs (rax, rdx skipped)
_U64 = struct.Struct("<Q")
_DIRTY = _U64.pack(KVM_SYNC_X86_REGS)
assert _VALID_OFF == 288 and _DIRTY_OFF == 296 and _REGS_OFF == 304


def monitor_config(plan) -> MonitorConfig:
    """The monitor's configuration from a plan (``osvmm.plan.config.Plan``)."""
    parts = [
        PartitionConfig(p.name, p.memory, p.vcpus, p.privileged, tuple(p.doorbells))
        for p in plan.partitions
    ]
    chans = [ChannelConfig(c.name, c.size, dict(c.members)) for c in plan.channels]
    return MonitorConfig(parts, chans)


class ChannelMemory:
    """A channel's shared memory: one anonymous MAP_SHARED mapping on the host."""

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = size
        self.mem = mmap.mmap(-1, size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._anchor = ctypes.c_char.from_buffer(self.mem)
        self.host_addr = ctypes.addressof(self._anchor)

    def read(self, offset: int, length: int) -> bytes:
        return self.mem[offset : offset + length]

    def write(self, offset: int, data: bytes) -> None:
        self.mem[offset : offset + len(data)] = data

    def close(self) -> None:
        if self.mem is not None:
            del self._anchor
            self.mem.close()
            self.mem = None


class _ChannelWindow:
    """The MMIO device behind the channel window of one partition: accesses where
    no writable memslot is (a read-only channel, or nothing attached) land here.
    Writes are dropped and counted; reads give all ones."""

    def __init__(self, counts: Counter, partition_id: int):
        self._counts = counts
        self._id = partition_id

    def mmio_write(self, offset: int, data: bytes) -> None:
        self._counts[self._id] += 1

    def mmio_read(self, offset: int, length: int) -> bytes:
        return b"\xff" * length


@dataclass
class LiveStats:
    calls: Counter = field(default_factory=Counter)  # call number -> calls
    errors: Counter = field(default_factory=Counter)  # -errno -> calls that failed with it
    window_writes: Counter = field(default_factory=Counter)  # partition id -> dropped writes
    other_port_exits: int = 0  # exits on the port that are not a 4-byte out


class LiveMonitor:
    """The hypercall monitor of a running VMM: shared state, channels, effects."""

    def __init__(
        self,
        config: MonitorConfig,
        *,
        lifecycle: Callable[[int, ControlOp], None] | None = None,
        console: Callable[[int, bytes], None] | None = None,
        check: bool = False,
        sync_regs: bool = True,
    ):
        """``lifecycle(partition_id, op)``: carries out a PartitionLifecycle (called on
        a thread of its own, never a vCPU thread). ``console(partition_id, data)``:
        where CONSOLE_WRITE output goes (default: the partition's console, each line
        prefixed with its name). ``check``: run the invariants after every step."""
        self.state = MonitorState.from_config(config)
        self.topology = self.state.topology
        self.lifecycle = lifecycle
        self.console = console
        self.check = check
        self.sync_regs = sync_regs
        self.lock = threading.Lock()
        self.channels = [ChannelMemory(c.name, c.size) for c in self.topology.channels]
        self.partitions: dict[int, object] = {}
        self.mapped: dict[tuple[int, int], bool] = {}  # (partition, channel) -> writable
        self.stats = LiveStats()
        self.violations: list[str] = []
        self._console_partial: dict[int, bool] = {}

    # -- partitions ------------------------------------------------------------
    def id_of(self, name: str) -> int:
        for p in self.topology.partitions:
            if p.name == name:
                return p.id
        raise KeyError(name)

    def bind(self, partition_id: int, partition) -> None:
        """Serve the hypercalls of a built (not yet started) ``Partition``; call again
        with the new object when a supervisor rebuilds a partition."""
        if partition.extra_slots:
            raise ValueError(f"partition {partition_id} already has extra memslots")
        if partition_id in self.partitions and self.partitions[partition_id] is not partition:
            # A fresh kernel in a rebuilt partition: whatever the old one held is gone.
            self._set_lifecycle(partition_id, STOPPED)
            self._set_lifecycle(partition_id, RUNNING)
        self.partitions[partition_id] = partition
        use_sync = self.sync_regs and partition.vm.check_extension(KVM_CAP_SYNC_REGS)
        use_sync = bool(use_sync) and bool(use_sync & KVM_SYNC_X86_REGS)
        for t in partition.threads:
            if use_sync:
                _U64.pack_into(t.vcpu.run_mmap, _VALID_OFF, KVM_SYNC_X86_REGS)
        hook = self._sync_hook(partition_id) if use_sync else self._ioctl_hook(partition_id)
        partition.add_port_hook(HYPERCALL_PORT, hook)
        try:
            partition.mmio.register(
                layout.CHANNEL_WINDOW_START,
                layout.CHANNEL_WINDOW_SIZE,
                _ChannelWindow(self.stats.window_writes, partition_id),
            )
        except ValueError:
            pass  # registered by an earlier bind of the same bus

    def partition_stopped(self, partition_id: int) -> None:
        """The partition stopped outside the ABI (power-off, fault, supervisor): it
        loses its channels."""
        self._set_lifecycle(partition_id, STOPPED)

    def partition_started(self, partition_id: int) -> None:
        """The partition boots again (a fresh kernel, no channel attached)."""
        self._set_lifecycle(partition_id, RUNNING)

    def _set_lifecycle(self, pid: int, life: str) -> None:
        with self.lock:
            held = self.state.attached(pid)
            for a in held:
                self._unmap(pid, a.channel)
            lifecycle = list(self.state.lifecycle)
            lifecycle[pid] = life
            self.state = replace(
                self.state,
                lifecycle=tuple(lifecycle),
                attachments=self.state.attachments - frozenset(held),
            )

    # -- the exit handlers -----------------------------------------------------
    def _sync_hook(self, pid: int):
        call = self.call
        stats = self.stats

        def hook(vcpu_thread, ex) -> None:
            if type(ex) is not IoOut or ex.size != 4:
                stats.other_port_exits += 1
                _complete_other(vcpu_thread, ex)
                return
            mm = vcpu_thread.vcpu.run_mmap
            rbx, rcx, rsi, rdi = _SYNC_ARGS.unpack_from(mm, _REGS_OFF)
            result = call(pid, int.from_bytes(ex.data, "little"), (rdi, rsi, rbx, rcx))
            _U64.pack_into(mm, _REGS_OFF, result & abi.U64_MAX)
            mm[_DIRTY_OFF : _DIRTY_OFF + 8] = _DIRTY

        return hook

    def _ioctl_hook(self, pid: int):
        call = self.call
        stats = self.stats

        def hook(vcpu_thread, ex) -> None:
            if type(ex) is not IoOut or ex.size != 4:
                stats.other_port_exits += 1
                _complete_other(vcpu_thread, ex)
                return
            vcpu = vcpu_thread.vcpu
            regs = vcpu.get_regs()
            nr = int.from_bytes(ex.data, "little")
            regs.rax = call(pid, nr, (regs.rdi, regs.rsi, regs.rbx, regs.rcx)) & abi.U64_MAX
            vcpu.set_regs(regs)

        return hook

    # -- one call ----------------------------------------------------------------
    def call(self, pid: int, nr: int, args: tuple[int, ...]) -> int:
        """Run one hypercall of partition ``pid`` and apply its effects; its result."""
        lifecycle_ops = ()
        with self.lock:
            src = self.state
            res = monitor.step(src, pid, nr, args, self._read_guest)
            self.state = res.state
            self.stats.calls[nr] += 1
            if res.result < 0:
                self.stats.errors[res.result] += 1
            if res.effects:
                lifecycle_ops = self._apply(res.effects)
            if self.check:
                self._check(src, pid, nr, args, res)
        for effect in lifecycle_ops:
            self._lifecycle(pid, effect)
        return res.result

    def _apply(self, effects) -> tuple[PartitionLifecycle, ...]:
        later = []
        for e in effects:
            kind = type(e)
            if kind is RaiseInterrupt:
                target = self.partitions.get(e.partition)
                if _live(target) and target.result is None:
                    apic_id = target.vcpus[e.vcpu].id
                    target.vm.signal_msi(MSI_ADDRESS_BASE | apic_id << 12, e.vector)
            elif kind is ConsoleWrite:
                self._console(e.partition, e.data or b"")
            elif kind is WriteGuest:
                self.partitions[e.partition].memory.write(e.gpa, e.data)
            elif kind is MapChannel:
                self._map(e.partition, e.channel, e.writable)
            elif kind is UnmapChannel:
                self._unmap(e.partition, e.channel)
            elif kind is PartitionLifecycle:
                later.append(e)
        return tuple(later)

    def _map(self, pid: int, channel: int, writable: bool) -> None:
        part = self.partitions.get(pid)
        chan = self.topology.channels[channel]
        if _live(part):
            mem = self.channels[channel]
            part.map_extra(chan.gpa, chan.size, mem.host_addr, readonly=not writable)
        self.mapped[(pid, channel)] = writable

    def _unmap(self, pid: int, channel: int) -> None:
        part = self.partitions.get(pid)
        gpa = self.topology.channels[channel].gpa
        if _live(part) and gpa in part.extra_slots:
            part.unmap_extra(gpa)
        self.mapped.pop((pid, channel), None)

    def _read_guest(self, pid: int, gpa: int, length: int) -> bytes:
        return self.partitions[pid].memory.read(gpa, length)

    def _console(self, pid: int, data: bytes) -> None:
        if self.console is not None:
            self.console(pid, data)
            return
        part = self.partitions.get(pid)
        if part is None:
            return
        # Prefix every line with the partition's name; a line may span calls.
        prefix = f"[{self.topology.partitions[pid].name}] ".encode()
        out = bytearray()
        at_start = not self._console_partial.get(pid, False)
        for line in data.splitlines(keepends=True):
            if at_start:
                out += prefix
            out += line
            at_start = line.endswith(b"\n")
        self._console_partial[pid] = not at_start
        part.config.console(bytes(out))

    def _lifecycle(self, caller: int, e: PartitionLifecycle) -> None:
        if self.lifecycle is not None:
            threading.Thread(
                target=self.lifecycle, args=(e.partition, e.op), name="hc-lifecycle", daemon=True
            ).start()
            return
        part = self.partitions.get(e.partition)
        if part is None:
            return
        # No supervisor (``osvmm run``): the partition's run ends, a reboot as a reset.
        if e.op == ControlOp.REBOOT:
            part.finish(0, "the guest rebooted (hypercall)", reset=True)
        elif e.op in (ControlOp.SHUTDOWN, ControlOp.STOP):
            part.finish(0, f"partition stopped by hypercall {e.op.name}")
        else:
            part.finish(0, f"partition {e.op.name} by hypercall: no supervisor", reset=True)

    # -- live invariants -----------------------------------------------------------
    def _check(self, src: MonitorState, pid: int, nr: int, args, res) -> None:
        try:
            msg = checker.check_transition(self.topology, src, pid, nr, tuple(args), res)
        except Exception as err:  # noqa: BLE001 - recorded, the VMM goes on
            msg = f"checker raised {err!r}"
        if msg is None:
            msg = self.memslot_mismatch()
        if msg is not None:
            self.violations.append(f"{abi.BY_NUMBER.get(nr, nr)} by {pid}: {msg}")

    def memslot_mismatch(self) -> str | None:
        """None when every partition's channel memslots are exactly its attachments."""
        want = {(a.partition, a.channel): a.writable for a in self.state.attachments}
        if want != self.mapped:
            return f"mapped channels {sorted(self.mapped.items())} != attachments {want}"
        chans = self.topology.channels
        for pid, part in self.partitions.items():
            if not _live(part):
                continue
            slots = {gpa: size for gpa, (_, size) in part.extra_slots.items()}
            expect = {chans[c].gpa: chans[c].size for (p, c) in want if p == pid}
            if slots != expect:
                return f"partition {pid} memslots {slots} != attached channels {expect}"
        return None

    def close(self) -> None:
        for mem in self.channels:
            mem.close()


def _live(part) -> bool:
    """A partition whose VM exists and is not closed."""
    return part is not None and part.vm is not None and part.vm.fd >= 0


def serve_supervisor(supervisor, check: bool = False) -> LiveMonitor:
    """Run the hypercall interface for every partition of an ``osvmm up`` supervisor.

    Each partition the supervisor builds (first boot, restart, reboot) is bound
    before its vCPUs start, with no channel attached; PARTITION_CONTROL goes to
    the supervisor's stop/start/restart (SHUTDOWN is a stop, REBOOT a restart)."""
    live = LiveMonitor(monitor_config(supervisor.plan), lifecycle=None, check=check, console=None)
    names = {p.id: p.name for p in live.topology.partitions}
    actions = {
        ControlOp.SHUTDOWN: supervisor.stop,
        ControlOp.STOP: supervisor.stop,
        ControlOp.START: supervisor.start,
        ControlOp.REBOOT: supervisor.restart,
        ControlOp.RESTART: supervisor.restart,
    }

    def lifecycle(pid: int, op: ControlOp) -> None:
        try:
            actions[op](names[pid], wait=False)
        except OsvmmError as err:  # e.g. a race with the control socket: logged, not fatal
            supervisor.log(f"{names[pid]}: hypercall {op.name}: {err}")

    def on_build(entry, partition) -> None:
        live.bind(entry.index, partition)

    def on_end(entry, partition) -> None:
        # Stopped outside the ABI (power-off, fault, the control socket): it loses
        # its channels, and doorbells to it answer -EBUSY until it boots again.
        live.partition_stopped(entry.index)

    live.lifecycle = lifecycle
    supervisor.on_build.append(on_build)
    supervisor.on_end.append(on_end)
    return live


def _complete_other(vcpu_thread, ex) -> None:
    """Anything but a 4-byte out on the hypercall port: ignored, an ``in`` reads ones."""
    if type(ex) is not IoOut:
        vcpu_thread.vcpu.complete_io_in(ex, b"\xff" * (ex.size * ex.count))
