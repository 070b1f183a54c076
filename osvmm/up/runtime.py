"""Partitions created and destroyed while the VMM runs: ``osvmm create FRAGMENT``
(``POST /v1/partitions``) and ``osvmm destroy NAME`` (``DELETE
/v1/partitions/{name}``), docs/partitions.md.

A fragment is plan text with one or more ``[[partition]]`` tables (docs/config.md).
It is checked as ``osvmm up`` checks a plan, against what runs: it is parsed,
its names must be new, and the running plan with it added is placed on this
host again; every partition that runs must keep its CPUs and node (a fragment
that would move one is refused), no dedicated CPU or node's memory is
over-committed, and the new dedicated CPUs are reserved against other VMMs
(osvmm/up/locks.py). Every image must load and every boot prepare
(``check_boot``), every protected range resolve, before anything is made.
Then the supervisor makes the new entries and starts them; the running
partitions are not touched, except that floating vCPU threads are kept off
CPUs the new partitions dedicate.

A partition created at run time has no channels, doorbells or privilege: the
hypercall monitor's topology is the plan's, fixed when the VMM started. It
runs, restarts and reports like any other; it is not in the plan file, so a
new ``osvmm up`` of that plan does not have it.

Destroying a partition stops it if it runs, ends its thread, closes its
console log and the partition kept built, releases its dedicated CPUs (to the
pool, and to other VMMs) and returns its memory to the host. A plan
partition can be destroyed too; its hypercall id then answers as a stopped
partition's would.
"""

from __future__ import annotations

import dataclasses
import os
import threading

from osvmm.errors import ConfigError, EnforceError, WrongState

MAX_FRAGMENT = 48 << 10  # its JSON (escaped) must fit a request body (http.py MAX_BODY)


class RuntimePartitions:
    """The create and destroy routes, for the supervisor of ``osvmm up``."""

    def __init__(self, supervisor, monitors=None):
        self.sup = supervisor
        self.monitors = monitors  # osvmm/up/writemon.py WriteMonitors: each one's rules
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
        from osvmm.plan.config import MAX_PARTITIONS, parse_plan
        from osvmm.plan.placement import place
        from osvmm.plan.topology import read_topology
        from osvmm.up.locks import reserve_cpus
        from osvmm.up.partition_config import check_boot
        from osvmm.up.writemon import check_protection

        base = msg.get("base_dir") or "/"
        if not os.path.isabs(base):
            raise ConfigError("createPartitions: base_dir must be an absolute directory")
        fragment = parse_plan(msg["plan"], base, source="the fragment")
        if fragment.channels:
            raise ConfigError(
                "the fragment: a partition created at run time has no channels (the "
                "hypercall topology is the plan's, fixed when the VMM started)"
            )
        if fragment.networks:
            raise ConfigError(
                "the fragment: a partition created at run time joins no network (the "
                "plan's networks and their ports are made when the VMM starts)"
            )
        for spec in fragment.partitions:
            where = f"partition {spec.name!r}"
            if spec.doorbells or spec.privileged:
                what = "doorbells" if spec.doorbells else "privileged"
                raise ConfigError(
                    f"{where}: {what}: a partition created at run time has no hypercall "
                    "rights (the hypercall topology is fixed when the VMM started)"
                )
        with self._lock:
            sup = self.sup
            for spec in fragment.partitions:
                if spec.name in sup.partitions:
                    raise WrongState(f"partition {spec.name!r} exists already in this VMM")
            running = sup.assignment
            total = len(running.partitions) + len(fragment.partitions)
            if total > MAX_PARTITIONS:
                raise WrongState(f"{total} partitions: one VMM runs at most {MAX_PARTITIONS}")
            plan = dataclasses.replace(
                running.plan, partitions=running.plan.partitions + fragment.partitions
            )
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
            names = [spec.name for spec in fragment.partitions]
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
            reservations = {}
            try:
                for p in added:
                    if p.cpus:
                        reservations[p.name] = reserve_cpus(p.cpus, f"partition {p.name!r}: ")
            except EnforceError as err:  # another VMM dedicates one of them
                for r in reservations.values():
                    r.release()
                raise WrongState(str(err)) from None
            try:
                entries = sup.add(placed, names)
            except BaseException:
                for r in reservations.values():
                    r.release()
                raise
            self.reservations.update(reservations)
            for entry in entries:
                if self.monitors is not None:
                    self.monitors.track(entry)
                sup.log(f"{entry.name}: created at run time")
        if msg.get("start", True):
            for entry in entries:
                sup.start(entry.name)
        return {"partitions": [sup.describe(e) for e in entries]}

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
        return {
            "name": name,
            "cpus": format_cpu_list(cpus) if cpus else "",
            "memory": entry.spec.memory,
        }
