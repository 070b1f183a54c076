"""Write the golden boot tables that tests/test_boot_golden.py compares against.

Run from the repository root:

    python3 -m tests.golden_gen tests/golden

regenerates them after an intended change to a builder (review the diff of
``iasl -d`` output before committing new golden files). The plan is fixed:
256 MiB, two vCPUs with APIC IDs 0 and 1, two NUMA nodes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from osvmm.arch.x86 import layout
from osvmm.boot.acpi import build_acpi
from osvmm.boot.bootparams import build_zero_page
from osvmm.boot.mptable import build_mptable
from osvmm.machine import Machine

GOLDEN_CMDLINE = b"console=ttyS0 panic=-1"
GOLDEN_INITRD_ADDR = 0x0F00_0000
GOLDEN_INITRD_SIZE = 0x0010_0000


def golden_plan() -> Machine:
    return Machine.build(256 * layout.MiB, [0, 1], numa_nodes=2)


def golden_files() -> dict[str, bytes]:
    """File name -> bytes, for every golden file."""
    plan = golden_plan()
    acpi = build_acpi(plan, layout.ACPI_TABLES_ADDR)
    files = {"mptable.bin": build_mptable(plan, layout.MPTABLE_ADDR)}
    for sig, (_, data) in acpi.tables.items():
        files[f"acpi-{sig.lower()}.bin"] = data
    files["zero_page.bin"] = build_zero_page(
        plan,
        None,
        layout.CMDLINE_ADDR,
        len(GOLDEN_CMDLINE),
        GOLDEN_INITRD_ADDR,
        GOLDEN_INITRD_SIZE,
        acpi.rsdp_addr,
    )
    return files


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 -m tests.golden_gen DIRECTORY", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, data in golden_files().items():
        (out / name).write_bytes(data)
        print(f"{out / name}: {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
