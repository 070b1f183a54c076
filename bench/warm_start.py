"""Warm start: from a start request to a running VMM until the guest's first console byte.

In-process, a partition kept built (what ``osvmm up`` does with a stopped
partition): in a process that already imported osvmm and holds /dev/kvm open,
one hello partition is built once (``reusable``); each run is ``start()``,
timed with perf_counter until the console sink is handed the guest's first
byte (the hello guest's ``H``, written from CPL3 after the guest's own CPL0
set-up, which this host emulates), then the run's end and ``recycle()``
(timed apart: it is off the start path). Beside it, a fresh build each time:
``Partition(config, kvm).build()`` then ``start()``, split into build
(memory, VM, devices, image, vCPUs) and start-to-first-byte. One untimed run
of each comes first (lazy imports, page cache).

Through the supervisor: a running ``osvmm up`` with one stopped (kept built)
hello partition; a client in this (warm) process sends ``start`` on the
control socket (what ``osvmm start NAME`` sends) and times until the first
guest byte arrives on a console connection attached beforehand.

The floor of that path, same run: the same kept hello partition in a bare
process (no HTTP, supervisor or monitors), started by one byte on a socket,
its first console byte sent back on another socket from the vCPU thread; a
client in this process times it. It keeps the three thread wake-ups (the
request's reader, the vCPU's gate, the byte's reader) and the guest's own
set-up, so the figure less the floor is what the control plane costs.

Baseline, same run: QEMU from exec to the first byte on its stdout (QEMU has
no warm start: a new partition is a new process). Goals: a kept partition's
start request to its first byte at most 2 ms; a fresh build and start under
10 ms.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.cold_start import QEMU
from bench.common import Figure, Sample


class FirstByte:
    """A console sink that notes when the first byte arrives."""

    def __init__(self):
        self.at: float | None = None
        self.event = threading.Event()

    def __call__(self, data: bytes) -> None:
        if self.at is None and data:
            self.at = time.perf_counter()
            self.event.set()


def warm_once(image: str, kvm) -> tuple[float, float]:
    """One in-process start; (build ms, start-to-first-byte ms)."""
    from osvmm.machine import Machine
    from osvmm.vmm.partition import Partition, PartitionConfig

    machine = Machine.build(64 << 20, 1)
    sink = FirstByte()
    t0 = time.perf_counter()
    part = Partition(PartitionConfig(machine, image=image, console=sink), kvm).build()
    t1 = time.perf_counter()
    part.start()
    try:
        if not sink.event.wait(10):
            raise RuntimeError("the hello guest printed nothing within 10 s")
    finally:
        part.wait(10)
        part.close()
    return (t1 - t0) * 1e3, (sink.at - t1) * 1e3


def _time_first_run(vcpu, into: list[float]):
    """Have ``vcpu``'s first KVM_RUN of each boot timed into ``into`` (ms): the
    vCPU loop reads ``run_header`` from the instance when it starts."""
    run_header = vcpu.run_header
    state = {"armed": False}

    def timed():
        if not state["armed"]:
            return run_header()
        state["armed"] = False
        t0 = time.perf_counter()
        try:
            return run_header()
        finally:
            into.append((time.perf_counter() - t0) * 1e3)

    vcpu.run_header = timed
    return lambda: state.update(armed=True)


def kept_config(image: str, console):
    """The hello partition kept built that the in-process runs and the floor use:
    64 MiB, one vCPU, ``reusable`` (recycled between boots)."""
    from osvmm.machine import Machine
    from osvmm.vmm.partition import PartitionConfig

    return PartitionConfig(Machine.build(64 << 20, 1), image=image, console=console, reusable=True)


def kept_runs(image: str, kvm, repeats: int) -> tuple[list[float], list[float], float, list]:
    """One partition kept built: (start-to-first-byte ms per run, recycle ms per run,
    the one build's ms, the guest's first KVM_RUN ms per run: its own CPL0 set-up)."""
    from osvmm.vmm.partition import Partition

    sink = FirstByte()
    config = kept_config(image, sink)
    t0 = time.perf_counter()
    part = Partition(config, kvm).build()
    build = (time.perf_counter() - t0) * 1e3
    firsts, recycles, setups = [], [], []
    arm = _time_first_run(part.vcpus[0], setups)
    try:
        for i in range(repeats + 1):  # the first is a warm-up
            sink.__init__()
            arm()
            t0 = time.perf_counter()
            part.start()
            if not sink.event.wait(10):
                raise RuntimeError("the hello guest printed nothing within 10 s")
            first = (sink.at - t0) * 1e3
            if part.wait(10) is None:
                raise RuntimeError("the hello guest did not end within 10 s")
            t1 = time.perf_counter()
            part.recycle()
            if i:
                firsts.append(first)
                recycles.append((time.perf_counter() - t1) * 1e3)
    finally:
        part.close()
    return firsts, recycles, build, setups[1:]


def qemu_first_byte(image: str) -> float:
    """ms from exec of QEMU to its first stdout byte (the guest's first console byte)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*QEMU, "-kernel", image],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    first = os.read(proc.stdout.fileno(), 1)
    t = time.perf_counter()
    proc.stdout.read()
    proc.wait()
    if not first:
        raise RuntimeError("QEMU printed nothing for the hello guest")
    return (t - t0) * 1e3


def _wait_state(sock: str, name: str, state: str, timeout: float = 20) -> None:
    from osvmm.up.protocol import call

    deadline = time.monotonic() + timeout
    while True:
        parts = {p["name"]: p for p in call(sock, "GET", "/v1/partitions")["partitions"]}
        if parts[name]["state"] == state:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"partition {name} not {state}: {parts[name]}")
        time.sleep(0.02)


def supervisor_runs(
    image: str, repeats: int, cpus: str = "floating"
) -> tuple[list[float], list[float]]:
    """ms from a ``start`` request on a running ``osvmm up``'s control socket to the
    hello guest's first byte on an attached console connection: (requests on a
    control connection held open, requests each on a new connection), alternating."""
    from bench.cold_start import child_env
    from osvmm.up.protocol import attach, call, connect, exchange

    with tempfile.TemporaryDirectory(prefix="osvmm-bench-", dir="/tmp") as tmp:
        sock = f"{tmp}/ctl.sock"
        plan = Path(tmp) / "plan.toml"
        plan.write_text(
            f'[vmm]\ncontrol_socket = "{sock}"\nlog_dir = "{tmp}/logs"\n\n[[partition]]\n'
            f'name = "hello"\ncpus = "{cpus}"\nmemory = "64M"\nimage = "{image}"\n'
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "osvmm.cli", "up", "--quiet", str(plan)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        console = control = None
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(sock):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"osvmm up did not start: {proc.stderr.read()[-300:]}")
                time.sleep(0.02)
            _wait_state(sock, "hello", "stopped")  # its first boot at `up` has ended
            console, _ = attach(sock, "hello")
            seen = FirstByte()
            armed = threading.Event()

            def reader():
                while True:
                    try:
                        data = console.recv(4096)
                    except OSError:
                        return
                    if not data:
                        return
                    if armed.is_set() and b"H" in data:  # "Hello from osvmm guest"
                        seen(data)

            threading.Thread(target=reader, daemon=True).start()
            control = connect(sock)
            held, fresh = [], []
            for i in range(2 * repeats + 2):  # the first of each kind is a warm-up
                time.sleep(0.05)  # the last run's "[osvmm: ended ...]" note is through
                seen.__init__()
                armed.set()
                t0 = time.perf_counter()
                if i % 2:
                    call(sock, "POST", "/v1/partitions/hello/start")
                else:
                    exchange(control, "POST", "/v1/partitions/hello/start")
                if not seen.event.wait(10):
                    raise RuntimeError("no console byte after osvmm start")
                armed.clear()
                if i >= 2:
                    (fresh if i % 2 else held).append((seen.at - t0) * 1e3)
                _wait_state(sock, "hello", "stopped")
            return held, fresh
        finally:
            for s in (console, control):
                if s is not None:
                    s.close()
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)


def floor_server(ctl: socket.socket, con: socket.socket, image: str) -> None:
    """The floor's server (a process of its own): one hello partition kept built;
    each byte on ``ctl`` starts it, and the guest's first console byte of the boot
    goes to ``con`` from the vCPU thread, as ``osvmm up`` sends it to an attached
    console; after the run, ``recycle()`` and one b"R" on ``con``. b"Q" ends it."""
    from osvmm.kvm import Kvm
    from osvmm.vmm.partition import Partition

    boot = {"sent": True}  # nothing of the warm-up boot goes out

    def sink(data: bytes) -> None:
        if data and not boot["sent"]:
            boot["sent"] = True
            con.send(data[:1])

    kvm = Kvm()
    part = Partition(kept_config(image, sink), kvm).build()
    try:
        byte = b"S"
        while byte == b"S":
            part.start()
            if part.wait(10) is None:
                raise RuntimeError("the hello guest did not end within 10 s")
            part.recycle()
            con.send(b"R")
            byte = ctl.recv(1)
            boot["sent"] = False
    finally:
        part.close()
        kvm.close()


def floor_runs(image: str, repeats: int) -> list[float]:
    """ms from one byte on a socket to a bare process holding the same kept hello
    partition (no HTTP, no supervisor, no monitors: ``floor_server``) to the
    guest's first byte back on another socket: the least any control plane's
    start takes here, three thread wake-ups and the guest's own set-up included."""
    from bench.cold_start import child_env

    ctl, ctl_peer = socket.socketpair()
    con, con_peer = socket.socketpair()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.warm_start",
            "--floor-server",
            str(ctl_peer.fileno()),
            str(con_peer.fileno()),
            image,
        ],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=(ctl_peer.fileno(), con_peer.fileno()),
        env=child_env(),
    )
    ctl_peer.close()
    con_peer.close()
    con.settimeout(30)

    def recycled() -> None:  # the server's last run ended and was recycled, or it failed
        if con.recv(1) != b"R":
            raise RuntimeError(f"the floor's server failed: {proc.stderr.read()[-300:]}")

    times = []
    try:
        for i in range(repeats + 1):  # the first is a warm-up
            recycled()
            time.sleep(0.05)  # idle between starts, as supervisor_runs
            t0 = time.perf_counter()
            ctl.send(b"S")
            first = con.recv(1)
            t1 = time.perf_counter()
            if not first:
                raise RuntimeError(f"the floor's server failed: {proc.stderr.read()[-300:]}")
            if i:
                times.append((t1 - t0) * 1e3)
        recycled()
        ctl.send(b"Q")
        proc.wait(30)
    finally:
        ctl.close()
        con.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return times


def run(repeats: int = 20) -> list[Figure]:
    from osvmm.guests.build import guest_path
    from osvmm.kvm import Kvm

    image = str(guest_path("hello"))
    kvm = Kvm()
    try:
        warm_once(image, kvm)
        runs = [warm_once(image, kvm) for _ in range(repeats)]
        firsts, recycles, kept_build, setups = kept_runs(image, kvm, repeats)
    finally:
        kvm.close()
    total = Sample.of([b + s for b, s in runs])
    build = Sample.of([b for b, _ in runs])
    first = Sample.of([s for _, s in runs])
    kept = Sample.of(firsts)
    recycle = Sample.of(recycles)
    setup = Sample.of(setups)
    qemu = None
    if shutil.which(QEMU[0]):
        qemu_first_byte(image)
        qemu = Sample.of([qemu_first_byte(image) for _ in range(max(3, repeats // 2))])
    base_name = "QEMU exec to first byte" if qemu else None
    held, fresh = supervisor_runs(image, max(3, repeats // 2))
    sup, conn = Sample.of(held), Sample.of(fresh)
    floor = Sample.of(floor_runs(image, max(3, repeats // 2)))
    via = Figure(
        "warm start: `start` request on `osvmm up`'s control socket to first console byte "
        "(partition kept built)",
        "ms",
        sup,
        base_name,
        qemu,
        goal="<= 2 ms",
        notes="the request on a control connection held open by a client in a warm process; "
        "the byte read on an attached console connection. A request on a new connection "
        f"each time (as `osvmm start` makes, less its interpreter start-up): "
        f"{conn.median:.1f} ms [{conn.min:.1f}, {conn.max:.1f}]. A fresh build instead "
        f"takes {build.median:.1f} ms [{build.min:.1f}, {build.max:.1f}] before the start. "
        f"The guest's own CPL0 set-up, emulated here, is {setup.median:.2f} ms of any start "
        "(its first KVM_RUN, in-process below). The floor, the same kept partition started "
        "by one byte on a socket to a bare process (no HTTP, supervisor or monitors) with "
        f"its first byte sent back: {floor.median:.2f} ms [{floor.min:.2f}, {floor.max:.2f}], "
        f"so the control plane's share is {sup.median - floor.median:.2f} ms",
    )
    via.extra = {"new_connection_ms": conn.__dict__, "floor_ms": floor.__dict__}
    via.met = sup.median <= 2
    kept_fig = Figure(
        "warm start: start to first console byte, partition kept built (in-process)",
        "ms",
        kept,
        base_name,
        qemu,
        goal="<= 2 ms",
        notes=(
            f"built once ({kept_build:.1f} ms); after each run recycle() "
            f"{recycle.median:.2f} ms [{recycle.min:.2f}, {recycle.max:.2f}] puts it back "
            "(off the start path); the guest's own CPL0 set-up, its first KVM_RUN "
            f"(emulated here), is {setup.median:.2f} ms [{setup.min:.2f}, {setup.max:.2f}] "
            "of it"
        ),
    )
    kept_fig.met = kept.median <= 2
    kept_fig.extra = {"recycle_ms": recycle.__dict__, "build_ms": kept_build}
    fig = Figure(
        "warm start: fresh build, then start to first console byte (in-process)",
        "ms",
        total,
        base_name,
        qemu,
        goal="< 10 ms",
        notes=(
            f"build {build.median:.1f} ms [{build.min:.1f}, {build.max:.1f}], then start to "
            f"first byte {first.median:.1f} ms [{first.min:.1f}, {first.max:.1f}]"
        ),
    )
    fig.met = total.median < 10
    fig.extra = {"build_ms": build.__dict__, "start_to_first_byte_ms": first.__dict__}
    return [via, kept_fig, fig]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--floor-server"]:
        ctl_fd, con_fd, path = sys.argv[2:5]
        floor_server(socket.socket(fileno=int(ctl_fd)), socket.socket(fileno=int(con_fd)), path)
        sys.exit(0)
    for f in run(5):
        print(f.name, f.value, f.baseline, f.ratio, f.notes)
