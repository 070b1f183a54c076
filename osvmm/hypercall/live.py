"""The live side of the hypercall interface: the VMM applies what ``monitor.step`` says.

One ``LiveMonitor`` serves every partition of a VMM process. It reaches a
partition only through the small interface at the end of
``osvmm.vmm.partition.Partition`` (port hooks, an MMIO device, shared-memory
slots, MSIs, guest memory, the console). ``bind`` installs its handler on a
partition's hypercall port; a hypercall exit then runs, on that vCPU's own
thread:

    1. registers   a0..a3 from RDI, RSI, RBX, RCX (KVM sync regs in kvm_run
                   where the host has them: no ioctl), the call number from
                   the 4 bytes the ``out`` wrote (EAX)
    2. step        ``monitor.step`` on the shared state, under one lock (a
                   step that changes nothing and has no effect, such as a
                   refused call, needs none: see ``_sync_hook``)
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

Which channel is mapped where has one source of truth: the monitor state's
attachments. The memslots follow them (``Partition.map_shared``); with
``check=True`` they are compared after every step.

Lifecycle: the monitor's per-partition "running"/"stopped" is a one-way
projection of whoever runs the partitions (``osvmm up``'s supervisor), never a
second state machine: ``bind`` (a partition was built and is about to run:
booting, running) sets "running"; ``partition_stopped`` (its run ended:
stopped, backoff, failed) sets "stopped" and detaches everything it held.
Until its first ``bind`` a partition is "stopped" (a doorbell to it answers
-EBUSY).
"""

from __future__ import annotations

import ctypes
import mmap
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from osvmm.arch.x86 import layout
from osvmm.devices.channel_window import ChannelWindow
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
    StepResult,
    UnmapChannel,
    WriteGuest,
)
from osvmm.hypercall.spec import Spec
from osvmm.kvm.exits import IoIn

U64_MAX = abi.U64_MAX


def monitor_config(plan, machines) -> MonitorConfig:
    """The monitor's configuration from a plan (``osvmm.plan.config.Plan``) and each
    partition's Machine (name -> Machine): its RAM ranges bound what it may name."""
    parts = []
    for p in plan.partitions:
        machine = machines[p.name]
        parts.append(
            PartitionConfig(
                p.name, machine.ram_ranges, machine.vcpus, p.privileged, tuple(p.doorbells)
            )
        )
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


# The exit path's names: one global lookup each, no attribute.
_dispatch = monitor.dispatch
_HANDLERS_BY_NR = monitor.HANDLERS_BY_NR
_ESRCH = monitor.ESRCH


class Tally:
    """The hypercalls one writer counted: a vCPU's hook (its own tally, so it
    counts without a lock) or ``call`` (one per partition, under the monitor's
    lock). ``ok``: successes by call number (an exit's cheapest increment);
    ``failed``: (call number, -errno) -> calls."""

    __slots__ = ("pid", "ok", "failed")

    def __init__(self, pid: int):
        self.pid = pid
        self.ok = [0] * len(monitor.HANDLERS_BY_NR)
        self.failed: Counter = Counter()


@dataclass
class LiveStats:
    """What the hypercalls did. A call is counted once, in the tally of whoever
    ran it; the views below add the tallies up (each read as one copy, so a view
    taken while vCPUs count is never torn)."""

    window_writes: Counter = field(default_factory=Counter)  # partition id -> dropped writes
    # (partition id, vCPU index or None for ``call``) -> its Tally, kept across boots.
    tallies: dict[tuple, Tally] = field(default_factory=dict)

    def tally(self, pid: int, vcpu: int | None) -> Tally:
        """The tally of partition ``pid``'s vCPU ``vcpu`` (None: ``call``'s), made at
        its first use; a later boot's hook counts on in it (one writer at a time)."""
        t = self.tallies.get((pid, vcpu))
        if t is None:
            t = self.tallies[pid, vcpu] = Tally(pid)
        return t

    @property
    def by_partition(self) -> dict[tuple[int, int, int], int]:
        """(partition id, call number, result: 0 for any success, else the -errno) ->
        calls."""
        out: Counter = Counter()
        for t in list(self.tallies.values()):
            for nr, n in enumerate(list(t.ok)):
                if n:
                    out[t.pid, nr, 0] += n
            for (nr, result), n in list(t.failed.items()):
                out[t.pid, nr, result] += n
        return dict(out)

    @property
    def calls(self) -> Counter:
        """Call number -> calls made with it."""
        out: Counter = Counter()
        for (_, nr, _), n in self.by_partition.items():
            out[nr] += n
        return out

    @property
    def errors(self) -> Counter:
        """-errno -> calls that failed with it."""
        out: Counter = Counter()
        for (_, _, result), n in self.by_partition.items():
            if result < 0:
                out[result] += n
        return out


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
        a thread of its own, never a vCPU thread; whoever runs the partitions
        gives it: ``osvmm up``'s supervisor, or PartitionGroup). ``console(partition_id, data)``:
        where CONSOLE_WRITE output goes (default: the partition's console, each line
        prefixed with its name). ``check``: run the invariants after every step."""
        self.state = MonitorState.from_config(config)
        self.topology = self.state.topology
        self._spec = Spec(config)  # docs/hypercalls.md, for check=True
        self.lifecycle = lifecycle
        self.console = console
        self.check = check
        self.sync_regs = sync_regs
        self.lock = threading.Lock()
        self.channels = [ChannelMemory(c.name, c.size) for c in self.topology.channels]
        self.partitions: dict[int, object] = {}  # id -> the bound Partition
        self._windows: weakref.WeakSet = weakref.WeakSet()  # partitions with the window device
        self._prepared: dict[int, tuple] = {}  # id -> (Partition, its generation) prepared
        # Nothing is bound yet: every partition is "stopped" until its first bind.
        self.state = replace(self.state, lifecycle=(STOPPED,) * len(self.topology.partitions))
        self.stats = LiveStats()
        self._reader = self._read_guest
        self.violations: list[str] = []
        self._console_partial: dict[int, bool] = {}

    # -- partitions ------------------------------------------------------------
    def prepare(self, partition_id: int, partition) -> None:
        """Put on a built, not yet started ``Partition`` what serving its hypercalls
        needs (the port hook on its vCPU threads, sync regs, the channel window),
        telling no one it runs: a partition kept built for its next boot is
        prepared when it is kept, and its ``bind`` then has only to say it runs.
        What is put on its threads lasts until it is recycled (``generation``)."""
        self._install(partition_id, partition)
        self._prepared[partition_id] = (partition, partition.generation)

    def _install(self, partition_id: int, partition) -> None:
        use_sync = self.sync_regs and partition.vm.supports_sync_regs()
        if use_sync:  # one hook per vCPU: each counts in its own tally
            for vcpu in partition.vcpus:
                vcpu.sync.enable()
            partition.add_port_hooks(
                HYPERCALL_PORT,
                [self._sync_hook(partition_id, i) for i in range(len(partition.vcpus))],
            )
        else:
            partition.add_port_hook(HYPERCALL_PORT, self._ioctl_hook(partition_id))
        if partition not in self._windows:  # a partition bound again keeps its device
            counts = self.stats.window_writes
            partition.add_mmio_device(
                layout.CHANNEL_WINDOW_START,
                layout.CHANNEL_WINDOW_SIZE,
                ChannelWindow(lambda offset: counts.update((partition_id,))),
            )
            self._windows.add(partition)

    def bind(self, partition_id: int, partition) -> None:
        """Serve the hypercalls of a built, not yet started ``Partition`` (its first
        boot or a later one): it is "running", with no channel attached. Prepared
        here unless ``prepare`` did it since its last recycle."""
        if partition.shared_mappings():
            raise ValueError(f"partition {partition_id} already has shared memory mapped")
        ready = self._prepared.pop(partition_id, None)
        if ready is None or ready[0] is not partition or ready[1] != partition.generation:
            self._install(partition_id, partition)
        # Whatever an earlier boot held is gone (unmapped from it), in the same step.
        self._set_lifecycle(partition_id, RUNNING, bound=partition)

    def partition_stopped(self, partition_id: int) -> None:
        """The partition's run ended (power-off, fault, the supervisor): it loses its
        channels, and doorbells to it answer -EBUSY until it is bound again."""
        self._set_lifecycle(partition_id, STOPPED)
        self.partitions.pop(partition_id, None)

    def _set_lifecycle(self, pid: int, life: str, bound=None) -> None:
        """Partition ``pid`` is ``life`` now, with no channel attached (what it held is
        unmapped first); ``bound``: its Partition from then on (``bind``)."""
        with self.lock:
            state = self.state
            held = state.attached(pid) if state.attachments else ()
            for a in held:
                self._unmap(pid, self.topology.channels[a.channel].gpa)
            if bound is not None:
                self.partitions[pid] = bound
            if not held and state.lifecycle[pid] == life:
                return  # nothing to change (bind after partition_stopped)
            lifecycle = state.lifecycle[:pid] + (life,) + state.lifecycle[pid + 1 :]
            self.state = MonitorState(state.topology, lifecycle, state.attachments.difference(held))

    # -- the topology at run time (osvmm create, osvmm destroy) ------------------
    def grow(self, topology) -> None:
        """Adopt ``topology``: this one with partitions, channels and grants added
        (``monitor.extend_topology``). The new partitions are "stopped" until bound;
        a new channel's memory is made here, and its members (running ones too) may
        attach it from now on."""
        with self.lock:
            old = self.topology
            kept = [(p.id, p.name) for p in topology.partitions[: len(old.partitions)]]
            slots = [(c.id, c.gpa, c.size) for c in topology.channels[: len(old.channels)]]
            if kept != [(p.id, p.name) for p in old.partitions] or slots != [
                (c.id, c.gpa, c.size) for c in old.channels
            ]:
                raise ValueError("grow: the topology is not this one extended")
            made = [ChannelMemory(c.name, c.size) for c in topology.channels[len(old.channels) :]]
            added = len(topology.partitions) - len(old.partitions)
            self._adopt(topology, self.state.lifecycle + (STOPPED,) * added, self.state.attachments)
            self.channels.extend(made)

    def retire(self, partition_id: int) -> tuple[str, ...]:
        """Partition ``partition_id`` is destroyed (after its run ended): no grant names
        it any more, and every channel it was a member of is withdrawn: unmapped from
        every partition that has it attached (a survivor then reads all ones there, its
        writes dropped), then its memory freed. Returns the withdrawn channels' names."""
        from osvmm.hypercall.monitor import withdraw_partition

        self.partition_stopped(partition_id)
        self._prepared.pop(partition_id, None)
        with self.lock:
            topology, gone = withdraw_partition(self.topology, partition_id)
            held = frozenset(a for a in self.state.attachments if a.channel in gone)
            for a in held:  # the memslots go before the memory they map
                self._unmap(a.partition, self.topology.channels[a.channel].gpa)
            self._adopt(topology, self.state.lifecycle, self.state.attachments - held)
            names = tuple(self.channels[c].name for c in gone)
            for c in gone:
                self.channels[c].close()
        return names

    def _adopt(self, topology, lifecycle, attachments) -> None:
        """The state and topology from now on (under the lock)."""
        self.state = MonitorState(topology, tuple(lifecycle), frozenset(attachments))
        self.topology = topology
        if self.check:
            from osvmm.hypercall.monitor import config_of

            self._spec = Spec(config_of(topology))

    # -- the exit handlers -----------------------------------------------------
    # A hook runs on the vCPU loop's fast path for every single 2- or 4-byte access
    # to the hypercall port (osvmm/vmm/vcpu.py): ``hook(vcpu, direction, size,
    # data_offset)``. The call number is EAX, the value the ``out`` wrote.
    def _sync_hook(self, pid: int, vcpu_index: int = 0):
        """The hook of one vCPU of a partition whose KVM keeps its registers in
        kvm_run: registers in one unpack, RAX back in one pack. A call of the ABI is
        ``call`` inlined: ``monitor.dispatch``'s checks (the caller is ``pid``, bound
        and valid: only its lifecycle is asked) and the handler from the table by
        index, counted once in this vCPU's own tally.

        The step runs on the state as the hook reads it (one reference to an
        immutable MonitorState). A step that leaves that state as it was and has no
        effect -- every refused call, a console write of nothing -- is then done:
        it took effect at that read, and needs no lock. One that changes the state
        or has effects takes the monitor's lock; should another call have changed
        the state since the read, the step is taken again on the state now (the
        handlers are pure functions of it), and the state and effects are applied
        under the lock, as ``call`` does. After a nested exit every Python frame,
        attribute and lock runs with cold caches and TLBs: they, not KVM's loading
        of the dirty registers (about 3%), are what a hypercall costs over a bare
        exit (bench/hypercall.py). Anything else (a number outside the ABI, the
        live invariant checks) goes through ``call``."""
        call = self.call
        lock = self.lock
        tally = self.stats.tally(pid, vcpu_index)
        ok, failed = tally.ok, tally.failed
        reader = self._reader
        handlers = _HANDLERS_BY_NR
        # Every call goes through ``call`` when the live checks are on (``check``,
        # fixed at construction): no call number is below 0.
        known = 0 if self.check else len(handlers)
        running, esrch, u64 = RUNNING, -_ESRCH, U64_MAX  # locals: no global look-ups

        def hook(vcpu, direction, size, data_offset) -> None:
            if not direction or size != 4:
                _complete_other(vcpu, direction, size, data_offset)
                return
            sync = vcpu.sync
            rax, rbx, rcx, _, rsi, rdi = sync.first()
            nr = rax & 0xFFFFFFFF
            if nr >= known:
                sync.return_rax(call(pid, nr, (rdi, rsi, rbx, rcx)) & u64)
                return
            state = self.state
            if state.lifecycle[pid] != running:
                result = esrch
            else:
                args = (rdi, rsi, rbx, rcx)
                new, result, effects = handlers[nr](state, pid, args, reader)
                if new is not state or effects:
                    with lock:
                        if self.state is not state:  # changed since: the step on it now
                            state = self.state
                            if state.lifecycle[pid] != running:
                                new, result, effects = state, esrch, ()
                            else:
                                new, result, effects = handlers[nr](state, pid, args, reader)
                        self.state = new
                        later = self._apply(effects) if effects else ()
                    for effect in later:
                        self._lifecycle(pid, effect)
            if result < 0:
                failed[nr, result] += 1
            else:
                ok[nr] += 1
            sync.return_rax(result & u64)

        return hook

    def _ioctl_hook(self, pid: int):
        call = self.call

        def hook(vcpu, direction, size, data_offset) -> None:
            if not direction or size != 4:
                _complete_other(vcpu, direction, size, data_offset)
                return
            regs = vcpu.get_regs()
            nr = regs.rax & 0xFFFFFFFF
            regs.rax = call(pid, nr, (regs.rdi, regs.rsi, regs.rbx, regs.rcx)) & U64_MAX
            vcpu.set_regs(regs)

        return hook

    # -- one call ----------------------------------------------------------------
    def call(self, pid: int, nr: int, args: tuple[int, ...]) -> int:
        """Run one hypercall of partition ``pid`` and apply its effects; its result.
        ``args``: a0..a3, four unsigned 64-bit integers (as the hooks unpack them:
        ``monitor.dispatch`` takes them unchecked)."""
        with self.lock:
            src = self.state
            state, result, effects = _dispatch(src, pid, nr, args, self._reader)
            self.state = state
            tally = self.stats.tally(pid, None)
            if result < 0:
                tally.failed[nr, result] += 1
            else:
                tally.ok[nr] += 1
            if not effects and not self.check:
                return result
            later = self._apply(effects) if effects else ()
            if self.check:
                self._check(src, pid, nr, args, StepResult(state, result, effects))
        for effect in later:
            self._lifecycle(pid, effect)
        return result

    def _apply(self, effects) -> tuple[PartitionLifecycle, ...]:
        later = []
        for e in effects:
            kind = type(e)
            if kind is RaiseInterrupt:
                target = self.partitions.get(e.partition)
                if target is not None and target.running:
                    target.raise_msi(e.vcpu, e.vector)
            elif kind is ConsoleWrite:
                self._console(e.partition, e.data or b"")
            elif kind is WriteGuest:
                self.partitions[e.partition].write_guest(e.gpa, e.data)
            elif kind is MapChannel:
                chan = self.channels[e.channel]
                self.partitions[e.partition].map_shared(e.gpa, e.size, chan.host_addr, e.writable)
            elif kind is UnmapChannel:
                self._unmap(e.partition, e.gpa)
            elif kind is PartitionLifecycle:
                later.append(e)
        return tuple(later)

    def _unmap(self, pid: int, gpa: int) -> None:
        part = self.partitions.get(pid)
        if part is not None and gpa in part.shared_mappings():
            part.unmap_shared(gpa)

    def _read_guest(self, pid: int, gpa: int, length: int) -> bytes:
        return self.partitions[pid].read_guest(gpa, length)

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
        part.console_write(bytes(out))

    def _lifecycle(self, caller: int, e: PartitionLifecycle) -> None:
        if self.lifecycle is not None:
            threading.Thread(
                target=self.lifecycle, args=(e.partition, e.op), name="hc-lifecycle", daemon=True
            ).start()

    # -- live invariants -----------------------------------------------------------
    def _check(self, src: MonitorState, pid: int, nr: int, args, res) -> None:
        try:
            msg = checker.check_transition(self.topology, src, pid, nr, tuple(args), res)
            if msg is None:
                msg = checker.spec_mismatch(self._spec, src, pid, nr, tuple(args), res)
        except Exception as err:  # noqa: BLE001 - recorded, the VMM goes on
            msg = f"checker raised {err!r}"
        if msg is None:
            msg = self.memslot_mismatch()
        if msg is not None:
            self.violations.append(f"{abi.BY_NUMBER.get(nr, nr)} by {pid}: {msg}")

    def memslot_mismatch(self) -> str | None:
        """None when every bound partition's shared memslots are exactly its attachments."""
        chans = self.topology.channels
        for pid, part in self.partitions.items():
            if not part.running:
                continue
            want = {chans[a.channel].gpa: chans[a.channel].size for a in self.state.attached(pid)}
            have = part.shared_mappings()
            if have != want:
                return f"partition {pid} memslots {have} != attached channels {want}"
        return None

    def close(self) -> None:
        for mem in self.channels:
            mem.close()


def _complete_other(vcpu, direction: int, size: int, data_offset: int) -> None:
    """Anything but a 4-byte out on the hypercall port: ignored, an ``in`` reads ones."""
    if not direction:
        vcpu.complete_io_in(IoIn(HYPERCALL_PORT, size, 1, data_offset), b"\xff" * size)
