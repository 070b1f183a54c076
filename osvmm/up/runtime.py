"""Partitions created and destroyed while the VMM runs: ``osvmm create FRAGMENT``
(``POST /v1/partitions``) and ``osvmm destroy NAME`` (``DELETE
/v1/partitions/{name}``), docs/partitions.md.

A fragment is plan text with ``[[partition]]``, ``[[channel]]`` and
``[[doorbell]]`` tables (docs/partitions.md); its channels, its partitions'
``doorbells`` and its ``[[doorbell]]`` grants may name partitions that run. It
is checked as ``osvmm up`` checks a plan, against what runs: it is parsed, its
names must be new, and the running plan with it added is placed on this host
again; every partition that runs must keep its CPUs and node (a fragment that
would move one is refused), no dedicated CPU or node's memory is over-committed,
and the new dedicated CPUs are reserved against other VMMs (osvmm/up/locks.py).
The hypercall topology with it added is made (``monitor.extend_topology``: ids,
grants, channel slots that fit the window beside every slot taken). Every image
must load and every boot prepare (``check_boot``), every protected range
resolve, before anything is made. Then the supervisor makes the new entries, the
hypercall monitor adopts the topology (``LiveMonitor.grow``), and the new
partitions start; the running partitions are not touched, except that floating
vCPU threads are kept off CPUs the new partitions dedicate.

Hypercall ids are never reused in one VMM: a created partition takes the next
one (its ``index``), a created channel the next channel id and the slot after
every slot taken. A channel added to partitions that run takes effect at once:
they see it in PARTITION_INFO and may attach it (their mappings and grants are
unchanged: nothing they hold moves). A fragment's ``[[doorbell]]`` tables give
running partitions the right to ring others (``from``, ``to``): a grant only
adds, at once. A created partition is never privileged. Past 64 partitions
numbered, a fragment's partitions get no hypercalls, and one that names a
channel or doorbell is refused.

Destroying a partition stops it if it runs, ends its thread, closes its
console log and the partition kept built, releases its dedicated CPUs (to the
pool, and to other VMMs) and returns its memory to the host. Its hypercall id
is retired (``LiveMonitor.retire``): no one may ring it (-EPERM; -EBUSY while
it is being stopped), and every channel it was a member of is withdrawn: the
memslots of survivors that had it attached are removed, then its memory is
freed; a survivor reads all ones where it was, its writes are dropped, and
CHANNEL_ATTACH answers -EPERM. A plan partition can be destroyed too. None of
this is written into the plan file: a new ``osvmm up`` of it runs the plan.
"""

from __future__ import annotations

import dataclasses
import os
import threading

from osvmm.errors import ConfigError, EnforceError, WrongState

MAX_FRAGMENT = 48 << 10  # its JSON (escaped) must fit a request body (http.py MAX_BODY)


class RuntimePartitions:
    """The create and destroy routes, for the supervisor of ``osvmm up``."""

    def __init__(self, supervisor, monitors=None, live=None):
        self.sup = supervisor
        self.monitors = monitors  # osvmm/up/writemon.py WriteMonitors: each one's rules
        self.live = live  # osvmm/hypercall/live.py LiveMonitor: channels and doorbells
        self._lock = threading.Lock()  # one create or destroy at a time
        self.reservations: dict[str, object] = {}  # name -> the CpuReservation of its CPUs

    def routes(self) -> list:
        from osvmm.up.api import Route

        body = {"plan": ((str,), True), "base_dir": ((str,), False), "start": ((bool,), False)}
        return [
            Route("POST", "/v1/partitions", "createPartitions", self.create, body),
            Route("DELETE", "/v1/partitions/{name}", "destroyPartition", self.destroy),
        ]

    def close(self) -> None:
        for reservation in self.reservations.values():
            reservation.release()
        self.reservations.clear()

    # -- create ----------------------------------------------------------------------------
    def create(self, msg: dict) -> dict:
        from osvmm.plan.config import parse_plan

        base = msg.get("base_dir") or "/"
        if not os.path.isabs(base):
            raise ConfigError("createPartitions: base_dir must be an absolute directory")
        with self._lock:
            sup = self.sup
            outside = frozenset(sup.partitions)
            fragment = parse_plan(msg["plan"], base, source="the fragment", outside=outside)
            if fragment.networks:
                raise ConfigError(
                    "the fragment: a partition created at run time joins no network (the "
                    "plan's networks and their ports are made when the VMM starts)"
                )
            taps = {net.tap: e.name for e in sup.partitions.values() for net in e.spec.nets}
            for spec in fragment.partitions:
                for net in spec.nets:  # a tap is one NIC's (plan/config.py)
                    if net.tap in taps:
                        raise ConfigError(
                            f"partition {spec.name!r}: nets: tap {net.tap} is partition "
                            f"{taps[net.tap]!r}'s NIC already (a tap is one NIC's)"
                        )
                if spec.privileged:
                    raise ConfigError(
                        f"partition {spec.name!r}: privileged: a partition created at run "
                        "time is not privileged (the plan's privileged partition is the one)"
                    )
                if spec.name in sup.partitions:
                    raise WrongState(f"partition {spec.name!r} exists already in this VMM")
            placed, names = self._place(fragment)
            topology = self._topology(fragment, placed, names)
            entries, reservations = self._make(placed, names)
            if topology is not None:
                try:
                    self.live.grow(topology)
                except BaseException:
                    for e in entries:
                        sup.remove(e.name)
                    for r in reservations.values():
                        r.release()
                    raise
            self.reservations.update(reservations)
            for entry in entries:
                if self.monitors is not None:
                    self.monitors.track(entry)
                sup.log(f"{entry.name}: created at run time")
            chans = topology.channels[-len(fragment.channels) :] if fragment.channels else ()
            for chan in fragment.channels:
                members = ", ".join(f"{m} {mode}" for m, mode in chan.members)
                sup.log(f"channel {chan.name}: created at run time ({members})")
            for ringer, target in fragment.grants:
                sup.log(f"{ringer}: may ring {target} from now on")
        if msg.get("start", True):
            for entry in entries:
                sup.start(entry.name)
        return {
            "partitions": [sup.describe(e) for e in entries],
            "channels": [
                _channel(c, spec) for c, spec in zip(chans, fragment.channels, strict=True)
            ],
            "doorbells": [{"from": r, "to": t} for r, t in fragment.grants],
        }

    def _place(self, fragment):
        """The running assignment with the fragment added, placed on this host again
        (every running partition where it is); the names of its partitions."""
        from osvmm.plan.config import MAX_PARTITIONS
        from osvmm.plan.placement import place
        from osvmm.plan.topology import read_topology
        from osvmm.up.partition_config import check_boot
        from osvmm.up.writemon import check_protection

        running = self.sup.assignment
        plan = dataclasses.replace(
            running.plan,
            partitions=running.plan.partitions + fragment.partitions,
            channels=running.plan.channels + fragment.channels,
        )
        names = [spec.name for spec in fragment.partitions]
        if not names:  # channels only: no partition moves or is made
            return dataclasses.replace(running, plan=plan), names
        total = len(running.partitions) + len(fragment.partitions)
        if total > MAX_PARTITIONS:
            raise WrongState(f"{total} partitions: one VMM runs at most {MAX_PARTITIONS}")
        try:
            placed = place(plan, read_topology("/sys"))
        except ConfigError as err:  # it does not fit beside what runs
            raise WrongState(str(err)) from None
        for old in running.partitions:
            new = placed.partition(old.name)
            if (new.cpus, new.node) != (old.cpus, old.node):
                raise WrongState(
                    f"the fragment would move partition {old.name!r} (CPUs, node): "
                    "give its partitions CPUs and nodes no running partition has"
                )
        added = tuple(placed.partition(n) for n in names)
        # The pool of floating partitions: the one that runs, less what is now dedicated.
        dedicated = {c for p in added for c in p.cpus}
        pool = tuple(c for c in running.pool if c not in dedicated)
        if not pool and any(not p.cpus for p in placed.partitions):
            raise WrongState("the fragment leaves no CPU for the floating partitions")
        placed = dataclasses.replace(placed, pool=pool)
        only_new = dataclasses.replace(placed, partitions=added)
        check_boot(only_new)  # every image loads and every boot prepares
        check_protection(only_new)
        return placed, names

    def _topology(self, fragment, placed, names):
        """The hypercall topology with the fragment added (None: it adds nothing the
        monitor numbers); WrongState when it does not fit beside what runs."""
        from osvmm.hypercall.monitor import ChannelConfig, PartitionConfig, extend_topology
        from osvmm.up.partition_config import machine_of

        live, sup = self.live, self.sup
        hypercalls = (
            fragment.channels or fragment.grants or any(s.doorbells for s in fragment.partitions)
        )
        if live is None:
            if hypercalls:
                raise WrongState("the fragment: this VMM serves no hypercalls")
            return None
        known = len(live.topology.partitions)
        ids = {e.name: e.index for e in sup.partitions.values() if e.index < known}
        parts = []
        for name in names:
            placement = placed.partition(name)
            machine = machine_of(placed, placement)
            doorbells = tuple(placement.spec.doorbells)
            parts.append(PartitionConfig(name, machine.ram_ranges, machine.vcpus, False, doorbells))
        chans = [ChannelConfig(c.name, c.size, dict(c.members)) for c in fragment.channels]
        if known != sup.next_index:  # past the ABI's ids: no hypercalls for new partitions
            if hypercalls:
                raise WrongState(
                    f"the fragment: hypercall ids: this VMM has numbered {known} partitions, "
                    "the ABI's most; a new osvmm up numbers them afresh"
                )
            return None
        try:
            return extend_topology(live.topology, parts, chans, ids, fragment.grants)
        except ConfigError as err:
            if not hypercalls and "hypercall ids" in str(err):
                return None  # the 64th partition and on: no hypercalls, as before
            raise WrongState(f"the fragment: {err}") from None

    def _make(self, placed, names):
        """The new partitions' CPUs reserved and their entries made (stopped)."""
        from osvmm.up.locks import reserve_cpus

        reservations = {}
        try:
            for name in names:
                p = placed.partition(name)
                if p.cpus:
                    reservations[name] = reserve_cpus(p.cpus, f"partition {name!r}: ")
        except EnforceError as err:  # another VMM dedicates one of them
            for r in reservations.values():
                r.release()
            raise WrongState(str(err)) from None
        try:
            entries = self.sup.add(placed, names)
        except BaseException:
            for r in reservations.values():
                r.release()
            raise
        return entries, reservations

    # -- destroy ---------------------------------------------------------------------------
    def destroy(self, msg: dict) -> dict:
        from osvmm.plan.config import format_cpu_list

        name = msg["name"]
        with self._lock:
            entry = self.sup.entry(name)
            self.sup.remove(name)
            cpus = entry.placement.cpus
            reservation = self.reservations.pop(name, None)
            if reservation is not None:
                reservation.release()
            else:  # a partition of the plan: its CPUs are in the VMM's own reservation
                for held in getattr(self.sup, "reservations", ()):
                    held.release_cpus(cpus)
            if self.monitors is not None:
                self.monitors.forget(name)
            channels: tuple[str, ...] = ()
            if self.live is not None and entry.index < len(self.live.topology.partitions):
                channels = self.live.retire(entry.index)
            for chan in channels:
                self.sup.log(f"channel {chan}: withdrawn with {name}")
        return {
            "name": name,
            "cpus": format_cpu_list(cpus) if cpus else "",
            "memory": entry.spec.memory,
            "channels": list(channels),
        }


def _channel(chan, spec) -> dict:
    """A created channel as createPartitions answers it."""
    return {"name": chan.name, "id": chan.id, "size": chan.size, "members": dict(spec.members)}
