"""``GET /metrics``: the VMM's state and counters in the Prometheus text
exposition format (docs/operations.md lists every metric).

The text is made by ``prometheus_client``, the library made for the format
(its escaping of label values, its ``# HELP``/``# TYPE`` lines and its counter
``_total`` and ``_created`` conventions are what Prometheus parses). It is
imported here only, when a scrape asks: ``osvmm up`` and every other command
start without it (tests/test_import_graph.py, bench/cold_start.py).

Each scrape builds its families afresh from what the supervisor and the
services hold (no registry lives between scrapes): per partition its state,
boots and restarts, memory and vCPUs, the exits that reached the VMM by kind
and KVM's own counters per vCPU, console bytes; the hypercalls each partition
made by call and result (``hypercall_metrics``); snapshots, migrations and
write-monitor violations (``service_metrics``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = ("stopped", "booting", "running", "backoff", "failed")


def render(sup, stat_fields=(), sources: Iterable[Callable[[], list]] = ()) -> bytes:
    """The exposition text of one scrape."""
    from prometheus_client import CollectorRegistry, generate_latest

    families = partition_metrics(sup)
    for source in sources:
        families += source()

    class _Scrape:
        def collect(self):
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape())
    return generate_latest(registry)


def partition_metrics(sup) -> list:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    P = ["partition"]
    state = GaugeMetricFamily(
        "osvmm_partition_state", "1 for the state the partition is in, else 0", labels=[*P, "state"]
    )
    boots = CounterMetricFamily("osvmm_partition_boots", "runs started", labels=P)
    restarts = GaugeMetricFamily(
        "osvmm_partition_restarts",
        "automatic restarts since a user last started the partition",
        labels=P,
    )
    uptime = GaugeMetricFamily("osvmm_partition_uptime_seconds", "of the current run", labels=P)
    memory = GaugeMetricFamily("osvmm_partition_memory_bytes", "guest memory", labels=P)
    vcpus = GaugeMetricFamily("osvmm_partition_vcpus", "vCPUs", labels=P)
    console = CounterMetricFamily(
        "osvmm_console_bytes", "console output of the partition (VMM notes included)", labels=P
    )
    lost = CounterMetricFamily(
        "osvmm_console_lost_bytes", "console bytes a sink missed", labels=[*P, "sink"]
    )
    vmm_exits = CounterMetricFamily(
        "osvmm_vcpu_exits",
        "exits that reached the VMM, by kind (live, else as at the end of the last run)",
        labels=[*P, "vcpu", "reason"],
    )
    kvm_exits = CounterMetricFamily(
        "osvmm_kvm_exits",
        "KVM's own exit counters (KVM_GET_STATS_FD), those the kernel handled included",
        labels=[*P, "vcpu", "stat"],
    )
    kvm_other = GaugeMetricFamily(
        "osvmm_kvm_vcpu_stat", "KVM's other vCPU statistics", labels=[*P, "vcpu", "stat"]
    )
    devices = CounterMetricFamily(
        "osvmm_device_events",
        "a virtio device's counters (frames, requests, drops) and its backend's "
        "(a switch port's), by device slot",
        labels=[*P, "device", "event"],
    )
    device_irqs = CounterMetricFamily(
        "osvmm_device_interrupts", "interrupts a virtio device raised", labels=[*P, "device"]
    )
    for entry in list(sup.partitions.values()):
        d = sup.describe(entry)
        name = d["name"]
        for s in STATES:
            state.add_metric([name, s], 1 if d["state"] == s else 0)
        boots.add_metric([name], d["boots"])
        restarts.add_metric([name], d["restarts"])
        uptime.add_metric([name], d["uptime_s"] or 0)
        memory.add_metric([name], d["memory"])
        vcpus.add_metric([name], d["vcpus"])
        console.add_metric([name], entry.console.bytes_out)
        for sink, value in d["console_lost"].items():
            if isinstance(value, int):
                lost.add_metric([name, sink], value)
        stats = sup.stats(entry)
        for slot, dev in enumerate(stats["devices"]):
            for event, n in (*dev["counts"].items(), *dev["backend"].items()):
                devices.add_metric([name, str(slot), event], n)
            device_irqs.add_metric([name, str(slot)], dev["interrupts"])
        for v in stats["vcpus"]:
            cpu = str(v["vcpu"])
            for reason, n in v["vmm"].items():
                vmm_exits.add_metric([name, cpu, reason], n)
            for stat, n in v["kvm"].items():
                family = kvm_exits if stat.endswith("exits") else kvm_other
                family.add_metric([name, cpu, stat], n)
    return [state, boots, restarts, uptime, memory, vcpus, console, lost, vmm_exits] + [
        kvm_exits,
        kvm_other,
        devices,
        device_irqs,
    ]


def hypercall_metrics(live, sup) -> list:
    """Hypercalls by partition, call and result (``0`` for success, else ``-ENAME``)."""
    from prometheus_client.core import CounterMetricFamily

    from osvmm.hypercall import abi

    names = {e.index: e.name for e in list(sup.partitions.values())}
    calls = CounterMetricFamily(
        "osvmm_hypercalls", "hypercalls made", labels=["partition", "call", "result"]
    )
    with live.lock:
        counts = dict(live.stats.by_partition)
    for (pid, nr, result), n in sorted(counts.items()):
        call = abi.BY_NUMBER[nr].name if nr in abi.BY_NUMBER else str(nr)
        calls.add_metric([names.get(pid, str(pid)), call, abi.result_name(result)], n)
    return [calls]


def service_metrics(snapshots, migrations, monitors) -> list:
    """Snapshots written, migrations out (and failed), write-monitor violations."""
    from prometheus_client.core import CounterMetricFamily

    P = ["partition"]
    snaps = CounterMetricFamily("osvmm_snapshots", "snapshots written", labels=P)
    migr = CounterMetricFamily("osvmm_migrations", "live migrations out", labels=[*P, "result"])
    viol = CounterMetricFamily(
        "osvmm_write_violations", "write-monitor violations", labels=[*P, "decision"]
    )
    for name, n in sorted(snapshots.taken.items()):
        snaps.add_metric([name], n)
    for result, counter in (("ok", migrations.sent), ("failed", migrations.failed)):
        for name, n in sorted(counter.items()):
            migr.add_metric([name, result], n)
    for name, state in list(monitors.states.items()):
        for decision, n in state.log.counts().items():
            if decision != "total":
                viol.add_metric([name, decision], n)
    return [snaps, migr, viol]
