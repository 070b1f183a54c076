"""Partitions created and destroyed while ``osvmm up`` runs (``osvmm create``,
``osvmm destroy``), beside a counting partition that must not notice: checked
against what runs, pinned and reserved, freed (needs /dev/kvm)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.test_supervisor_up import UpProcess

pytestmark = pytest.mark.kvm

EVERY = 0x100000
PLAN = f"""
[[partition]]
name = "counter"
cpus = "floating"
memory = "8M"
image = "guests:counter"
cmdline = "every={EVERY:#x}"

[[partition]]
name = "hello"
cpus = "floating"
memory = "4M"
image = "guests:hello"
"""
TWO_CPUS = (os.cpu_count() or 1) >= 2


def counts(up: UpProcess) -> list[int]:
    text = (up.logs / "counter.console.log").read_text()
    return [int(n) for n in re.findall(r"counter: (\d+)\n", text)]


def wait_more_counts(up: UpProcess, n: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(c := counts(up)) < n:
        assert time.monotonic() < deadline, c
        time.sleep(0.1)
    return c


def allowed_cpus(pid: int, tid: int) -> str:
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return re.search(r"Cpus_allowed_list:\s+(\S+)", status).group(1)


def fragment(up: UpProcess, name: str, body: str) -> str:
    path = up.dir / name
    path.write_text(body)
    return str(path)


def test_create_and_destroy_beside_a_counting_partition():
    up = UpProcess(PLAN)
    try:
        parts = up.wait_for(lambda p: p["counter"]["state"] == "running")
        before = wait_more_counts(up, 2)
        cpus = '"1"' if TWO_CPUS else '"floating"'
        extra = fragment(
            up,
            "extra.toml",
            f'[[partition]]\nname = "extra"\ncpus = {cpus}\nmemory = "8M"\n'
            f'image = "guests:counter"\ncmdline = "every={EVERY:#x}"\n',
        )
        r = up.cli("create", extra)
        assert r.returncode == 0, r.stderr
        where = "CPUs 1" if TWO_CPUS else "CPUs floating(0)"
        assert r.stdout.decode().startswith(f"extra: running on {where}, node 0")
        parts = up.wait_for(lambda p: p["extra"]["state"] == "running")
        assert parts["extra"]["index"] == 2 and parts["extra"]["boots"] == 1
        if TWO_CPUS:  # the new vCPU on CPU 1, the floating ones kept off it
            assert allowed_cpus(up.proc.pid, parts["extra"]["tids"][0]) == "1"
            assert allowed_cpus(up.proc.pid, parts["counter"]["tids"][0]) == "0"
            assert parts["counter"]["pool"] == "0"
        assert (up.logs / "extra.console.log").exists()
        # what does not fit beside what runs, or is not a fragment, changes nothing
        r = up.cli("create", extra)
        assert (r.returncode, r.stderr) == (
            2,
            b"osvmm: error: partition 'extra' exists already in this VMM\n",
        )
        if TWO_CPUS:
            clash = fragment(
                up,
                "clash.toml",
                '[[partition]]\nname = "clash"\ncpus = "1"\nmemory = "4M"\n'
                'image = "guests:hello"\n',
            )
            r = up.cli("create", clash)
            assert r.stderr == (
                b"osvmm: error: partition 'clash': cpus: CPU 1 is already dedicated to 'extra'\n"
            )
        huge = fragment(
            up,
            "huge.toml",
            '[[partition]]\nname = "huge"\ncpus = "floating"\nmemory = "4096G"\n'
            'image = "guests:hello"\n',
        )
        r = up.cli("create", huge)
        assert r.returncode == 2 and b"does not fit on node 0" in r.stderr, r.stderr
        linked = fragment(
            up,
            "linked.toml",
            '[[partition]]\nname = "linked"\ncpus = "floating"\nmemory = "4M"\n'
            'image = "guests:hello"\n[[channel]]\nname = "c"\nsize = "4K"\n'
            'members = { linked = "rw" }\n',
        )
        r = up.cli("create", linked)
        assert r.returncode == 2 and b"has no channels" in r.stderr, r.stderr
        netted = fragment(
            up,
            "netted.toml",
            "".join(
                f'[[partition]]\nname = "{n}"\ncpus = "floating"\nmemory = "4M"\n'
                'image = "guests:hello"\n'
                for n in ("n1", "n2")
            )
            + '[[network]]\nname = "lan"\nmembers = ["n1", "n2"]\n',
        )
        r = up.cli("create", netted)
        assert r.returncode == 2 and b"joins no network" in r.stderr, r.stderr
        r = up.cli("create", str(up.dir / "none.toml"))
        assert r.returncode == 2 and r.stderr.startswith(b"osvmm: error: fragment "), r.stderr
        assert set(up.ps()) == {"counter", "hello", "extra"}
        # destroyed: stopped, forgotten, its CPU free again
        r = up.cli("destroy", "extra")
        assert r.returncode == 0, r.stderr
        freed = "CPUs 1 and " if TWO_CPUS else ""
        assert r.stdout.decode() == f"extra: destroyed; {freed}8 MiB of memory freed\n"
        parts = up.ps()
        assert set(parts) == {"counter", "hello"}
        if TWO_CPUS:
            from osvmm.up.locks import cpus_dir, holder

            assert holder(os.path.join(cpus_dir(), "cpu1.lock")) is None
            assert parts["counter"]["pool"] == "0-1"
            assert allowed_cpus(up.proc.pid, parts["counter"]["tids"][0]) == "0-1"
        log = (up.logs / "extra.console.log").read_text()
        assert log.endswith("[osvmm: ended: destroyed]\n"), log[-200:]
        r = up.cli("destroy", "extra")
        assert r.stderr.startswith(b"osvmm: error: no partition named 'extra' (partitions: ")
        # a partition of the plan can go too
        assert up.cli("destroy", "hello").returncode == 0
        assert set(up.ps()) == {"counter"}
        # and the counter never noticed: one boot, its count going on in order
        after = wait_more_counts(up, len(before) + 3)
        assert after == [EVERY * (i + 1) for i in range(len(after))], after
        assert up.ps()["counter"]["boots"] == 1
        assert up.cli("down").returncode == 0
        assert up.proc.wait(30) == 0
    finally:
        status, _, err = up.close()
    assert "Traceback" not in err and "internal error" not in err, err
