"""Partitions of one process sharing one hypercall monitor, without a supervisor.

``PartitionGroup`` builds each partition (its Machine with the channel window
reserved), one LiveMonitor over all of them, and binds each before it starts:
the same wiring ``osvmm up`` does through its supervisor (up/hypercalls.py),
for callers that drive the partitions themselves: the benchmarks and the
hypercall tests. A partition's run ends as under ``osvmm run`` (no restarts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from osvmm.hypercall import monitor
from osvmm.hypercall.abi import ControlOp
from osvmm.hypercall.live import LiveMonitor
from osvmm.kvm import Kvm
from osvmm.machine import Machine
from osvmm.vmm.partition import Partition, PartitionConfig, RunResult


@dataclass(frozen=True)
class Member:
    """One partition of a group: its name, image, command line and hypercall grants."""

    name: str
    image: str
    cmdline: str = ""
    memory: int = 64 << 20
    vcpus: int = 1
    privileged: bool = False
    doorbells: tuple[str, ...] = ()
    console: object = field(default=None, repr=False)  # a sink for console bytes


class PartitionGroup:
    def __init__(self, members, channels=(), kvm: Kvm | None = None, **live_kwargs):
        """``channels``: monitor.ChannelConfig values; ``live_kwargs`` go to LiveMonitor."""
        self.kvm = kvm or Kvm()
        self._own_kvm = kvm is None
        self.parts: dict[str, Partition] = {}
        machines = {m.name: Machine.build(m.memory, m.vcpus, channels=True) for m in members}
        config = monitor.MonitorConfig(
            [
                monitor.PartitionConfig(
                    m.name,
                    machines[m.name].ram_ranges,
                    machines[m.name].vcpus,
                    m.privileged,
                    tuple(m.doorbells),
                )
                for m in members
            ],
            list(channels),
        )
        live_kwargs.setdefault("lifecycle", self._lifecycle)
        self.live = LiveMonitor(config, **live_kwargs)
        try:
            for pid, m in enumerate(members):
                cfg = PartitionConfig(
                    machine=machines[m.name], name=m.name, image=m.image, cmdline=m.cmdline
                )
                if m.console is not None:
                    cfg.console = m.console
                part = Partition(cfg, self.kvm)
                self.parts[m.name] = part
                part.build()
                self.live.bind(pid, part)
        except BaseException:
            self.close()
            raise

    def _lifecycle(self, partition_id: int, op: ControlOp) -> None:
        """PARTITION_CONTROL without a supervisor: the target's run ends as under
        ``osvmm run`` (a reboot or restart as a reset, the rest as a stop)."""
        part = list(self.parts.values())[partition_id]
        if op == ControlOp.START:
            return  # it is running, or its run is over: nothing restarts it here
        if op in (ControlOp.SHUTDOWN, ControlOp.STOP):
            part.finish(0, f"partition stopped by hypercall {op.name}")
        else:
            part.finish(0, f"partition {op.name} by hypercall (no supervisor)", reset=True)
        self.live.partition_stopped(partition_id)

    def start(self, *names: str) -> None:
        for name in names or self.parts:
            self.parts[name].start()

    def wait(self, name: str, timeout: float | None = None) -> RunResult | None:
        return self.parts[name].wait(timeout)

    def close(self) -> None:
        for part in self.parts.values():
            part.stop()
            part.close()
        self.live.close()
        if self._own_kvm:
            self.kvm.close()
