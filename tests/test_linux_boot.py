"""A stock Debian kernel reads the boot interface osvmm builds (needs /dev/kvm; slow).

``./setup.sh`` fetches Debian's linux-image-*-amd64-unsigned and extracts its
vmlinux (scripts/fetch-debian-kernel). The kernel boots with 2 vCPUs, 256 MiB
and a two-node NUMA plan; its own log must show that it consumed the e820 map,
the RSDP and ACPI tables, both CPUs with their APIC IDs, both NUMA nodes with
the planned ranges, and the command line. On hosts whose KVM emulates CPL0
code (docs/host-accommodations.md) the kernel stops at its int3 self-test:
that must be a clean partition fault. On hosts with hardware virtualization it
boots on to the initramfs, which runs the command after ``--`` and powers the
guest off: the run ends with status 0 (tests/test_rig_linux.py checks much
more there).
"""

from __future__ import annotations

import re

import pytest

from osvmm.arch.x86.layout import MiB
from osvmm.boot.e820 import E820_RAM, e820_map
from osvmm.machine import Machine
from tests.helpers import VMLINUX, run_osvmm

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

KERNEL_PARAMS = "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 osvmm.test=marker"
INIT_COMMAND = "uname -a"
APPEND = f"{KERNEL_PARAMS} -- {INIT_COMMAND}"


@pytest.fixture(scope="module")
def initrd(tmp_path_factory):
    from osvmm.boot.initramfs import build_initramfs

    return build_initramfs(tmp_path_factory.mktemp("initrd") / "initrd.cpio")


@pytest.fixture(scope="module")
def boot(initrd):
    if not VMLINUX.exists():
        pytest.skip(f"no Debian kernel at {VMLINUX}: run ./setup.sh (scripts/fetch-debian-kernel)")
    # QEMU's spellings -kernel, -initrd and -append, beside osvmm's own options.
    r = run_osvmm(
        "run",
        "-kernel",
        str(VMLINUX),
        "-initrd",
        str(initrd),
        "-append",
        APPEND,
        "--cpus",
        "2",
        "--memory",
        "256M",
        "--numa",
        "2",
        timeout=600,
    )
    return r, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def _kernel_e820(log: str) -> list[tuple[int, int, str]]:
    out = []
    for m in re.finditer(r"BIOS-e820: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] (\w+)", log):
        out.append((int(m.group(1), 16), int(m.group(2), 16), m.group(3)))
    return out


def test_e820_map_is_the_plan(boot):
    _, log, _ = boot
    plan = Machine.build(256 * MiB, 2, numa_nodes=2)
    expected = [
        (e.addr, e.end - 1, "usable" if e.type == E820_RAM else "reserved") for e in e820_map(plan)
    ]
    assert _kernel_e820(log) == expected


def test_kernel_found_the_rsdp_and_tables(boot):
    _, log, _ = boot
    assert re.search(r"ACPI: RSDP 0x00000000000E0000 000024 \(v02 OSVMM", log)
    for sig in ("XSDT", "FACP", "DSDT", "APIC", "SRAT", "SLIT"):
        assert re.search(rf"ACPI: {sig} 0x[0-9A-F]+ ", log), sig
    assert "found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]" in log


def test_kernel_counted_two_cpus_with_planned_apic_ids(boot):
    _, log, _ = boot
    assert "smpboot: Allowing 2 CPUs, 0 hotplug CPUs" in log
    assert "SRAT: PXM 0 -> APIC 0x00 -> Node 0" in log
    assert "SRAT: PXM 1 -> APIC 0x01 -> Node 1" in log


def test_kernel_set_up_two_numa_nodes_with_planned_ranges(boot):
    _, log, _ = boot
    plan = Machine.build(256 * MiB, 2, numa_nodes=2)
    for node in plan.numa_nodes:
        start = node.mem_ranges[0][0]
        end = node.mem_ranges[-1][0] + node.mem_ranges[-1][1] - 1
        assert (
            f"ACPI: SRAT: Node {node.node_id} PXM {node.node_id} [mem {start:#010x}-{end:#010x}]"
            in log
        )
        assert f"Initmem setup node {node.node_id}" in log
    # The node fallback order comes from the SLIT distances.
    assert "Fallback order for Node 0: 0 1" in log
    assert "Fallback order for Node 1: 1 0" in log


def test_kernel_echoes_the_command_line(boot):
    _, log, err = boot
    m = re.search(r"Command line: (.*)", log)
    assert m
    words = m.group(1).split()
    assert words[: len(KERNEL_PARAMS.split())] == KERNEL_PARAMS.split()
    # init's command stays last: the VMM's own words go before the "--".
    assert words[-3:] == ["--", *INIT_COMMAND.split()]
    # Accommodations appear only where the host probe found them needed, and are printed.
    if "noxsave" in words:
        assert "host accommodation: 'noxsave'" in err
        assert words.index("noxsave") < words.index("--")


def test_run_ends_as_this_host_allows(boot):
    from osvmm.vmm.host_quirks import probe_host

    r, log, err = boot
    if probe_host()["cx16"].needed:
        # An emulating host: the int3 self-test is a clean one-line partition fault.
        assert r.returncode == 4, err
        fault = [line for line in err.splitlines() if "guest fault" in line]
        assert len(fault) == 1
        assert re.fullmatch(
            r"osvmm: guest fault on vcpu 0 at rip 0xffffffff[0-9a-f]+: "
            r"emulation failure, instruction bytes cc( [0-9a-f]{2})*",
            fault[0],
        )
        assert "Traceback" not in err
    else:
        assert r.returncode == 0, err


def test_kernel_found_the_initrd_where_the_protocol_puts_it(boot, initrd):
    from osvmm.loader.elf import load_elf
    from osvmm.loader.initrd import place_initrd
    from osvmm.vmm.memory import GuestMemory

    _, log, _ = boot
    m = re.search(r"RAMDISK: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\]", log)
    assert m, "the kernel did not report the initrd"
    start, end = int(m.group(1), 16), int(m.group(2), 16)
    size = initrd.stat().st_size
    assert end - start + 1 == (size + 4095) // 4096 * 4096
    # Exactly where the boot protocol's rules put it for this kernel: as high as
    # low RAM and initrd_addr_max allow, above the kernel's footprint.
    mem = GuestMemory([(0, 256 * MiB)])
    image = load_elf(VMLINUX.read_bytes(), mem, "vmlinux")
    mem.close()
    expected = place_initrd(
        256 * MiB, size, image.setup_header.initrd_addr_max, image.footprint_end
    )
    assert start == expected
