"""The write monitor under ``osvmm up``: each partition's rules, monitor and log.

``WriteMonitors(supervisor)`` resolves every ``[partition.protect]`` of the plan
when it is made (a bad range, symbol or grant is a one-line ConfigError before
any partition starts) and keeps, per partition, its current ProtectSpec and
Rules and a ViolationLog that outlives its runs. Each build (first boot,
restart, reboot) gets a fresh WriteMonitor attached before its vCPUs start (one
kept built gets it when it is kept, for its next run) --
every partition, so ``osvmm protect`` can add rules to any running one -- and
armed at once when its spec says ``arm = "boot"``; with ``arm = "command"``
it waits for ``osvmm protect NAME --arm`` (a kernel patches its own text
while it boots), and a restarted partition waits again.

The control socket's ``protect`` and ``violations`` requests and the
``write_monitor`` field of ``stat`` are answered here (``commands``,
``stat_fields``). Symbols come from ``protect.symbols``, else the partition's
kernel, else its image; each file is read once per VMM.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache

from osvmm.errors import ConfigError, ControlError, ImageError, OsvmmError, WrongState
from osvmm.writemon.monitor import WriteMonitor
from osvmm.writemon.records import ViolationLog
from osvmm.writemon.rules import Rules, resolve
from osvmm.writemon.spec import ProtectSpec, parse_protect

DEFAULT_LAST = 50
MAX_LAST = 200  # records of about 260 bytes: one answer stays under 64 KiB


@lru_cache(maxsize=8)
def _read_symbols(path: str, mtime_ns: int, size: int):
    from osvmm.loader.ksyms import read_symbols

    return read_symbols(path)


class _LazySymbols:
    """A partition's symbols, read on the first lookup (a spec of numbers reads nothing)."""

    def __init__(self, path: str, bzimage_needs_nokaslr: bool):
        self.path = path
        self.check_kaslr = bzimage_needs_nokaslr
        self._symbols = None

    def _get(self):
        if self._symbols is None:
            try:
                st = os.stat(self.path)
                if self.check_kaslr:
                    with open(self.path, "rb") as f:
                        head = f.read(0x206)
                    if head[0x202:0x206] == b"HdrS":
                        raise ImageError(
                            f"{self.path}: a bzImage relocates itself (KASLR): add nokaslr to "
                            "cmdline, or boot its vmlinux"
                        )
                self._symbols = _read_symbols(self.path, st.st_mtime_ns, st.st_size)
            except OSError as e:
                raise ImageError(f"symbols {self.path}: {e.strerror}") from None
        return self._symbols

    def address(self, name: str) -> int:
        return self._get().address(name)

    def size(self, name: str) -> int | None:
        return self._get().size(name)

    def to_phys(self, vaddr: int) -> int:
        return self._get().to_phys(vaddr)


def symbols_for(spec, protect: ProtectSpec) -> _LazySymbols | None:
    """The symbol source of a plan partition: protect.symbols, its kernel, or its image."""
    if protect.symbols:
        return _LazySymbols(protect.symbols, False)
    if spec.kernel:
        return _LazySymbols(spec.kernel, "nokaslr" not in (spec.cmdline or "").split())
    if spec.image:
        from osvmm.guests import resolve_image

        return _LazySymbols(resolve_image(spec.image), False)
    return None


class _State:
    """One partition's protection across its runs."""

    def __init__(self, spec: ProtectSpec | None, rules: Rules | None, symbols):
        self.spec = spec
        self.rules = rules
        self.symbols = symbols
        self.log = ViolationLog()
        self.monitor: WriteMonitor | None = None
        self.last_stats: dict | None = None
        # A monitor made and attached ahead for a partition kept built:
        # (Partition, its generation, the rules it has, the WriteMonitor).
        self.ready: tuple | None = None


class WriteMonitors:
    def __init__(self, supervisor):
        self.sup = supervisor
        self._lock = threading.Lock()
        self.states: dict[str, _State] = {}
        for entry in supervisor.partitions.values():
            self.track(entry)
        supervisor.on_build.append(self._on_build)
        supervisor.on_ready.append(self._on_ready)
        supervisor.on_end.append(self._on_end)

    def track(self, entry) -> None:
        """Resolve and keep the rules of a partition (of the plan, or created at run time)."""
        name = entry.name
        spec = entry.spec.protect
        symbols = symbols_for(entry.spec, spec or ProtectSpec())
        rules = None
        if spec is not None:
            rules = resolve(spec, symbols, entry.machine.ram_ranges, f"partition {name!r}: protect")
        self.states[name] = _State(spec, rules, symbols)

    def forget(self, name: str) -> None:
        """A partition destroyed: its violations go with it."""
        with self._lock:
            self.states.pop(name, None)

    # -- each run ----------------------------------------------------------------------------
    def _attached(self, entry, state: _State, partition) -> WriteMonitor:
        monitor = WriteMonitor(
            entry.name, state.rules or Rules("deny", ()), state.log, entry.console.note
        )
        monitor.attach(partition)
        return monitor

    def _on_ready(self, entry, partition) -> None:
        """A partition kept built: its next run's monitor made and attached now."""
        state = self.states.get(entry.name)
        if state is None:
            return
        with self._lock:
            monitor = self._attached(entry, state, partition)
            state.ready = (partition, partition.generation, state.rules, monitor)

    def _on_build(self, entry, partition) -> None:
        state = self.states.get(entry.name)
        if state is None:  # destroyed meanwhile
            return
        with self._lock:
            ready, state.ready = state.ready, None
            if (
                ready is not None
                and ready[0] is partition
                and ready[1] == partition.generation
                and ready[2] is state.rules  # not changed by `osvmm protect` since
            ):
                monitor = ready[3]
            else:
                monitor = self._attached(entry, state, partition)
            state.monitor = monitor
            if state.spec is not None and state.spec.arm == "boot" and monitor.rules.protected:
                monitor.arm()
                self.sup.log(f"{entry.name}: {describe(monitor)}")

    def _on_end(self, entry, partition) -> None:
        state = self.states.get(entry.name)
        if state is None:
            return
        with self._lock:
            if state.monitor is not None:
                state.last_stats = state.monitor.stats()
            state.monitor = None

    # -- the control socket ------------------------------------------------------------------
    def routes(self) -> list:
        """The protection and violations of a partition (docs/openapi.yaml)."""
        from osvmm.up.api import Route

        p = "/v1/partitions/{name}"
        body = {
            "arm": ((bool,), False),
            "policy": ((str,), False),
            "ranges": ((list,), False),
            "domains": ((dict,), False),
            "grants": ((dict,), False),
        }
        return [
            Route("GET", p + "/protection", "getProtection", self.protect),
            Route("POST", p + "/protection", "protectPartition", self.protect, body),
            Route(
                "GET",
                p + "/violations",
                "getViolations",
                self.violations,
                query={"last": int, "since": int},
            ),
        ]

    def _state(self, msg: dict) -> tuple[str, _State]:
        name = msg.get("name")
        if not isinstance(name, str):
            raise ControlError("needs a partition name")
        self.sup.entry(name)  # the one-line error for an unknown partition
        return name, self.states[name]

    def protect(self, msg: dict) -> dict:
        """Add ranges, domains and grants, set the policy, arm or disarm."""
        name, state = self._state(msg)
        entry = self.sup.entry(name)
        arm = msg.get("arm")
        if arm not in (None, True, False):
            raise ControlError("protect: arm is true or false")
        fields = {k: msg[k] for k in ("policy", "ranges", "domains", "grants") if k in msg}
        with self._lock:
            if fields:
                base = state.spec or ProtectSpec(arm="command")
                if "policy" not in fields:
                    fields["policy"] = base.policy
                where = f"partition {name!r}"
                added = parse_protect(fields, where)
                spec = base.merged(added)
                rules = resolve(spec, state.symbols, entry.machine.ram_ranges, f"{where}: protect")
                state.spec, state.rules = spec, rules
                if state.monitor is not None:
                    state.monitor.update(rules)
            monitor = state.monitor
            if arm is not None:
                if monitor is None:
                    raise WrongState(f"partition {name!r} is not running ({entry.state})")
                if arm and not monitor.rules.protected:
                    raise ControlError(f"partition {name!r}: nothing to protect (no ranges)")
                if arm:
                    monitor.arm()
                else:
                    monitor.disarm()
                self.sup.log(f"{name}: {describe(monitor)}")
            return {
                "name": name,
                "running": monitor is not None,
                "arm": state.spec.arm if state.spec else None,
                "rules": state.rules.to_json() if state.rules else None,
                "monitor": monitor.stats() if monitor is not None else None,
            }

    def violations(self, msg: dict) -> dict:
        """The last ``last`` records, or the first ``last`` from sequence number
        ``since`` on (at most MAX_LAST: an answer is one line under 64 KiB)."""
        name, state = self._state(msg)
        last, since = msg.get("last", DEFAULT_LAST), msg.get("since")
        for key, value in (("last", last), ("since", since)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ControlError(f"violations: {key} is a whole number")
        if not 0 <= last <= MAX_LAST:
            raise ControlError(f"violations: last is 0 to {MAX_LAST} records")
        records = []
        for seq, v in state.log.page(since, last):
            record = v.to_json()
            record["seq"] = seq
            records.append(record)
        return {"name": name, "counts": state.log.counts(), "violations": records}

    def stat_fields(self, entry) -> dict:
        """``write_monitor`` for ``stat``: live, else as at the end of the last run."""
        state = self.states.get(entry.name)
        if state is None or state.spec is None:  # none, or destroyed meanwhile
            return {}
        monitor = state.monitor
        try:
            stats = monitor.stats() if monitor is not None else state.last_stats
        except (OSError, ValueError, OsvmmError):
            stats = state.last_stats
        return {"write_monitor": {"monitor": stats, "violations": state.log.counts()}}


def describe(monitor: WriteMonitor) -> str:
    s = monitor.stats()
    if not s["armed"]:
        return "write monitor disarmed"
    return (
        f"write monitor armed ({s['policy']}): {s['protected_bytes']} protected bytes on "
        f"{s['pages']} pages, permission table {s['table_bytes']} bytes"
    )


def check_protection(assignment) -> None:
    """Resolve every partition's protection once (``osvmm up`` before anything starts)."""
    from osvmm.up.partition_config import machine_of

    for placement in assignment.partitions:
        spec = placement.spec
        if spec.protect is None:
            continue
        where = f"partition {spec.name!r}: protect"
        symbols = symbols_for(spec, spec.protect)
        try:
            resolve(spec.protect, symbols, machine_of(assignment, placement).ram_ranges, where)
        except ImageError as err:
            raise ConfigError(f"{where}: {err}") from None
