"""Inside the hardware-virtualization rig: two Linux partitions of one ``osvmm up``
on a plan's ``[[network]]`` (the VMM's learning switch, docs/devices.md), each with
Debian's own virtio_mmio and virtio_net modules and nothing configured but an
address: they ping each other, both ways, and one sends the other 1 MiB over TCP,
the same bytes arriving (MD5 on both ends). Each partition has L1 CPUs of its own
(docs/testing.md, "Known")."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from tests.helpers import VMLINUX, run_osvmm

pytestmark = pytest.mark.rig

TIMEOUT = 400

BLOB_KIB = 1024

SCRIPT = rf"""#!/bin/sh
# nettest ADDRESS PEER ROLE: eth0 up with ADDRESS/24, ping PEER until it answers
# (the other partition may still be booting), 3 pings counted; then ROLE send
# or recv moves {BLOB_KIB} KiB of random bytes over TCP port 5000.
ip link set eth0 up && ip addr add "$1/24" dev eth0
echo "nettest: mac $(cat /sys/class/net/eth0/address)"
up() {{ cut -d' ' -f1 /proc/uptime; }}
if [ "$3" = recv ]; then
    # nc half-closes when its stdin ends, and the sender's nc stops at that: a
    # stdin that does not end keeps the receiver listening until the data does.
    sleep 600 | busybox nc -l -p 5000 > /tmp/blob &
fi
i=0
until ping -c 1 -W 2 "$2" >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -ge 150 ] && break
done
ping -c 3 -W 10 "$2" | sed -n 's/.* \([0-9]*\) packets received.*/nettest: ping \1/p'
if [ "$3" = send ]; then
    dd if=/dev/urandom of=/tmp/blob bs=1024 count={BLOB_KIB} 2>/dev/null
    echo "nettest: sent $(md5sum < /tmp/blob | cut -d' ' -f1)"
    t0=$(up)
    i=0
    until busybox nc "$2" 5000 < /tmp/blob; do  # the listener may not be up yet
        i=$((i + 1)); [ $i -ge 30 ] && break; sleep 2
    done
    echo "nettest: sendtime $t0 $(up)"
else
    i=0
    while [ "$(wc -c < /tmp/blob)" -lt {BLOB_KIB * 1024} ] && [ $i -lt 300 ]; do
        sleep 1; i=$((i + 1))
    done
    echo "nettest: received $(wc -c < /tmp/blob) $(md5sum < /tmp/blob | cut -d' ' -f1)"
fi
sleep 10  # the peer may still be pinging or sending: answer it before powering off
grep virtio /proc/interrupts | sed 's/^ */nettest: irq /'
"""


def lines(text: str) -> dict[str, str]:
    out = {}
    for m in re.finditer(r"^nettest: (\w+) (.*)$", text.replace("\r", ""), re.M):
        out.setdefault(m.group(1), m.group(2).strip())
    return out


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    if not VMLINUX.exists():
        pytest.skip(f"no Debian kernel at {VMLINUX}: scripts/fetch-debian-kernel --modules")
    assert (os.cpu_count() or 1) >= 3, "needs 3 CPUs in L1: scripts/hwvirt-rig run --cpus 5"
    from osvmm.boot import kmodules
    from osvmm.boot.initramfs import build_initramfs

    tmp = tmp_path_factory.mktemp("net")
    script = tmp / "nettest"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    moddir = kmodules.module_dir(VMLINUX.resolve().parent / "modules")
    initrd = build_initramfs(
        tmp / "initrd.cpio",
        extra_files=[(script, "/bin/nettest")],
        modules=kmodules.module_members(moddir, ("virtio_mmio", "virtio_net")),
    )

    def part(name, cpu, args):
        cmdline = f"console=ttyS0 quiet -- /bin/nettest {args}"
        return (
            f'[[partition]]\nname = "{name}"\ncpus = "{cpu}"\nmemory = "192M"\n'
            f'hugepages = false\nkernel = "{VMLINUX}"\ninitrd = "{initrd}"\n'
            f"cmdline = {json.dumps(cmdline)}\n\n"
        )

    plan = tmp / "lan.toml"
    plan.write_text(
        f'[vmm]\ncontrol_socket = "{tmp}/osvmm.sock"\nlog_dir = "{tmp}/logs"\n\n'
        + part("left", 1, "10.77.0.1 10.77.0.2 send")
        + part("right", 2, "10.77.0.2 10.77.0.1 recv")
        + '[[network]]\nname = "lan"\nmembers = ["left", "right"]\n'
    )
    r = run_osvmm("up", "-d", str(plan), timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    logs = {name: tmp / "logs" / f"{name}.console.log" for name in ("left", "right")}

    def read_logs() -> dict[str, str]:
        return {n: p.read_text(errors="replace") if p.exists() else "" for n, p in logs.items()}

    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if all("[osvmm: ended" in t for t in read_logs().values()):
                break
            time.sleep(2)
        plan_out = run_osvmm("plan", str(plan), timeout=120).stdout.decode(errors="replace")
    finally:
        run_osvmm("down", "--plan", str(plan), timeout=300)
    texts = read_logs()
    return {n: lines(t) for n, t in texts.items()}, texts, plan_out


def test_two_partitions_on_a_network_ping_each_other(network):
    out, texts, _ = network
    assert out["left"].get("ping") == "3", texts["left"][-3000:]
    assert out["right"].get("ping") == "3", texts["right"][-3000:]


def test_each_nic_has_the_mac_the_plan_gives(network):
    out, _, plan_out = network
    for name in ("left", "right"):
        mac = out[name].get("mac")
        assert mac and mac.startswith("02:6e:"), out[name]
        assert mac in plan_out, (mac, plan_out)


def test_a_transfer_arrives_whole(network):
    out, texts, _ = network
    sent, received = out["left"].get("sent"), out["right"].get("received")
    assert sent and received, (texts["left"][-2000:], texts["right"][-2000:])
    assert received == f"{BLOB_KIB * 1024} {sent}", (sent, received)
    start, end = (float(x) for x in out["left"]["sendtime"].split())
    print(f"1 MiB partition to partition in {end - start:.1f} s of the sender's uptime")
