"""The hypercall interface under ``osvmm up``: one LiveMonitor wired to the supervisor.

The supervisor owns each partition's lifecycle; the monitor follows it one way
(osvmm.hypercall.live): a partition is bound when it has been built, before its
vCPUs start, and is told stopped when its run ends. PARTITION_CONTROL calls go
the other way, to the supervisor's stop/start/restart, on a thread of their own.
"""

from __future__ import annotations

from osvmm.errors import OsvmmError, VmmBug
from osvmm.hypercall.abi import ControlOp
from osvmm.hypercall.live import LiveMonitor, monitor_config
from osvmm.up.snapshots import reattach


def serve_supervisor(supervisor, check: bool = False) -> LiveMonitor:
    """Run the hypercall interface for every partition of an ``osvmm up`` supervisor.

    Each partition the supervisor builds (first boot, restart, reboot) is bound
    before its vCPUs start, with no channel attached (one created at run time too,
    once ``LiveMonitor.grow`` has numbered it); one kept built for its next boot
    is prepared when it is kept, so that its bind only says it runs.
    PARTITION_CONTROL goes to the supervisor's stop/start/restart (SHUTDOWN is a
    stop, REBOOT a restart)."""
    machines = {name: entry.machine for name, entry in supervisor.partitions.items()}
    config = monitor_config(supervisor.plan, machines)
    live = LiveMonitor(config, lifecycle=None, check=check, console=None)
    actions = {
        ControlOp.SHUTDOWN: supervisor.stop,
        ControlOp.STOP: supervisor.stop,
        ControlOp.START: supervisor.start,
        ControlOp.REBOOT: supervisor.restart,
        ControlOp.RESTART: supervisor.restart,
    }

    def name_of(pid: int) -> str | None:
        """The partition of hypercall id ``pid`` now (None: destroyed)."""
        for entry in list(supervisor.partitions.values()):
            if entry.index == pid:
                return entry.name
        return None

    def lifecycle(pid: int, op: ControlOp) -> None:
        name = name_of(pid)
        if name is None:  # destroyed: the monitor's "running" is put back to "stopped"
            live.partition_stopped(pid)
            supervisor.log(f"hypercall {op.name} of partition id {pid}: it was destroyed")
            return
        try:
            actions[op](name, wait=False)
        except OsvmmError as err:  # e.g. a race with the control socket: logged, not fatal
            supervisor.log(f"{name}: hypercall {op.name}: {err}")
        except Exception as err:  # noqa: BLE001 - a bug: one line and its traceback logged
            bug = VmmBug.from_exception(f"hypercall {op.name} on {name}", err)
            supervisor.log(f"{name}: {bug}")
            supervisor.log(bug.traceback_text.rstrip("\n"))

    # A partition created at run time has hypercalls when the monitor numbered it
    # (osvmm/up/runtime.py grows the topology): all but those past the ABI's 64 ids.
    def on_build(entry, partition) -> None:  # booting: "running" for the monitor
        if entry.index >= len(live.topology.partitions):
            return
        live.bind(entry.index, partition)
        reattach(live, entry.index, partition)  # a resumed snapshot's channels

    def on_ready(entry, partition) -> None:  # kept built: ready for its next boot
        if entry.index < len(live.topology.partitions):
            live.prepare(entry.index, partition)

    def on_end(entry, partition) -> None:
        # Stopped outside the ABI (power-off, fault, the control socket): it loses
        # its channels, and doorbells to it answer -EBUSY until it boots again.
        if entry.index < len(live.topology.partitions):
            live.partition_stopped(entry.index)

    live.lifecycle = lifecycle
    supervisor.on_build.append(on_build)
    supervisor.on_ready.append(on_ready)
    supervisor.on_end.append(on_end)
    return live


def hypercall_counts(live):
    """A ``stat_fields`` callable (osvmm/up/server.py): the ``hypercalls`` a partition
    made, by call name and result (``0`` for success, else ``-ENAME``)."""
    from osvmm.hypercall import abi

    def fields(entry) -> dict:
        with live.lock:
            mine = [(k, n) for k, n in live.stats.by_partition.items() if k[0] == entry.index]
        out: dict[str, dict[str, int]] = {}
        for (_, nr, result), n in sorted(mine):
            call = abi.BY_NUMBER[nr].name if nr in abi.BY_NUMBER else str(nr)
            out.setdefault(call, {})[abi.result_name(result)] = n
        return {"hypercalls": out}

    return fields
