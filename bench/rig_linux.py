"""Linux partitions inside the rig: boot time against QEMU, and exits after boot.

    scripts/hwvirt-rig run -v --timeout 3600 -- python3 -m bench.rig_linux [--repeats N]

Runs only where /dev/kvm has hardware-virtualization semantics (inside
scripts/hwvirt-rig, or on a real AMD-V/VT-x host). Everything is measured in
the same L1, in one run, and printed as one table whose ratios are the result:
absolute times inside the rig are emulated (docs/testing.md).

Boot: Debian's stock kernel (the cached vmlinux) with osvmm's busybox
initramfs, 256 MiB, 1 vCPU, command line ``console=ttyS0 quiet -- true``:
the time from exec to the initramfs's ready line on the serial console, and to
the process's end after the guest powers off, for

- ``osvmm run --kernel vmlinux --initrd initrd --append ...``;
- ``qemu-system-x86_64 -accel kvm -M microvm -cpu host`` (``-nodefaults``,
  serial on stdio, ``-no-reboot``), the same kernel, initramfs and command line;
- the same with ``-M q35`` (SeaBIOS, PCI, the chipset's devices).

``-cpu host`` gives QEMU's guest the CPUID osvmm's gets (KVM's supported set),
so both kernels take the same paths (on the rig's family-0xf CPU model, the
GART aperture probe's PCI scan: docs/testing.md). Runs alternate osvmm,
microvm, q35, osvmm, ... so drift falls on all alike.

Exits after boot: one Linux partition (1 vCPU) built in this process, its
console watched until the command has started, then ``Partition.exit_stats()``
read at the start and the end of a window: the exits that reached osvmm per
second by kind, and KVM's own counts per second (every exit, the ones the
kernel handled included). Two commands: ``sleep`` (an idle kernel) and a
busy loop in the shell (``while :; do :; done``, CPU-bound at CPL3).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import REPO, Figure, Sample
from osvmm.guests.build import cache_root

VMLINUX = cache_root() / "kernel" / "vmlinux"  # where scripts/fetch-debian-kernel puts it
READY = b"osvmm-initramfs: ready"
MEMORY = "256M"
APPEND = "console=ttyS0 quiet -- true"
BOOT_TIMEOUT = 900

QEMU_COMMON = (
    "qemu-system-x86_64",
    "-accel",
    "kvm",
    "-cpu",
    "host",
    "-m",
    MEMORY,
    "-smp",
    "1",
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-serial",
    "stdio",
    "-no-reboot",
)


def boot_commands(initrd: Path) -> dict[str, list[str]]:
    files = ["-kernel", str(VMLINUX), "-initrd", str(initrd), "-append", APPEND]
    return {
        "osvmm": [
            sys.executable,
            "-m",
            "osvmm.cli",
            "run",
            "--memory",
            MEMORY,
            "--cpus",
            "1",
            *files,
        ],
        "QEMU microvm": [*QEMU_COMMON[:1], "-M", "microvm", *QEMU_COMMON[1:], *files],
        "QEMU q35": [*QEMU_COMMON[:1], "-M", "q35", *QEMU_COMMON[1:], *files],
    }


def child_env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def time_boot(cmd: list[str]) -> tuple[float, float]:
    """Seconds from exec to the ready line, and to the process's end (status 0)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    killer = threading.Timer(BOOT_TIMEOUT, proc.kill)
    killer.start()
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    ready = None
    try:
        for line in proc.stdout:
            if ready is None and READY in line:
                ready = time.monotonic() - start
        status = proc.wait()
    finally:
        killer.cancel()
        proc.kill()
        proc.wait()
    end = time.monotonic() - start
    reader.join(10)
    if status != 0 or ready is None:
        tail = b"".join(err).decode(errors="replace").strip()[-500:]
        raise RuntimeError(f"{cmd[0]} ... exited {status} (ready line seen: {ready}): {tail}")
    return ready, end


def boot_figures(initrd: Path, repeats: int, log) -> list[Figure]:
    cmds = boot_commands(initrd)
    ready: dict[str, list[float]] = {name: [] for name in cmds}
    end: dict[str, list[float]] = {name: [] for name in cmds}
    for i in range(repeats):
        for name, cmd in cmds.items():
            r, e = time_boot(cmd)
            ready[name].append(r)
            end[name].append(e)
            log(f"boot {i + 1}/{repeats} {name}: ready {r:.1f} s, powered off {e:.1f} s")
    figures = []
    for what, samples in (("to the initramfs's ready line", ready), ("to power-off", end)):
        for base in ("QEMU microvm", "QEMU q35"):
            figures.append(
                Figure(
                    f"Linux boot {what}: osvmm run",
                    "s",
                    Sample.of(samples["osvmm"]),
                    f"{base}, same kernel, initramfs, command line",
                    Sample.of(samples[base]),
                )
            )
    return figures


def exit_rates(initrd: Path, command: str, settle: float, window: float, log) -> dict:
    """Exits per second after boot, by kind: {"vmm": {...}, "kvm": {...}}."""
    from osvmm.machine import Machine
    from osvmm.plan.config import parse_size
    from osvmm.vmm.partition import Partition, PartitionConfig

    out = bytearray()
    lock = threading.Lock()

    def console(data: bytes) -> None:
        with lock:
            out.extend(data)

    marker = b"BENCH-STARTED"
    cfg = PartitionConfig(
        machine=Machine.build(parse_size(MEMORY), 1),
        kernel=str(VMLINUX),
        initrd=str(initrd),
        cmdline=f'console=ttyS0 quiet osvmm.run="echo {marker.decode()}; {command}"',
        console=console,
    )
    part = Partition(cfg)
    try:
        part.build()
        part.start()
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            with lock:
                if marker + b"\r\n" in out or marker + b"\n" in out:
                    break
            if part.result is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command!r}: the partition did not start it ({part.result})")
            time.sleep(0.5)
        time.sleep(settle)
        t0, s0 = time.monotonic(), part.exit_stats()[0]
        time.sleep(window)
        t1, s1 = time.monotonic(), part.exit_stats()[0]
    finally:
        part.stop()
        part.wait(30)
        part.close()
    dt = t1 - t0
    rates = {}
    for side in ("vmm", "kvm"):
        names = set(s0[side]) | set(s1[side])
        rates[side] = {n: (s1[side].get(n, 0) - s0[side].get(n, 0)) / dt for n in sorted(names)}
    vmm, kvm = fmt_rates(rates["vmm"]), fmt_rates(rates["kvm"])
    log(f"{command!r}: over {dt:.1f} s, VMM {vmm}; KVM {kvm}")
    return rates


def fmt_rates(rates: dict) -> str:
    shown = {k: v for k, v in rates.items() if v}
    return ", ".join(f"{k} {v:.1f}/s" for k, v in shown.items()) or "none"


def exit_figures(initrd: Path, settle: float, window: float, log) -> list[Figure]:
    figures = []
    commands = (("idle (sleep)", "sleep 100000"), ("CPU-bound loop", "while :; do :; done"))
    for label, command in commands:
        rates = exit_rates(initrd, command, settle, window, log)
        vmm_total = sum(rates["vmm"].values())
        kvm_total = rates["kvm"].get("exits", 0.0)
        figures.append(
            Figure(
                f"exits to the VMM after boot, Linux {label}",
                "exits/s",
                Sample.of([vmm_total]),
                "all exits KVM counted (in-kernel ones included)",
                Sample.of([kvm_total]),
                notes=f"VMM: {fmt_rates(rates['vmm'])}; KVM: {fmt_rates(rates['kvm'])}",
                extra=rates,
            )
        )
    return figures


def markdown(figures: list[Figure]) -> str:
    from bench.run import fmt

    lines = [
        "| figure | value (median [min, max]) | baseline | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for f in figures:
        v = f.value
        value = f"{fmt(v.median)} {f.unit} [{fmt(v.min)}, {fmt(v.max)}]"
        base = ratio = ""
        if f.baseline is not None:
            b = f.baseline
            base = f"{f.baseline_name}: {fmt(b.median)} {f.unit} [{fmt(b.min)}, {fmt(b.max)}]"
            ratio = f"{f.ratio:.3g}x" if f.ratio is not None else ""
        lines.append(f"| {f.name} | {value} | {base} | {ratio} |")
    notes = [f"- {f.name}: {f.notes}" for f in figures if f.notes]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m bench.rig_linux", description=__doc__.split("\n")[0]
    )
    p.add_argument("--repeats", type=int, default=2, help="boots of each VMM (2)")
    p.add_argument("--window", type=float, default=20.0, help="seconds of exit counting (20)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds after the command starts (5)")
    p.add_argument("--no-qemu", action="store_true", help="skip the boot comparison")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"rig_linux: {msg}", file=sys.stderr, flush=True)

    if not VMLINUX.exists():
        log(f"no Debian kernel at {VMLINUX}: run scripts/fetch-debian-kernel")
        return 2
    from osvmm.boot.initramfs import build_initramfs

    with tempfile.TemporaryDirectory(prefix="osvmm-rig-linux-") as tmp:
        initrd = build_initramfs(Path(tmp) / "initrd.cpio")
        figures = []
        if not args.no_qemu:
            figures += boot_figures(initrd, args.repeats, log)
        figures += exit_figures(initrd, args.settle, args.window, log)
    report(figures, "times")
    return 0


def report(figures: list[Figure], what: str) -> None:
    """Where and when it was measured, then the table (the rig's benchmarks)."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    inside = "inside scripts/hwvirt-rig" if os.environ.get("OSVMM_RIG") == "1" else "on this host"
    print(f"Measured {when} {inside}, Linux {platform.release()}, {os.cpu_count()} CPUs.")
    print(f"Absolute {what} in the rig are emulated: read the ratios.\n")
    print(markdown(figures), end="")


if __name__ == "__main__":
    sys.exit(main())
