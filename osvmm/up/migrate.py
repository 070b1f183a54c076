"""Live migration under ``osvmm up`` (docs/snapshots.md).

Source: ``MigrationService`` answers the control API's ``POST
/v1/partitions/{name}/migrate`` with ``{"to": ADDR, "downtime_ms": 300}``: it connects
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
import time

from osvmm.arch.x86.layout import HUGEPAGE_MIN_RANGE
from osvmm.errors import ConfigError, ControlError, OsvmmError, SnapshotError, WrongState
from osvmm.snapshot import stream as wire


class MigrationService:
    """The ``migrate`` request of the control socket (the source's side)."""

    def __init__(self, supervisor, live):
        from collections import Counter

        self.sup = supervisor
        self.live = live
        self.sent: Counter = Counter()  # partition -> migrations out (``/metrics``)
        self.failed: Counter = Counter()  # partition -> migrations that failed

    def routes(self) -> list:
        """``POST /v1/partitions/{name}/migrate`` (docs/openapi.yaml)."""
        from osvmm.up.api import Route

        body = {"to": ((str,), True), "downtime_ms": ((int, float), False)}
        return [
            Route("POST", "/v1/partitions/{name}/migrate", "migratePartition", self.migrate, body)
        ]

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
            raise WrongState(f"partition {name!r} is not running ({entry.state})")
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
                log=self.sup.log,
            )
        except SnapshotError as err:
            self.failed[name] += 1
            self.sup.log(f"{name}: migration to {to} failed, it goes on here: {err}")
            raise SnapshotError(f"migration of {name!r} to {to} failed: {err}") from None
        finally:
            stream.close()
        self.sup.log(
            f"{name}: {reason} in {report.rounds} rounds, {report.bytes_sent >> 10} KiB, "
            f"{report.total_ms:.0f} ms, downtime {report.downtime_ms:.1f} ms, "
            f"{report.dirty_log} ({report.ring_full_exits} ring-full exits)"
        )
        self.sent[name] += 1
        return {
            "name": name,
            "to": to,
            "state": self.sup.wait_stopped(name),
            "rounds": report.rounds,
            "bytes": report.bytes_sent,
            "pages": report.pages_sent,
            "stop_pages": report.stop_pages,
            "total_ms": round(report.total_ms, 3),
            "downtime_ms": round(report.downtime_ms, 3),
            "dirty_log": report.dirty_log,
            "ring_full_exits": report.ring_full_exits,
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
        return accept_partition(self.sup, self.kvm, name, profile)

    def make_ready(self, machine):
        """The arriving partition's VM, made during the pre-copy: its build then
        makes none, which the downtime would hold (vmm/ready.py)."""
        from osvmm.up.partition_config import dirty_ring_setting
        from osvmm.vmm.ready import ReadyVm

        return ReadyVm.make(self.kvm, machine, dirty_ring_setting())

    def _one(self, stream) -> None:
        from osvmm.vmm import migration

        try:
            arrived = migration.receive(stream, self.accept, self.make_ready)
        except SnapshotError as err:
            stream.fail(str(err))  # the source reports why, not only a broken pipe
            raise
        start_arrived(self.sup, stream, arrived)


def accept_partition(sup, kvm, name: str, profile: dict, takeover: bool = False):
    """Check that partition ``name`` of this VMM can take the one arriving (not
    running here, the same machine, its devices, on networks of the same names with
    the same MACs, vCPUs this host can run; with ``takeover``, the very disk files
    and socket path it has); the backing of its
    new memory regions (``backing(size)``), or the error."""
    from osvmm.up.supervisor import FAILED, STOPPED
    from osvmm.vmm import enforce, snapshot
    from osvmm.vmm.device_handover import check_profile

    entry = sup.entry(name)
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
    # Its disks (the same size: shared storage, or a copy), NICs and vsock (its CID);
    # opened only when the partition is built, after the source released them.
    spec = entry.spec
    who = f"partition {name!r} here"
    check_profile(profile.get("devices", []), spec.drives, spec.nets, spec.vsock, who, takeover)
    if "networks" in profile:  # the NICs on plan networks: this plan's networks of those names
        had = [(n, bytes.fromhex(m.replace(":", ""))) for n, m in profile["networks"]]
        here = [(net.name, net.mac(name)) for net in sup.plan.networks_of(name)]
        snapshot.match_networks(had, here, f"partition {name!r}")
    snapshot.check_host(kvm, profile, kvm.supported_cpuid(), snapshot.host_tsc_khz(kvm))
    hugepages = entry.spec.hugepages

    def backing(size: int) -> str:
        huge = bool(hugepages or (hugepages is None and size >= HUGEPAGE_MIN_RANGE))
        return enforce.ram_backing(huge)

    return backing


def start_arrived(sup, stream, arrived) -> None:
    """Resume every partition that arrived and answer RUNS: all are built first,
    then all run (``StartGate``); if one cannot be built, none runs, FAIL is
    answered and the error raised."""
    from osvmm.up.supervisor import RUNNING, StartGate
    from osvmm.vmm.device_handover import claim

    gate = StartGate(len(arrived))
    asked = []
    try:
        for incoming in arrived:
            sup.start(incoming.name, wait=False, restore=incoming, gate=gate)
            asked.append(incoming.name)
        failure = gate.wait_all()
    except OsvmmError as err:
        failure = str(err)
    gate.count = len(asked)
    if failure is None and len(asked) == len(arrived):
        gate.decide(True)
        states = {name: sup.wait_running(name) for name in asked}
        failure = next(
            (f"{n}: {sup.entry(n).reason or s}" for n, s in states.items() if s != RUNNING), None
        )
    else:
        gate.decide(False)
        gate.settle()  # no boot is still taking memory from what is closed below
    for incoming in arrived:
        incoming.close()  # what a partition did not take
    if failure is not None:
        stream.send_json(b"FAIL", {"error": failure})
        raise SnapshotError(failure)
    stream.send_json(b"RUNS", {"partitions": asked})
    for name in asked:
        part = sup.entry(name).partition
        if part is not None:
            claim(part)  # a takeover's vsock file is this VMM's now
        sup.log(f"{name}: running, arrived from {stream.peer}")


# -- a new VMM taking over an old one (osvmm up --takeover) -------------------------------------


class TakeoverService:
    """The control API's ``POST /v1/handover`` (the old VMM's side): every running
    partition goes to the new VMM listening at ``to`` (vmm/migration.py
    ``hand_over``: memfds passed, not copied); then this VMM ends."""

    def __init__(self, supervisor, live, on_down):
        self.sup = supervisor
        self.live = live
        self.on_down = on_down

    def routes(self) -> list:
        """``POST /v1/handover`` (docs/openapi.yaml)."""
        from osvmm.up.api import Route

        return [Route("POST", "/v1/handover", "handover", self.handover, {"to": ((str,), True)})]

    def handover(self, msg: dict) -> dict:
        from osvmm.up.snapshots import monitor_extra
        from osvmm.up.supervisor import RUNNING
        from osvmm.vmm import migration

        to = msg.get("to")
        if not isinstance(to, str) or not to.startswith("unix:"):
            raise ControlError("handover: needs the new VMM's Unix socket (to = unix:PATH)")
        entries = [e for e in self.sup.partitions.values() if e.state == RUNNING and e.partition]
        parts = [
            (e.name, e.partition, lambda e=e: monitor_extra(self.live, e.index)) for e in entries
        ]
        reason = "handed over to a new VMM"

        def then() -> None:  # all still paused: none runs here again
            for e in entries:
                self.sup.stop(e.name, wait=False, reason=reason)

        stream = wire.Stream(wire.connect(to), to)
        stream.sock.settimeout(120)
        try:
            report = migration.hand_over(parts, stream, then)
        except SnapshotError as err:
            self.sup.log(f"handover to {to} failed, every partition goes on here: {err}")
            raise SnapshotError(f"handover to a new VMM failed: {err}") from None
        finally:
            stream.close()
        for e in entries:
            self.sup.wait_stopped(e.name)
        self.sup.log(
            f"handed over {len(entries)} partitions to a new VMM in {report.total_ms:.0f} ms "
            f"(paused {report.downtime_ms:.1f} ms); this VMM ends"
        )
        threading.Timer(0.2, self.on_down).start()  # after this answer is sent
        return {
            "partitions": [e.name for e in entries],
            "pid": os.getpid(),
            "total_ms": round(report.total_ms, 3),
            "downtime_ms": round(report.downtime_ms, 3),
            "bytes_copied": report.pages_sent * 4096,
        }


def take_over(path: str, sup, timeout: float = 300) -> dict:
    """The new VMM's side: ask the VMM serving ``path`` to hand its running
    partitions over, resume them here, and wait until it has gone; its answer."""
    from osvmm.up.protocol import call, is_listening
    from osvmm.vmm import migration

    if not is_listening(path):
        raise ControlError(f"--takeover: no VMM is listening on {path}")
    addr = f"unix:{path}.takeover-{os.getpid()}"
    listener = wire.listen(addr)
    outcome: dict = {}

    def receive() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as err:
            outcome["error"] = SnapshotError(f"the old VMM never connected: {err}")
            return
        conn.settimeout(120)
        stream = wire.Stream(conn, "the old VMM")
        try:
            arrived = migration.receive(
                stream, lambda n, p: accept_partition(sup, sup.kvm, n, p, takeover=True)
            )
            start_arrived(sup, stream, arrived)
            outcome["names"] = [a.name for a in arrived]
        except OsvmmError as err:
            outcome["error"] = err
        finally:
            stream.close()

    receiver = threading.Thread(target=receive, name="takeover", daemon=True)
    receiver.start()
    try:
        reply = call(path, "POST", "/v1/handover", {"to": addr}, timeout=timeout)
    except OsvmmError as err:
        failure = err
    else:
        failure = None
    finally:
        listener.close()
        try:
            os.unlink(addr[len("unix:") :])
        except OSError:
            pass
    receiver.join(timeout if failure is None else 5)
    if "error" in outcome:  # what went wrong here says more than the old VMM's answer
        raise outcome["error"]
    if failure is not None:
        raise failure
    # Gone, not only deaf: it removes its socket file on its way out, which must not
    # be the one this VMM is about to bind.
    deadline = time.monotonic() + 30
    while is_listening(path) or _alive(reply["pid"]):
        if time.monotonic() > deadline:
            raise ControlError(f"--takeover: the old VMM (pid {reply['pid']}) did not end")
        time.sleep(0.05)
    return reply


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
