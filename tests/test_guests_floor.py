"""bench/kvm_floor.c: the C floor VMM runs the guests exactly as QEMU does."""

from __future__ import annotations

import os
import subprocess

import pytest

from bench.floor import build_floor
from osvmm.guests.build import guest_path

pytestmark = pytest.mark.kvm


def floor(*args: str, cpus: int = 1) -> tuple[int, str, str]:
    """Run kvm_floor with ``cpus`` vCPUs; return (status, stdout, stderr)."""
    env = {**os.environ, "KVM_FLOOR_CPUS": str(cpus)}
    cmd = [str(build_floor()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def test_hello():
    assert floor(str(guest_path("hello")))[:2] == (1, "Hello from osvmm guest\n")


def test_hello64_by_the_64bit_entry():
    assert floor(str(guest_path("hello64")))[:2] == (
        1,
        "Hello from osvmm guest (64-bit entry)\n",
    )


def test_ioloop_with_a_command_line():
    assert floor(str(guest_path("ioloop")), "iters=500")[:2] == (1, "ioloop: 500 done\n")


def test_smp_on_one_vcpu():
    assert floor(str(guest_path("smp")), "wait_ms=100")[:2] == (1, "cpu 0 online\n1 cpus online\n")


def test_smp_on_three_vcpus():
    out = "cpu 0 online\ncpu 1 online\ncpu 2 online\n3 cpus online\n"
    assert floor(str(guest_path("smp")), "wait_ms=150", cpus=3)[:2] == (1, out)


def test_triplefault_is_a_guest_fault():
    status, out, err = floor(str(guest_path("triplefault")))
    assert (status, out) == (4, "triplefault: about to fault\n")
    assert "triple fault" in err


def test_usage_and_bad_image(tmp_path):
    status, _, err = floor()
    assert status == 2 and err.startswith("usage: kvm_floor IMAGE")
    junk = tmp_path / "junk"
    junk.write_bytes(b"not an elf at all, just bytes" * 4)
    status, _, err = floor(str(junk))
    assert status == 2 and "not an ELF" in err


QEMU = (
    "qemu-system-x86_64 -accel kvm -M microvm -m 64 -nodefaults -nographic"
    " -serial stdio -no-reboot -device isa-debug-exit,iobase=0xf4"
).split()


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("name", "cmdline"), [("hello", ""), ("hello", "fault=1"), ("ioloop", "iters=200")]
)
def test_same_as_qemu(name, cmdline):
    cmd = [*QEMU, "-kernel", str(guest_path(name)), "-append", cmdline]
    ref = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert floor(str(guest_path(name)), cmdline)[:2] == (ref.returncode, ref.stdout)
