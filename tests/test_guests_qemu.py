"""Every PVH guest under QEMU microvm: the reference output the VMM must match."""

from __future__ import annotations

import re
import subprocess

import pytest

from osvmm.guests.build import guest_path

pytestmark = [pytest.mark.qemu, pytest.mark.kvm]

QEMU = (
    "qemu-system-x86_64 -accel kvm -M microvm -m 64 -nodefaults -nographic"
    " -serial stdio -no-reboot -device isa-debug-exit,iobase=0xf4"
).split()


def qemu(name: str, cmdline: str = "", smp: int = 1) -> tuple[int, str]:
    cmd = [*QEMU, "-smp", str(smp), "-kernel", str(guest_path(name))]
    if cmdline:
        cmd += ["-append", cmdline]
    proc = subprocess.run(cmd, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout.decode(errors="replace")


def test_hello():
    assert qemu("hello") == (1, "Hello from osvmm guest\n")


def test_exception_at_cpl3_prints_its_vector_and_rip():
    status, out = qemu("hello", "fault=1")
    assert status == ((32 + 6) << 1) | 1  # EXIT_EXCEPTION + #UD
    first, second = out.splitlines()
    assert first == "Hello from osvmm guest"
    m = re.fullmatch(
        r"exception 6 at (0x[0-9a-f]+) \(error 0x0 cs 0x2b rflags 0x[0-9a-f]+\)", second
    )
    assert m and 0x100000 <= int(m.group(1), 16) < 0x200000, second


def test_ioloop_counts_what_it_was_asked_for():
    assert qemu("ioloop", "iters=1000") == (1, "ioloop: 1000 done\n")
    assert qemu("ioloop", "console=ttyS0 iters=0") == (1, "ioloop: 0 done\n")


def test_bad_argument_exits_with_badarg():
    status, out = qemu("ioloop", "iters=lots")
    assert (status, out) == ((2 << 1) | 1, "guest: bad value for iters= (want a number)\n")


def test_compute_reports_a_rate():
    status, out = qemu("compute", "ms=100")
    assert status == 1
    m = re.fullmatch(r"compute: (\d+) iterations/s\n", out)
    assert m, out
    # A dependent multiply-add runs at 10^8..10^10 per second on any x86-64 host.
    assert 10**8 <= int(m.group(1)) <= 10**10


@pytest.mark.parametrize("cpus", [1, 3])
def test_smp_counts_cpus(cpus):
    status, out = qemu("smp", "wait_ms=150", smp=cpus)
    lines = "".join(f"cpu {i} online\n" for i in range(cpus))
    assert (status, out) == (1, f"{lines}{cpus} cpus online\n")


def test_triplefault_prints_then_resets():
    # With -no-reboot, QEMU exits 0 when the guest triple-faults.
    assert qemu("triplefault") == (0, "triplefault: about to fault\n")
