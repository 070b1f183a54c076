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
            'members = { linked = "rw", nobody = "rw" }\n',
        )
        r = up.cli("create", linked)
        assert r.returncode == 2 and b"members: no partition is named" in r.stderr, r.stderr
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


PING_PONG = """
[[partition]]
name = "{ping}"
cpus = "floating"
memory = "32M"
image = "guests:ping"
cmdline = "peer={pong_id} chan={chan} rounds={rounds}"
doorbells = ["{pong}"]

[[partition]]
name = "{pong}"
cpus = "floating"
memory = "32M"
image = "guests:pong"
cmdline = "peer={ping_id} chan={chan}"
doorbells = ["{ping}"]

[[channel]]
name = "{link}"
size = "64K"
members = {{ {ping} = "rw", {pong} = "rw" }}
"""


def wait_log(up: UpProcess, name: str, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        path = up.logs / f"{name}.console.log"
        text = path.read_text() if path.exists() else ""
        if re.search(pattern, text):
            return text
        assert time.monotonic() < deadline, (name, pattern, text[-500:])
        time.sleep(0.1)


def test_channels_and_doorbells_of_partitions_created_at_run_time():
    """ping and pong created beside a counting partition, with a channel and doorbells
    between them, exchange their rounds; a channel is added between two partitions
    that exist; what does not fit is refused with nothing changed; destroying pong
    in the middle of a run withdraws its channel and grants: ping gets the documented
    error (or spins on the withdrawn window), the counter never notices."""
    up = UpProcess(PLAN.split('[[partition]]\nname = "hello"')[0])
    try:
        up.wait_for(lambda p: p["counter"]["state"] == "running")
        before = wait_more_counts(up, 2)
        pp = PING_PONG.format(
            ping="ping", pong="pong", ping_id=1, pong_id=2, chan=0, rounds=200, link="link"
        )
        r = up.cli("create", fragment(up, "pp.toml", pp), "--no-start")
        assert r.returncode == 0, r.stderr
        parts = up.ps()
        assert (parts["ping"]["index"], parts["pong"]["index"]) == (1, 2)
        assert up.cli("start", "pong").returncode == 0
        assert up.cli("start", "ping").returncode == 0
        ping = wait_log(up, "ping", r"ping: rounds=200 ns_per_round=\d+ irqs=[1-9]")
        pong = wait_log(up, "pong", r"pong: rounds=200 irqs=[1-9]")
        assert "attach=" not in ping + pong and "doorbell=" not in ping + pong
        assert (up.logs / "osvmm.log").read_text().count("channel link: created at run time") == 1

        # a channel between two partitions that exist, from a fragment of its own
        spare = fragment(
            up,
            "spare.toml",
            '[[channel]]\nname = "spare"\nsize = "4K"\nmembers = { ping = "ro", counter = "rw" }\n',
        )
        r = up.cli("create", spare)
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"channel spare: id 1, 4 KiB, ping ro, counter rw\n"

        # refused, one line each, nothing changed
        def refused(body: str, error: bytes) -> None:
            r = up.cli("create", fragment(up, "bad.toml", body))
            assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
            assert error in r.stderr, r.stderr

        chan = '[[channel]]\nname = "{}"\nsize = "{}"\nmembers = {{ {} }}\n'
        refused(chan.format("link", "4K", 'ping = "rw"'), b"channel 'link' exists already")
        refused(chan.format("x", "4K", 'nobody = "rw"'), b"no partition is named")
        big = "".join(chan.format(f"big{i}", "64M", 'pong = "rw"') for i in range(4))
        refused(big, b"do not fit the 0x10000000-byte channel window")
        refused(
            '[[partition]]\nname = "solo"\ncpus = "floating"\nmemory = "4M"\n'
            'image = "guests:hello"\ndoorbells = ["solo"]\n',
            b"a partition does not ring its own doorbell",
        )
        refused(
            '[[partition]]\nname = "boss"\ncpus = "floating"\nmemory = "4M"\n'
            'image = "guests:hello"\nprivileged = true\n',
            b"a partition created at run time is not privileged",
        )
        refused('[[doorbell]]\nfrom = "ping"\nto = ["pong"]\n', b"'ping' may ring 'pong' already")
        assert set(up.ps()) == {"counter", "ping", "pong"}

        # grants and a channel for a partition that exists: hcinfo (id 3) sees them
        # in PARTITION_INFO and uses the channel (id 2, after link's and spare's slots)
        info = (
            '[[partition]]\nname = "info"\ncpus = "floating"\nmemory = "8M"\n'
            'image = "guests:hcinfo"\ncmdline = "attach=2 value=0x5157"\n'
        )
        assert up.cli("create", fragment(up, "info.toml", info), "--no-start").returncode == 0
        tap = (
            '[[doorbell]]\nfrom = "info"\nto = ["ping"]\n'
            '[[channel]]\nname = "tap"\nsize = "4K"\nmembers = { info = "rw", counter = "ro" }\n'
        )
        r = up.cli("create", fragment(up, "tap.toml", tap))
        assert r.returncode == 0, r.stderr
        assert r.stdout == (
            b"channel tap: id 2, 4 KiB, info rw, counter ro\ndoorbell: info may ring ping\n"
        )
        up.cli("start", "info")
        text = wait_log(up, "info", r"hcinfo: attach=.*detach=-?\d+\n")
        assert "id=3 vcpus=1 memory=0x800000 flags=0 channels=1 doorbells=0xa\n" in text, text
        assert "hcinfo: channel 2 flags=1 gpa=0xd0011000 size=0x1000\n" in text, text
        assert "hcinfo: attach=0xd0011000 before=0x0 after=0x5157 detach=0\n" in text, text

        # a second pair in a long run; pong2 destroyed in the middle of it
        pp2 = PING_PONG.format(
            ping="ping2",
            pong="pong2",
            ping_id=4,
            pong_id=5,
            chan=3,
            rounds=4000000000,
            link="link2",
        )
        r = up.cli("create", fragment(up, "pp2.toml", pp2), "--no-start")
        assert r.returncode == 0, r.stderr
        assert up.cli("start", "pong2").returncode == 0
        assert up.cli("start", "ping2").returncode == 0
        time.sleep(2)  # rounds go on
        parts = up.ps()
        assert parts["ping2"]["state"] == "running" and parts["pong2"]["state"] == "running"
        r = up.cli("destroy", "pong2")
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"pong2: destroyed; 32 MiB of memory freed; channels link2 withdrawn\n"
        deadline = time.monotonic() + 10  # osvmm.log is written by a thread of its own
        while "channel link2: withdrawn with pong2" not in (up.logs / "osvmm.log").read_text():
            assert time.monotonic() < deadline, "no 'channel link2: withdrawn' in osvmm.log"
            time.sleep(0.05)
        # ping2: its next doorbell fails (-EBUSY while pong2 stops, -EPERM once it is
        # gone) and it ends; or it was waiting for pong2's echo and spins on the
        # withdrawn window (all ones), running.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = (up.logs / "ping2.console.log").read_text()
            if "ping: doorbell=" in text:
                break
            time.sleep(0.1)
        text = (up.logs / "ping2.console.log").read_text()
        state = up.ps()["ping2"]["state"]
        assert re.search(r"ping: doorbell=-(16|1)\n", text) or state == "running", (state, text)
        assert "ping: rounds=" not in text
        # pong goes with its channel: ping, booted again, is refused it (-EPERM)
        r = up.cli("destroy", "pong")
        assert r.stdout == b"pong: destroyed; 32 MiB of memory freed; channels link withdrawn\n"
        up.cli("start", "ping")
        wait_log(up, "ping", r"ping: attach=-1\n")
        r = up.cli("destroy", "ping")
        assert r.stdout == b"ping: destroyed; 32 MiB of memory freed; channels spare withdrawn\n"
        assert up.cli("destroy", "ping2").returncode == 0
        # info, booted again, may ring ping no more: its doorbell_mask lost the bit
        up.cli("start", "info")
        text = wait_log(up, "info", r"(?s)doorbells=0xa\n.*doorbells=0x8\n")
        assert up.cli("destroy", "info").returncode == 0
        # the counter never noticed: one boot, its count going on in order
        after = wait_more_counts(up, len(before) + 3)
        assert after == [EVERY * (i + 1) for i in range(len(after))], after
        parts = up.ps()
        assert set(parts) == {"counter"} and parts["counter"]["boots"] == 1
        assert parts["counter"]["state"] == "running"
        assert up.cli("down").returncode == 0
        assert up.proc.wait(30) == 0
    finally:
        status, _, err = up.close()
    assert "Traceback" not in err and "internal error" not in err, err
