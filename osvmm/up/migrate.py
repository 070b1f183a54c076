"""Live migration under ``osvmm up`` (docs/snapshots.md).

Source: ``MigrationService`` answers the control socket's
``{"cmd": "migrate", "name": N, "to": ADDR, "downtime_ms": 300}``: it connects
to the destination and runs vmm/migration.py's ``send`` on the partition, with
the hypercall monitor's part (up/snapshots.py ``monitor_extra``); once the
destination runs it, the partition is stopped here as by ``osvmm stop``, with
the reason ``migrated to ADDR``. Any failure before that leaves it running, and
is the request's one-line error.

Destination: ``osvmm up --incoming ADDR PLAN`` starts no partition by itself;
``IncomingServer`` accepts migrations at ADDR, one at a time. A migration is
accepted for a partition of the plan that is not running, whose machine is
the one migrated (memory, vCPUs, channel window) and whose vCPUs this host
can run (CPUID, TSC, XSAVE: vmm/snapshot.py ``check_host``); then the pages
arrive straight into the partition's new memory, and the supervisor starts
the partition from the state (``Supervisor.start(restore=...)``): its
channels are attached again (up/snapshots.py ``reattach``), and RUNS goes
back to the source.
"""

from __future__ import annotations

import os
import socket
import threading

from osvmm.arch.x86.layout import HUGEPAGE_MIN_RANGE
from osvmm.errors import ConfigError, ControlError, OsvmmError, SnapshotError
from osvmm.snapshot import stream as wire


class MigrationService:
    """The ``migrate`` request of the control socket (the source's side)."""

    def __init__(self, supervisor, live):
        self.sup = supervisor
        self.live = live

    def commands(self) -> dict:
        return {"migrate": self.migrate}

    def migrate(self, msg: dict) -> dict:
        from osvmm.up.snapshots import monitor_extra
        from osvmm.up.supervisor import RUNNING
        from osvmm.vmm import migration

        name, to = msg.get("name"), msg.get("to")
        if not isinstance(name, str):
            raise ControlError("migrate: needs a partition name")
        if not isinstance(to, str):
            raise ControlError("migrate: needs a destination (to)")
        downtime = msg.get("downtime_ms", 300)
        if not isinstance(downtime, int | float) or downtime <= 0:
            raise ControlError(f"migrate: downtime_ms {downtime!r} is not a positive number")
        wire.parse_address(to)
        entry = self.sup.entry(name)
        part = entry.partition
        if part is None or entry.state != RUNNING:
            raise ConfigError(f"partition {name!r} is not running ({entry.state})")
        stream = wire.Stream(wire.connect(to), to)
        stream.sock.settimeout(60)
        reason = f"migrated to {to}"
        try:
            report = migration.send(
                part,
                stream,
                name,
                downtime_ms=downtime,
                extra=lambda: monitor_extra(self.live, entry.index),
                then=lambda: self.sup.stop(name, wait=False, reason=reason),
            )
        except SnapshotError as err:
            self.sup.log(f"{name}: migration to {to} failed, it goes on here: {err}")
            raise SnapshotError(f"migration of {name!r} to {to} failed: {err}") from None
        finally:
            stream.close()
        self.sup.log(
            f"{name}: {reason} in {report.rounds} rounds, {report.bytes_sent >> 10} KiB, "
            f"{report.total_ms:.0f} ms, downtime {report.downtime_ms:.1f} ms"
        )
        return {
            "ok": True,
            "name": name,
            "to": to,
            "state": self.sup.wait_stopped(name),
            "rounds": report.rounds,
            "bytes": report.bytes_sent,
            "pages": report.pages_sent,
            "stop_pages": report.stop_pages,
            "total_ms": round(report.total_ms, 3),
            "downtime_ms": round(report.downtime_ms, 3),
        }


class IncomingServer:
    """Accepts migrations at ``address`` for the partitions of ``supervisor``."""

    def __init__(self, address: str, supervisor, kvm):
        self.address = address
        self.sup = supervisor
        self.kvm = kvm
        self._sock = wire.listen(address)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="incoming", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        family, addr = wire.parse_address(self.address)
        if family == socket.AF_UNIX:
            try:
                os.unlink(addr)
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                continue
            conn.settimeout(60)
            stream = wire.Stream(conn, str(peer) if peer else self.address)
            try:
                self._one(stream)
            except OsvmmError as err:
                self.sup.log(f"incoming migration from {stream.peer} failed: {err}")
            except Exception as err:  # noqa: BLE001 - the server goes on
                self.sup.log(f"incoming migration: internal error: {type(err).__name__}: {err}")
            finally:
                stream.close()

    def accept(self, name: str, profile: dict):
        """The zeroed memory for partition ``name``, after checking it fits here."""
        from osvmm.up.supervisor import FAILED, STOPPED
        from osvmm.vmm import enforce, snapshot
        from osvmm.vmm.memory import GuestMemory

        entry = self.sup.entry(name)
        if entry.want_running or entry.state not in (STOPPED, FAILED):
            raise ConfigError(f"partition {name!r} is {entry.state} here")
        machine = snapshot.machine_from_state(profile["machine"])
        if machine != entry.machine:
            raise SnapshotError(
                f"partition {name!r} here has {entry.machine.memory >> 20} MiB and "
                f"{entry.machine.vcpus} vCPUs (channel window "
                f"{'yes' if entry.machine.reserved else 'no'}); the migrated one "
                f"{machine.memory >> 20} MiB and {machine.vcpus}"
                f"{' (another layout)' if machine.memory == entry.machine.memory else ''}"
            )
        snapshot.check_host(
            self.kvm, profile, self.kvm.supported_cpuid(), snapshot.host_tsc_khz(self.kvm)
        )
        hugepages = entry.spec.hugepages
        memory = GuestMemory([])
        try:
            for gpa, size in machine.ram_ranges:
                huge = bool(hugepages or (hugepages is None and size >= HUGEPAGE_MIN_RANGE))
                memory.add_region(gpa, size, enforce.ram_backing(huge))
        except BaseException:
            memory.close()
            raise
        return memory

    def _one(self, stream) -> None:
        from osvmm.up.supervisor import RUNNING
        from osvmm.vmm import migration

        incoming = migration.receive(stream, self.accept)
        name = incoming.name
        try:
            state = self.sup.start(name, restore=incoming)
        except OsvmmError as err:
            stream.send_json(b"FAIL", {"error": str(err)})
            raise
        finally:
            incoming.close()
        if state != RUNNING:
            reason = self.sup.entry(name).reason or state
            stream.send_json(b"FAIL", {"error": f"partition {name!r} did not start: {reason}"})
            raise SnapshotError(f"{name}: {reason}")
        stream.send_json(b"RUNS", {"name": name})
        self.sup.log(f"{name}: running, migrated from {stream.peer}")
