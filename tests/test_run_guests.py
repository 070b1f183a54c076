"""Each bundled guest under ``osvmm run`` (needs /dev/kvm)."""

from __future__ import annotations

import re

import pytest

from tests.helpers import run_osvmm

pytestmark = pytest.mark.kvm


def test_hello_prints_greeting_and_exits_through_debug_exit():
    r = run_osvmm("run", "guests:hello")
    assert r.stdout == b"Hello from osvmm guest\n"
    assert r.returncode == 1  # debug-exit value 0 -> (0 << 1) | 1
    assert r.stderr == b""


def test_hello64_plain_elf64_entry():
    r = run_osvmm("run", "guests:hello64")
    assert r.stdout == b"Hello from osvmm guest (64-bit entry)\n"
    assert r.returncode == 1


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_smp_guest_starts_every_ap(cpus):
    r = run_osvmm("run", "guests:smp", "--cpus", str(cpus))
    expected = "".join(f"cpu {i} online\n" for i in range(cpus)) + f"{cpus} cpus online\n"
    assert r.stdout.decode() == expected
    assert r.returncode == 1


def test_compute_guest_reports_iterations():
    r = run_osvmm("run", "guests:compute", "--append", "seconds=1")
    m = re.fullmatch(rb"compute: (\d+) iterations/s\n", r.stdout)
    assert m, r.stdout
    # The loop runs at CPL3, natively even on this emulating host: far beyond 1e6/s.
    assert int(m.group(1)) > 10_000_000
    assert r.returncode == 1


def test_ioloop_counts_port_exits_in_stats():
    r = run_osvmm("run", "guests:ioloop", "--append", "iters=500", "--stats")
    assert r.stdout == b"ioloop: 500 done\n"
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "exit statistics" in err and "vcpu 0:" in err
    io_out = int(re.search(r"IoOut\s+(\d+)", err).group(1))
    assert io_out >= 500  # the loop's outs plus the console bytes and the debug exit
    assert re.search(r"^\s+exits\s+\d+$", err, re.M)
    assert "0x80x500" in err  # port 0x80 is no device's: counted


def test_triple_fault_is_a_one_line_report_with_status_4():
    r = run_osvmm("run", "guests:triplefault")
    assert r.stdout == b"triplefault: about to fault\n"
    assert r.returncode == 4
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        r"osvmm: guest fault on vcpu 0 at rip 0x[0-9a-f]+: triple fault.*", lines[0]
    )


def test_memory_suffixes_accepted():
    for mem in ("64M", "65536K", "1G"):
        r = run_osvmm("run", "guests:hello", "--memory", mem)
        assert r.returncode == 1, (mem, r.stderr)
