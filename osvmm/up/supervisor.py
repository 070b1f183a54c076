"""The supervisor: every partition of a plan in one VMM process.

``Supervisor(assignment)`` holds one ``PartitionEntry`` per partition of the
plan, in ``Supervisor.partitions`` (name -> entry: its plan ``spec``, its
``index`` in the plan, its ``placement``, and ``partition``, the running
``Partition`` or None). Each entry has a thread for the life of the
supervisor that boots the partition, waits for it to end and applies the
restart policy. The states of an entry (terminal ones need a user's start):

    stopped* --start--> booting --built--> running --guest ends--> (policy)
                                    |                  --stop-----> stopped*
                         build fails: (policy)
    (policy): restart = "restart" and fewer than restart_limit restarts:
                  backoff (restart_backoff_ms, doubled each time) --> booting
              otherwise: stopped* (ended by itself) or failed* (it faulted)

A stopped partition is kept built (``PartitionEntry.ready``): when a run
ends, its Partition is recycled (osvmm/vmm/partition.py ``recycle``: memory
zeroed and the image written again, vCPUs, LAPICs, I/O APIC, PICs, PIT and
kvmclock put back as captured before its first run, devices new, the vCPU
threads made and held), so the next start or restart only lets the vCPUs go;
nothing of the old run survives. A user's start of a kept partition lets them go
on the caller's thread (``_launch_kept``), without waiting for the entry's
thread to wake: that thread then only waits for the run to end. A run that
ended in a VMM bug or a KVM error, a recycle that fails, and boot inputs
changed on disk since the build (``inputs_changed``) give a fresh build
instead. A guest's own reset request
reboots it at once whatever the policy (as hardware would), without counting
against the limit. ``start``/``restart`` by a user reset the restart count.
Every end is logged with its reason, to the event log (stderr in the
foreground and ``osvmm.log`` in the log directory) and into the entry.

Each partition's console is a ``ConsoleHub`` (osvmm/up/consoles.py): its log
file ``<log_dir>/<name>.console.log``, attached clients, and ``echo``.

``describe`` and ``stats`` (what ``ps`` and ``stat`` show) stay here as two
small read-only methods: a consistent view needs the supervisor's lock, and
that lock is this module's business; the control server (osvmm/up/server.py)
only calls them.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from osvmm.errors import KvmError, NoSuchPartition, OsvmmError, VmmBug, WrongState
from osvmm.machine import Machine
from osvmm.plan.config import DEFAULT_LOG_MAX, PartitionSpec
from osvmm.plan.placement import Assignment, PartitionAssignment
from osvmm.up.consoles import LOG_SPOOL, ConsoleHub, LogFile, Spool
from osvmm.up.hostfiles import private_dir
from osvmm.up.partition_config import machine_of, partition_config
from osvmm.vmm.partition import Partition, PartitionConfig
from osvmm.vmm.switch_port import build_networks

STOPPED, BOOTING, RUNNING, BACKOFF, FAILED = "stopped", "booting", "running", "backoff", "failed"
MAX_BACKOFF_MS = 300_000  # a restart waits at most 5 minutes, however large the plan's backoff


def backoff_ms(base_ms: int, restarts: int) -> int:
    """The wait before restart ``restarts + 1``: ``base_ms`` doubled per restart before
    it, at most MAX_BACKOFF_MS (docs/partitions.md)."""
    base = min(max(int(base_ms), 0), MAX_BACKOFF_MS)
    return min(base << min(restarts, 32), MAX_BACKOFF_MS)


# -- partitions ----------------------------------------------------------------------------------


class StartGate:
    """Partitions built first and then run all together, or none (a takeover: none
    may touch memory it shares with the old VMM unless every one of them can run).
    Each boot ``arrive``s once built (or failed); the one who made the gate waits
    with ``wait_all``, then ``decide``s; the boots go on or stop accordingly."""

    def __init__(self, count: int):
        self.count = count
        self._cond = threading.Condition()
        self.built = 0
        self.failures: list[str] = []
        self.go: bool | None = None

    def arrive(self, ok: bool, reason: str = "") -> None:
        with self._cond:
            if ok:
                self.built += 1
            else:
                self.failures.append(reason)
            self._cond.notify_all()

    def wait_all(self, timeout: float = 60) -> str | None:
        """None once every partition is built; else the first failure."""
        with self._cond:
            done = self._cond.wait_for(lambda: self.failures or self.built == self.count, timeout)
            if self.failures:
                return self.failures[0]
            return None if done else f"not built within {timeout:.0f} s"

    def settle(self, timeout: float = 60) -> None:
        """Wait until every boot has arrived, built or failed."""
        with self._cond:
            self._cond.wait_for(lambda: self.built + len(self.failures) >= self.count, timeout)

    def decide(self, go: bool) -> None:
        with self._cond:
            self.go = go
            self._cond.notify_all()

    def wait_decision(self) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self.go is not None)
            return self.go


@dataclass
class PartitionEntry:
    """One partition of the plan and what the supervisor knows of it."""

    spec: PartitionSpec
    index: int  # its index in the plan (the hypercall ABI's partition id)
    placement: PartitionAssignment
    machine: Machine  # derived once (partition_config.machine_of); every boot reads it
    console: ConsoleHub
    partition: Partition | None = None  # the running one (None when stopped)
    ready: Partition | None = None  # kept built for the next boot (the entry's thread's)
    state: str = STOPPED
    reason: str = ""  # why the last run ended (or the build failed)
    restarts: int = 0  # automatic restarts since a user last started it
    boots: int = 0  # runs started since the supervisor started
    started_at: float | None = None
    last_stats: list[dict] = field(default_factory=list)  # exit_stats() at the last end
    last_unclaimed: dict = field(default_factory=dict)
    last_devices: list[dict] = field(default_factory=list)  # device_stats() at the last end
    # wishes of users, read by the entry's thread under Supervisor._cond
    want_running: bool = False
    user_stop: bool = False
    user_restart: bool = False
    restore_next: object = None  # a snapshot the next boot resumes (a migration's)
    gate: StartGate | None = None  # the next boot waits there once built (a takeover)
    thread: threading.Thread | None = None
    # a start on the caller's thread (Supervisor._launch_kept): the kept partition
    # being readied there (the entry's thread leaves it alone), then started
    launching: bool = False
    launched: Partition | None = None
    removing: bool = False  # being destroyed (osvmm destroy): its thread ends

    @property
    def name(self) -> str:
        return self.spec.name


class Supervisor:
    """Runs the partitions of ``assignment`` in this process."""

    def __init__(
        self,
        assignment: Assignment,
        log_dir: str | None = None,
        echo: Callable[[str, bytes], None] | None = None,
        event_log: Callable[[str], None] | None = None,
        kvm=None,
        log_max: int = DEFAULT_LOG_MAX,
    ):
        from osvmm.kvm import Kvm
        from osvmm.vmm.vcpu import install_kick_handler

        install_kick_handler()  # from the main thread: vCPU threads are kicked by a signal
        self.assignment = assignment
        self.plan = assignment.plan
        self.log_dir = log_dir
        self._event_sink = event_log
        self._echo = echo
        self._log_max = log_max
        self._files: list[LogFile] = []
        self.streams: dict[str, Spool] = {}  # the VMM's stdout and stderr, set by its runner
        self._log_dir_fd: int | None = None
        self._events: Spool | None = None
        if log_dir is not None:
            self._log_dir_fd = private_dir(log_dir, "log_dir")
            try:
                events = self._log_file("osvmm.log", log_max)
                # its own failures can only go to stderr
                self._events = Spool("osvmm.log", events.write, LOG_SPOOL, self._to_sink)
                consoles = {
                    p.name: self._log_file(f"{p.name}.console.log", log_max)
                    for p in assignment.partitions
                }
            except OsvmmError:
                self._close_files()
                raise
        else:
            consoles = {}
        self.kvm = kvm or Kvm()
        self._own_kvm = kvm is None
        self._cond = threading.Condition()
        self._closing = False
        # Called with (entry, partition) after each build, before its vCPUs start:
        # where the hypercall runtime maps channels and adds its port hooks.
        self.on_build: list[Callable[[PartitionEntry, Partition], None]] = []
        # Called with (entry, partition) on the entry's thread when a partition is
        # kept built for its next boot (recycled): the part of an ``on_build`` hook
        # that tells no one it boots (handlers put on its new vCPU threads) done
        # ahead, so that the start of a kept partition has less to do. A failure
        # leaves the partition not kept.
        self.on_ready: list[Callable[[PartitionEntry, Partition], None]] = []
        # Run when a partition's run has ended, before its Partition is closed.
        self.on_end: list[Callable[[PartitionEntry, Partition], None]] = []
        self.partitions: dict[str, PartitionEntry] = {}
        # One switch per plan network, a port per member (members order), for the
        # supervisor's lifetime: a partition that restarts is back on its port.
        self.networks = build_networks(self.plan.networks)
        # The index of the next partition created at run time: never one used before
        # (the hypercall monitor knows the plan's partitions by their index).
        self.next_index = len(assignment.partitions)
        for index, placement in enumerate(assignment.partitions):
            name = placement.name
            self.partitions[name] = PartitionEntry(
                spec=placement.spec,
                index=index,
                placement=placement,
                machine=machine_of(assignment, placement),
                console=ConsoleHub(name, consoles.get(name), echo, self.log),
            )

    # -- the event log ---------------------------------------------------------------
    def _log_file(self, name: str, log_max: int) -> LogFile:
        path = os.path.join(self.log_dir, name)
        f = LogFile(self._log_dir_fd, name, path, log_max)
        self._files.append(f)
        return f

    def log(self, text: str) -> None:
        """An event to osvmm.log (with a timestamp) and to the event sink; never
        blocks on either, never raises."""
        self.log_file_only(text)
        self._to_sink(text)

    def _to_sink(self, text: str) -> None:
        if self._event_sink is not None:
            try:
                self._event_sink(text)
            except Exception:  # noqa: BLE001, S110 - the event sink must not fail a caller
                pass

    def log_file_only(self, text: str) -> None:
        """An event for osvmm.log alone (a failure of the event sink itself)."""
        if self._events is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self._events.put(f"{stamp} {text}\n".encode("utf-8", "replace"))

    def flush_logs(self, timeout: float = 5.0) -> None:
        """Wait until osvmm.log and the console logs hold every line logged so far
        (they are written by threads of their own)."""
        if self._events is not None:
            self._events.flush(timeout)
        for e in self.partitions.values():
            e.console.flush(timeout)

    def losses(self) -> dict:
        """What ``ps`` shows of the VMM's own outputs (osvmm.log and the ``streams``,
        stdout and stderr): bytes each missed and its last error."""
        spools = {"osvmm.log": self._events, **self.streams}
        return {
            name: {"missing": sp.missing, "error": sp.error}
            for name, sp in spools.items()
            if sp is not None
        }

    def _close_files(self) -> None:
        if self._events is not None:
            self._events.close()
        for f in self._files:
            f.close()
        if self._log_dir_fd is not None:
            os.close(self._log_dir_fd)
            self._log_dir_fd = None

    # -- lifecycle (control socket and lifecycle hypercall) ------------------------------
    def entry(self, name: str) -> PartitionEntry:
        try:
            return self.partitions[name]
        except KeyError:
            known = ", ".join(self.partitions)
            raise NoSuchPartition(f"no partition named {name!r} (partitions: {known})") from None

    def start_all(self) -> None:
        for name in self.partitions:
            self.start(name, wait=False)

    def start(
        self, name: str, wait: bool = True, timeout: float = 30, restore=None, gate=None
    ) -> str:
        """Boot a stopped partition; returns its state (running, or why not).
        ``restore``: resume this snapshot (a vmm.snapshot.Snapshot, or what a
        migration delivered) instead of booting, this once. ``gate``: a StartGate
        the built partition waits at before it runs."""
        entry = self.entry(name)
        with self._cond:
            if entry.want_running:
                raise WrongState(f"partition {name!r} is already {entry.state}")
            parked = entry.state in (STOPPED, FAILED) and entry.thread is not None
            entry.restore_next = restore
            entry.gate = gate
            entry.want_running = True
            entry.restarts = 0
            entry.state = BOOTING
            kept = None
            if parked and restore is None and gate is None and not self._closing:
                kept = self._take_ready(entry)
                entry.launching = kept is not None
            self._ensure_thread(entry)
            if kept is None:  # else _launch_kept tells, once it ran
                self._cond.notify_all()
        if kept is not None:
            self._launch_kept(entry, kept)
        with self._cond:
            if wait:
                self._cond.wait_for(lambda: entry.state in (RUNNING, STOPPED, FAILED), timeout)
            return entry.state

    def _launch_kept(self, entry: PartitionEntry, part: Partition) -> None:
        """Start a kept partition on the caller's thread: the build hooks, then the
        vCPUs let go. The entry's thread, parked meanwhile (``entry.launching``), then
        only waits for the run. Should a hook fail, or a stop come first, the
        partition goes back to ``entry.ready`` and the entry's thread does what it
        does for any boot (it runs the hooks again and reports their failure)."""
        try:
            for hook in self.on_build:
                hook(entry, part)
            hooked = True
        except Exception:  # noqa: BLE001 - reported by the entry's thread, which retries
            hooked = False
        with self._cond:
            entry.launching = False
            if hooked and entry.want_running and not self._closing and not entry.removing:
                entry.user_stop = entry.user_restart = False
                self._run_now(entry, part)
                entry.launched = part
            elif self._closing or entry.removing:
                part.close()
            else:
                entry.ready = part
                if not entry.want_running:  # stopped before it ran
                    entry.state = STOPPED
            self._cond.notify_all()

    def _run_now(self, entry: PartitionEntry, part: Partition) -> None:
        """Let ``part`` go as the entry's running partition (``_cond`` held)."""
        entry.partition = part
        entry.boots += 1
        entry.started_at = time.monotonic()
        part.start()
        entry.state = RUNNING

    def stop(
        self, name: str, wait: bool = True, timeout: float = 30, reason: str = "stopped by the VMM"
    ) -> str:
        """Stop a partition (a running one, or one waiting to be restarted)."""
        entry = self.entry(name)
        with self._cond:
            if not entry.want_running:
                raise WrongState(f"partition {name!r} is not running ({entry.state})")
            entry.want_running = False
            entry.user_stop = True
            part = entry.partition
            self._cond.notify_all()
        if part is not None:
            part.stop(0, reason)
        with self._cond:
            if wait:
                self._cond.wait_for(lambda: entry.state in (STOPPED, FAILED), timeout)
            return entry.state

    def wait_running(self, name: str, timeout: float = 30) -> str:
        """Wait until a booting partition runs (or stopped, or failed); its state."""
        entry = self.entry(name)
        with self._cond:
            self._cond.wait_for(lambda: entry.state in (RUNNING, STOPPED, FAILED), timeout)
            return entry.state

    def wait_stopped(self, name: str, timeout: float = 30) -> str:
        """Wait until a stopping partition is stopped (or failed); its state."""
        entry = self.entry(name)
        with self._cond:
            self._cond.wait_for(lambda: entry.state in (STOPPED, FAILED), timeout)
            return entry.state

    def restart(self, name: str, wait: bool = True, timeout: float = 30) -> str:
        """Stop (if running) and boot a fresh partition of the same spec."""
        entry = self.entry(name)
        with self._cond:
            if not entry.want_running:
                part = None
            else:
                entry.user_restart = True
                entry.restarts = 0
                part = entry.partition
                self._cond.notify_all()
        if part is None and not entry.user_restart:
            return self.start(name, wait, timeout)
        if part is not None:
            part.stop(0, "restarted by the VMM")
        with self._cond:
            if wait:
                self._cond.wait_for(
                    lambda: not entry.user_restart and entry.state in (RUNNING, STOPPED, FAILED),
                    timeout,
                )
            return entry.state

    def close(self, timeout: float = 10) -> None:
        """Stop every partition and end the entries' threads."""
        with self._cond:
            self._closing = True
            for e in self.partitions.values():
                e.want_running = False
            parts = [e.partition for e in self.partitions.values() if e.partition]
            self._cond.notify_all()
        for part in parts:
            part.stop(0, "the VMM is shutting down")
        for e in self.partitions.values():
            if e.thread is not None:
                e.thread.join(timeout)
            if e.ready is not None and (e.thread is None or not e.thread.is_alive()):
                e.ready.close()
                e.ready = None
            e.console.close()
        for network in self.networks.values():
            network.close()
        if self._own_kvm:
            self.kvm.close()
        self._close_files()

    # -- partitions created and destroyed at run time (osvmm create, destroy) ------------------
    def add(self, assignment: Assignment, names: list[str]) -> list[PartitionEntry]:
        """Adopt ``assignment`` (every partition placed as before, and ``names`` added)
        and make a stopped entry for each of ``names``, its console logged."""
        made = []
        try:
            for name in names:
                placement = assignment.partition(name)
                log = None
                if self._log_dir_fd is not None:
                    log = self._log_file(f"{name}.console.log", self._log_max)
                made.append(
                    PartitionEntry(
                        spec=placement.spec,
                        index=self.next_index + len(made),
                        placement=placement,
                        machine=machine_of(assignment, placement),
                        console=ConsoleHub(name, log, self._echo, self.log),
                    )
                )
        except BaseException:
            for e in made:
                self._close_console(e)
            raise
        with self._cond:
            if self._closing:
                raise WrongState("the VMM is shutting down")
            self.next_index += len(made)
            self.assignment, self.plan = assignment, assignment.plan
            for e in made:
                self.partitions[e.name] = e
            self._cond.notify_all()
        self.repin_floating()
        return made

    def remove(self, name: str, timeout: float = 30) -> PartitionEntry:
        """Stop partition ``name`` if it runs, end its thread, close what it holds and
        forget it: its dedicated CPUs go back to the pool, its memory to the host."""
        entry = self.entry(name)
        with self._cond:
            if entry.removing:
                raise WrongState(f"partition {name!r} is being destroyed already")
            entry.removing = True
            entry.want_running = False
            entry.user_stop = True
            part = entry.partition
            self._cond.notify_all()
        if part is not None:
            part.stop(0, "destroyed")
        if entry.thread is not None:
            entry.thread.join(timeout)
            if entry.thread.is_alive():
                raise VmmBug(f"partition {name!r}: its thread did not end within {timeout:.0f} s")
        if entry.ready is not None:
            entry.ready.close()
            entry.ready = None
        self._close_console(entry)
        with self._cond:
            del self.partitions[name]
            kept = tuple(p for p in self.assignment.partitions if p.name != name)
            plan = dataclasses.replace(
                self.plan,
                partitions=tuple(p.spec for p in kept),
                channels=tuple(c for c in self.plan.channels if c.mode(name) is None),
            )
            pool = tuple(sorted({*self.assignment.pool, *entry.placement.cpus}))
            self.assignment = dataclasses.replace(
                self.assignment, plan=plan, partitions=kept, pool=pool
            )
            self.plan = plan
            self._cond.notify_all()
        self.repin_floating()
        self.log(f"{name}: destroyed")
        return entry

    def _close_console(self, entry: PartitionEntry) -> None:
        entry.console.close()  # its log file too
        if entry.console.log in self._files:
            self._files.remove(entry.console.log)

    def repin_floating(self) -> None:
        """The vCPU threads of running floating partitions, allowed on the pool as it
        is now (a partition created or destroyed took CPUs from it or gave some back)."""
        pool = set(self.assignment.pool)
        if not pool:
            return
        with self._cond:
            parts = [
                e.partition
                for e in self.partitions.values()
                if e.partition and not e.placement.cpus
            ]
        for part in parts:
            for tid in part.vcpu_tids():
                try:
                    os.sched_setaffinity(tid, pool)
                except OSError:  # the thread ended meanwhile
                    pass

    # -- a reload (SIGHUP of a detached VMM or a service) ----------------------------------
    RELOADABLE = ("restart", "restart_limit", "restart_backoff_ms")

    def reload(self, plan) -> list[str]:
        """Apply what can change while the partitions run, from ``plan`` (the plan file
        read again): each partition's restart policy, the logs' size (every log file
        opened afresh: one rotated by another program is followed). Returns a note
        for each change made and each one that needs more than a reload."""
        notes = []
        new = {spec.name: spec for spec in plan.partitions}
        with self._cond:
            for name, entry in self.partitions.items():
                spec = new.get(name)
                if spec is None:
                    notes.append(
                        f"{name}: not in the plan now; it runs on (osvmm destroy removes it)"
                    )
                    continue
                old = entry.spec
                changes = {
                    k: getattr(spec, k)
                    for k in self.RELOADABLE
                    if getattr(spec, k) != getattr(old, k)
                }
                others = [
                    f.name
                    for f in dataclasses.fields(spec)
                    if f.name not in self.RELOADABLE
                    and getattr(spec, f.name) != getattr(old, f.name)
                ]
                if changes:
                    entry.spec = dataclasses.replace(old, **changes)
                    notes.append(
                        f"{name}: " + ", ".join(f"{k} = {v!r}" for k, v in changes.items())
                    )
                if others:
                    notes.append(
                        f"{name}: {', '.join(others)} changed: not applied (destroy and create "
                        "it, or start a new VMM)"
                    )
            for name in new:
                if name not in self.partitions:
                    notes.append(f"{name}: new in the plan: not started (osvmm create adds it)")
        log_max = plan.vmm.console_log_max
        if log_max != self._log_max:
            notes.append(f"console_log_max = {log_max}")
            self._log_max = log_max
        for f in list(self._files):
            f.max_bytes = log_max
            f.reopen()
        return notes

    # -- what the control socket shows ---------------------------------------------------------
    def describe(self, entry: PartitionEntry) -> dict:
        """What ``ps`` shows of one partition (under the lock: a partition is closed
        only after it left ``entry.partition``, so one seen here is whole)."""
        with self._cond:
            return self._describe(entry)

    def _describe(self, entry: PartitionEntry) -> dict:
        from osvmm.plan.config import format_cpu_list

        p, spec = entry.placement, entry.spec
        part = entry.partition
        return {
            "name": entry.name,
            "index": entry.index,
            "state": entry.state,
            "cpus": format_cpu_list(p.cpus) if p.cpus else "floating",
            "pool": format_cpu_list(self.assignment.pool),
            "vcpus": p.vcpus,
            "node": p.node,
            "memory": spec.memory,
            "boot": spec.image or spec.kernel,
            "restart": spec.restart,
            "restarts": entry.restarts,
            "boots": entry.boots,
            "reason": entry.reason,
            "uptime_s": round(time.monotonic() - entry.started_at, 3)
            if entry.started_at is not None and entry.state == RUNNING
            else None,
            "tids": part.vcpu_tids() if part is not None else [],
            "enforcement": list(part.enforcement) if part is not None else [],
            "memory_host_addrs": [r.host_addr for r in part.memory.regions]
            if part is not None and part.memory is not None
            else [],
            "console_log": entry.console.log_path,
            "console_lost": self._console_lost(entry),
        }

    def _console_lost(self, entry: PartitionEntry) -> dict:
        """Console bytes a sink missed: the log (slow disk or write errors, and its
        last error), stdout (a slow or absent reader), attached clients (not reading)."""
        lost = entry.console.losses()
        dropped = getattr(self._echo, "dropped", None)
        lost["stdout"] = dropped(entry.name) if dropped is not None else 0
        return lost

    def stats(self, entry: PartitionEntry) -> dict:
        """Exit statistics: live while running, else those of the last run."""
        with self._cond:
            part = entry.partition if entry.state == RUNNING else None
            if part is not None:
                try:
                    return {
                        "name": entry.name,
                        "live": True,
                        "vcpus": part.exit_stats(),
                        "unclaimed_ports": dict(part.pio.unclaimed),
                        "devices": part.device_stats(),
                    }
                except (OSError, ValueError, OsvmmError):
                    pass
            return {
                "name": entry.name,
                "live": False,
                "vcpus": entry.last_stats,
                "unclaimed_ports": entry.last_unclaimed,
                "devices": entry.last_devices,
            }

    # -- the entry's thread -----------------------------------------------------------------------
    def _ensure_thread(self, entry: PartitionEntry) -> None:
        if entry.thread is None:
            entry.thread = threading.Thread(
                target=self._run_entry, args=(entry,), name=f"sup-{entry.name}", daemon=True
            )
            entry.thread.start()

    def _set_state(self, entry: PartitionEntry, state: str) -> None:
        with self._cond:
            entry.state = state
            self._cond.notify_all()

    def _run_entry(self, entry: PartitionEntry) -> None:
        """The entry's thread: it never dies on an exception; a VMM bug fails the
        partition (logged with its traceback) and the thread waits for a start."""
        while not self._closing:
            try:
                self._run_entry_loop(entry)
                return
            except BaseException as err:  # noqa: BLE001 - not even SystemExit ends it
                bug = VmmBug.from_exception(f"supervising {entry.name}", err)
                with self._cond:
                    part, entry.partition = entry.partition, None
                    kept, entry.ready = entry.ready, None
                self._discard(part)
                self._discard(kept)
                with self._cond:
                    entry.want_running = False
                    entry.user_stop = entry.user_restart = False
                    entry.state = FAILED
                    entry.reason = str(bug)
                    self._cond.notify_all()
                self.log(f"{entry.name}: {bug}")
                self.log(bug.traceback_text.rstrip("\n"))

    def _discard(self, part: Partition | None) -> None:
        """A partition left behind by a bug: stopped and closed, whatever it raises."""
        if part is None:
            return
        for step in (lambda: part.stop(0, "the VMM failed"), part.wait, part.close):
            try:
                step()
            except Exception:  # noqa: BLE001, S110 - best effort after a bug
                pass

    def _run_entry_loop(self, entry: PartitionEntry) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        (entry.want_running and not entry.launching)
                        or entry.launched is not None
                        or self._closing
                        or entry.removing
                    )
                )
                launched, entry.launched = entry.launched, None
                if launched is None:
                    if self._closing or entry.removing:
                        return
                    entry.user_stop = entry.user_restart = False
            result_reason, faulted, reset = self._boot_and_run(entry, launched)
            entry.reason = result_reason
            with self._cond:
                if self._closing:
                    entry.state = STOPPED
                    self._cond.notify_all()
                    return
                if entry.user_restart:
                    self.log(f"{entry.name}: restarting (by request)")
                    continue
                if entry.user_stop or not entry.want_running:
                    entry.state = STOPPED
                    self._cond.notify_all()
                    continue
            if reset:
                self.log(f"{entry.name}: the guest reset the machine: rebooting it")
                continue
            self._apply_policy(entry, faulted)

    def _apply_policy(self, entry: PartitionEntry, faulted: bool) -> None:
        spec = entry.spec
        with self._cond:
            if spec.restart != "restart" or entry.restarts >= spec.restart_limit:
                why = (
                    "policy stop"
                    if spec.restart != "restart"
                    else f"restart limit {spec.restart_limit} reached"
                )
                entry.want_running = False
                entry.state = FAILED if faulted else STOPPED
                self._cond.notify_all()
                self.log(f"{entry.name}: {entry.state} ({why})")
                entry.console.note(f"{entry.state}: {why}")
                return
            delay = backoff_ms(spec.restart_backoff_ms, entry.restarts) / 1000
            entry.restarts += 1
            entry.state = BACKOFF
            self._cond.notify_all()
            count = f"{entry.restarts}/{spec.restart_limit}"
            self.log(f"{entry.name}: restart {count} in {delay * 1000:.0f} ms")
            deadline = time.monotonic() + delay
            while entry.want_running and not self._closing and not entry.user_restart:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if not entry.want_running or self._closing:
                entry.state = STOPPED
                self._cond.notify_all()

    def _boot_and_run(
        self, entry: PartitionEntry, launched: Partition | None = None
    ) -> tuple[str, bool, bool]:
        """Build, start and wait for one run (``launched``: one started already by
        ``_launch_kept``); returns (reason, faulted, reset)."""
        if launched is not None:
            return self._run_to_end(entry, launched, run_now=True)
        if entry.state != BOOTING:  # start() has set it already: no one to wake
            self._set_state(entry, BOOTING)
        gate, entry.gate = entry.gate, None
        part = self._take_ready(entry)
        try:
            if part is None:
                part = Partition(self._config(entry), kvm=self.kvm)
                part.build()
            for hook in self.on_build:
                hook(entry, part)
        except Exception as err:  # noqa: BLE001 - any failure ends this boot, never the thread
            if not isinstance(err, OsvmmError):
                err = VmmBug.from_exception(f"building {entry.name}", err)
            if part is not None:
                part.close()
            reason = f"cannot boot: {err}"
            if gate is not None:  # an arrival that failed stays stopped: no policy
                with self._cond:
                    entry.want_running = False
                gate.arrive(False, f"{entry.name}: {reason}")
            self.log(f"{entry.name}: {reason}")
            if isinstance(err, VmmBug):
                self.log(err.traceback_text.rstrip("\n"))
            entry.console.note(reason)
            return reason, True, False
        cancelled = False
        if gate is not None:
            gate.arrive(True)
            cancelled = not gate.wait_decision()
        with self._cond:
            if cancelled:
                entry.want_running = False
            run_now = (
                entry.want_running
                and not self._closing
                and not entry.user_restart
                and not cancelled
            )
            if run_now:
                self._run_now(entry, part)
            else:
                entry.partition = part
                entry.boots += 1
                entry.started_at = time.monotonic()
            self._cond.notify_all()
        return self._run_to_end(entry, part, run_now, cancelled)

    def _run_to_end(
        self, entry: PartitionEntry, part: Partition, run_now: bool, cancelled: bool = False
    ) -> tuple[str, bool, bool]:
        """Wait for the run of ``part`` (stop it first unless ``run_now``), keep it
        built for the next boot and report the end: (reason, faulted, reset)."""
        if run_now:
            self.log(f"{entry.name}: running (boot {entry.boots})")
            for note in (*part.boot_log, *part.enforcement):
                self.log(f"{entry.name}: {note}")
            result = part.wait()
        else:
            part.stop(0, "its arrival failed" if cancelled else "stopped before it started")
            result = part.result
        try:
            entry.last_stats = part.exit_stats()
            entry.last_unclaimed = dict(part.pio.unclaimed)
            entry.last_devices = part.device_stats()
        except (OSError, ValueError, OsvmmError):
            pass
        for hook in self.on_end:
            hook(entry, part)
        with self._cond:
            entry.partition = None
            entry.started_at = None
        self._keep(entry, part, result)
        reason = result.reason if result else "stopped"
        faulted = result is not None and result.fault is not None
        if faulted and isinstance(result.fault, VmmBug):
            self.log(result.fault.traceback_text.rstrip("\n"))
        self.log(f"{entry.name}: ended: {reason}")
        entry.console.note(f"ended: {reason}")
        return reason, faulted, bool(result and result.reset)

    def _config(self, entry: PartitionEntry) -> PartitionConfig:
        # A plan's ``restore`` snapshot is resumed by the first boot; later boots
        # (a restart, a start) boot the image afresh.
        first = entry.boots == 0
        config = partition_config(
            self.assignment,
            entry.placement,
            entry.machine,
            entry.console.write,
            restore=first,
            networks=self.networks,
        )
        if entry.restore_next is not None:
            config.restore, entry.restore_next = entry.restore_next, None
        # Kept built between runs (_keep); a resumed snapshot is not a build to go back to.
        config.reusable = config.restore is None
        return config

    # -- partitions kept built -----------------------------------------------------------
    def _take_ready(self, entry: PartitionEntry) -> Partition | None:
        """The entry's kept partition for this boot, unless the boot resumes a snapshot
        or the boot inputs changed on disk (then it is closed)."""
        part, entry.ready = entry.ready, None
        if part is None:
            return None
        if entry.restore_next is not None:
            part.close()
            return None
        if part.inputs_changed():
            self.log(f"{entry.name}: its image changed on disk: building it anew")
            part.close()
            return None
        return part

    def _keep(self, entry: PartitionEntry, part: Partition, result) -> None:
        """After a run: recycle ``part`` for the entry's next boot, or close it."""
        fault = result.fault if result is not None else None
        reusable = part.config.reusable
        if self._closing or not reusable or isinstance(fault, VmmBug | KvmError):
            part.close()  # a VMM bug or a KVM error: the next boot starts from scratch
            return
        try:
            part.recycle()
            for hook in self.on_ready:
                hook(entry, part)
        except Exception as err:  # noqa: BLE001 - a fresh build next time instead
            if not isinstance(err, OsvmmError):
                err = VmmBug.from_exception(f"recycling {entry.name}", err)
            self.log(f"{entry.name}: not kept built: {err}")
            part.close()
            return
        entry.ready = part
