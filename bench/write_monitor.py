"""The write monitor's costs (osvmm/writemon/, docs/write-monitor.md).

- checked write: the wmkernel guest's CPL3 loop of N dword stores to a word
  it may write on a protected page (each store exits, is decided and applied);
  baseline: the same guest's N bare port-I/O exits (outb 0x80), same VMM, same
  run. Also a denied store (deny policy: decided, dropped and recorded).
- workload slowdown: wmkernel's work loop (an LCG step per iteration) storing
  to a protected word every K iterations, armed vs the same partition
  unarmed, for several K (the protected-write rate is reported).
- permission table memory over the protected bytes (MMP's figure; its anchor
  is under 9%): for wmkernel's rules, for a Linux kernel's text and rodata
  with 64 scattered driver grants (the Debian vmlinux's symbols when present),
  and for the worst case, every other word granted.
Times are the guest's TSC (calibrated against the PIT): VMM start-up is not in them.
"""

from __future__ import annotations

import re

from bench.common import Figure, Sample

GRANTED, DENIED = 0x400200, 0x400000  # osvmm/guests/wmkernel.py: kernel-granted, protected
UNCLAIMED = 0xC0000000  # no RAM, no device: a store exits as MMIO and is ignored


def _run(cmdline: str, arm: bool, policy: str = "deny") -> str:
    from osvmm.guests.build import guest_path
    from osvmm.guests.wmkernel import protect_spec
    from osvmm.loader.ksyms import read_symbols
    from osvmm.machine import Machine
    from osvmm.vmm.partition import Partition, PartitionConfig
    from osvmm.writemon.monitor import WriteMonitor
    from osvmm.writemon.rules import resolve

    image = str(guest_path("wmkernel"))
    machine = Machine.build(8 << 20, 1)
    rules = resolve(protect_spec(policy), read_symbols(image), machine.ram_ranges)
    out: list[bytes] = []
    part = Partition(
        PartitionConfig(machine=machine, image=image, cmdline=cmdline, console=out.append)
    ).build()
    try:
        monitor = WriteMonitor("bench", rules)
        monitor.attach(part)
        if arm:
            monitor.arm()
        part.start()
        if part.wait(300) is None:
            raise RuntimeError(f"wmkernel {cmdline!r} did not finish")
    finally:
        part.stop()
        part.close()
    return b"".join(out).decode(errors="replace")


def _field(text: str, pattern: str) -> float:
    m = re.search(pattern, text)
    if m is None:
        raise RuntimeError(f"no {pattern!r} in {text!r}")
    return float(m.group(1))


def checked_write(n: int, repeats: int) -> dict[str, Sample]:
    """us per store (or exit) of each loop, by name."""
    loops = {
        "port": "port=1",  # outb 0x80: the bare port-I/O exit
        "mmio": f"target={UNCLAIMED:#x}",  # a store outside RAM: the bare MMIO-write exit
        "checked": f"target={GRANTED:#x}",
        "denied": f"target={DENIED:#x}",
    }
    got: dict[str, list[float]] = {k: [] for k in loops}
    for _ in range(repeats):
        for name, arg in loops.items():
            text = _run(f"mode=loop iters={n} {arg}", True)
            got[name].append(_field(text, r"loop \d+, (\d+) ns each") / 1000)
    return {k: Sample.of(v) for k, v in got.items()}


def slowdown(iters: int, every: int, repeats: int) -> tuple[Sample, Sample]:
    """ms of the work loop, armed and unarmed, alternating."""
    armed, plain = [], []
    cmdline = f"mode=work iters={iters} every={every} target={GRANTED:#x}"
    for _ in range(repeats):
        for arm, into in ((False, plain), (True, armed)):
            into.append(_field(_run(cmdline, arm), r"work \d+ every \d+, (\d+) us") / 1000)
    return Sample.of(armed), Sample.of(plain)


def table_figures() -> list[tuple[str, float, int, int]]:
    """(case, table bytes / protected bytes in %, table bytes, protected bytes)."""
    from pathlib import Path

    from osvmm.guests.wmkernel import DRIVER_GRANTS, KERNEL_GRANTS, PROTECTED
    from osvmm.writemon.rules import Rules
    from osvmm.writemon.table import PermissionTable

    cases = []
    t = Rules("deny", PROTECTED, (("kernel", ()), ("driver", ())), (
        ("kernel", KERNEL_GRANTS), ("driver", DRIVER_GRANTS),
    )).table()  # fmt: skip
    cases.append(("wmkernel: 2 ranges, 2 domains, 4 grants", t))
    text, rodata = (0x1000000, 0x1E01D34), (0x2000000, 0x28EB000)  # Debian 6.1's, as resolved
    vmlinux = Path.home() / ".cache" / "osvmm" / "kernel" / "vmlinux"
    if vmlinux.exists():
        from osvmm.loader.ksyms import read_symbols

        s = read_symbols(str(vmlinux))
        p = [s.to_phys(s.address(n)) for n in ("_text", "_etext", "__start_rodata", "__end_rodata")]
        text, rodata = (p[0], -(-p[1] // 4) * 4), (p[2], p[3])
    grants = [(rodata[0] + i * 0x9000, rodata[0] + i * 0x9000 + 16) for i in range(64)]
    cases.append(
        (
            "Linux text+rodata, 64 grants of 16 bytes",
            PermissionTable.build([text, rodata], {0: grants}),
        )
    )
    page = (0x400000, 0x401000)
    worst = [(a, a + 4) for a in range(page[0], page[1], 8)]
    cases.append(
        ("worst case: every other word granted", PermissionTable.build([page], {0: worst}))
    )
    return [
        (name, 100 * t.nbytes / t.protected_bytes, t.nbytes, t.protected_bytes) for name, t in cases
    ]


def run(
    n: int = 20000,
    iters: int = 200_000_000,
    repeats: int = 3,
    everies=(100_000, 1_000_000, 10_000_000),
):
    loops = checked_write(n, repeats)
    mmio = "bare MMIO-write exit (store outside RAM), same VMM"
    figs = [
        Figure(
            "checked write into a protected page (allowed, CPL3)",
            "us",
            loops["checked"],
            mmio,
            loops["mmio"],
            goal="<= 1.2x a bare MMIO-write exit",
        ),
        Figure(
            "denied write (deny policy: decided, dropped, recorded)",
            "us",
            loops["denied"],
            mmio,
            loops["mmio"],
        ),
        Figure(
            "bare MMIO-write exit (store outside RAM)",
            "us",
            loops["mmio"],
            "bare port-I/O exit (outb 0x80), same VMM",
            loops["port"],
            notes="what KVM's emulation of the store costs beside an out instruction's exit",
        ),
    ]
    figs[0].met = figs[0].ratio <= 1.2
    for every in everies:
        armed, plain = slowdown(iters, every, repeats)
        rate = iters / every / (armed.median / 1000)
        f = Figure(
            f"work loop, a protected write every {every:,} iterations",
            "ms",
            armed,
            "the same partition unarmed",
            plain,
            notes=f"{rate:,.0f} protected writes per second armed",
        )
        figs.append(f)
    for name, pct, nbytes, protected in table_figures():
        f = Figure(
            f"permission table / protected bytes: {name}",
            "%",
            Sample(pct, pct, pct, 1),
            goal="< 9% (MMP)",
            notes=f"{nbytes} table bytes for {protected} protected bytes",
        )
        f.met = pct < 9
        figs.append(f)
    return figs
