"""Devices inside the rig: a Linux partition's virtio-blk, virtio-net and vsock
against the host directly and QEMU's.

    scripts/hwvirt-rig run -v --cpus 5 --timeout 1800 -- python3 -m bench.rig_devices
        [--no-qemu] [--only disk,net,p2p,vsock]

Runs only where /dev/kvm has hardware-virtualization semantics (inside
scripts/hwvirt-rig, or on a real AMD-V/VT-x host). Everything is measured in
the same L1, in one run; absolute figures in the rig are emulated (its guests'
kernel code runs under TCG), so the ratios are the result (docs/performance.md).

The load is tools/osvmm-iobench, built static here, the same binary for all
three: 1 MiB sequential writes (then fsync) and reads of 32 MiB, and 4 KiB reads
at random offsets for 5 s, on a 64 MiB raw image:

- **host**: on the image file itself, in this process's machine (buffered: the
  rig's tmpfs takes no O_DIRECT; the device backends below read it through the
  same page cache);
- **osvmm**: Debian's kernel under ``osvmm run --drive IMAGE``, 1 vCPU, 256 MiB,
  the load on ``/dev/vda`` with O_DIRECT (every request reaches the device);
- **QEMU**: ``qemu-system-x86_64 -accel kvm -M microvm -cpu host`` with
  ``-device virtio-blk-device`` on the same image (QEMU's virtio-mmio, announced
  in its ACPI tables as osvmm's are), the same kernel, initramfs and load.

Each guest's figures come from its own clock (the tool's lines on the console).

The network: 2 MiB of random bytes from the guest to a busybox ``nc`` on the
host's end of a tap, over TCP, timed by the guest's clock and checked whole on
arrival; the tap, its address, the VMM and the listener in a network namespace
of their own. osvmm's ``--net tap=`` against QEMU microvm's
``virtio-net-device`` on the same tap (QEMU's userspace tap backend, no vhost).

Partition to partition: two Linux partitions of one ``osvmm up`` on a plan's
``[[network]]`` (osvmm's learning switch, frames moved in the VMM's Python), each
with an L1 CPU of its own, 256 MiB; one sends 2 MiB of random bytes to the other
with busybox ``nc`` over TCP, timed by the receiver's clock from the first byte
to the last and checked whole (size, and MD5 against the sender's). Against two
QEMU microvm guests with ``virtio-net-device`` on ``-netdev socket`` (one
``listen=``, the other ``connect=``, frames passed between the two QEMUs'
userspace over a TCP connection on L1's loopback: QEMU's nearest to a switch in
the VMM), the same kernel, initramfs and script.

vsock: 200 round trips of 64 bytes from a host program to the guest's echo
(tools/osvmm-vsock listen): through osvmm's Unix socket (``CONNECT 5000``),
against QEMU microvm's ``vhost-vsock-device`` (an AF_VSOCK socket, the kernel's
vhost doing the device's work) where L1 has ``/dev/vhost-vsock``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, Figure, Sample
from bench.rig_linux import QEMU_COMMON, VMLINUX, child_env, report

MEMORY = "256M"
IMAGE_MIB = 64
SEQ_MIB = 32
RAND_S = 5
RUN_TIMEOUT = 900
GUEST_SCRIPT = f"""#!/bin/sh
# blkbench: the block load on /dev/vda, one "BENCH iobench ..." line per part.
for mode in seqwrite seqread; do
    /bin/osvmm-iobench -d $mode /dev/vda {SEQ_MIB} | sed 's/^/BENCH /'
done
/bin/osvmm-iobench -d randread /dev/vda {RAND_S} | sed 's/^/BENCH /'
"""
APPEND = "console=ttyS0 quiet -- /bin/blkbench"


def build_tool(out: Path, name: str = "osvmm-iobench") -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError(f"no gcc to build tools/{name}.c")
    src = REPO / "tools" / f"{name}.c"
    subprocess.run([gcc, "-static", "-O2", "-o", str(out), str(src)], check=True)
    return out


def parse(text: str, prefix: str = "") -> dict[str, tuple[int, int, float]]:
    """mode -> (bytes, requests, seconds) from ``[PREFIX] iobench MODE BYTES REQUESTS
    SECONDS`` lines."""
    out = {}
    for line in text.replace("\r", "").splitlines():
        words = line.split()
        if prefix:
            if not words or words[0] != prefix:
                continue
            words = words[1:]
        if len(words) == 5 and words[0] == "iobench":
            out[words[1]] = (int(words[2]), int(words[3]), float(words[4]))
    return out


def run_guest(cmd: list[str], what: str) -> dict[str, tuple[int, int, float]]:
    r = subprocess.run(cmd, capture_output=True, env=child_env(), timeout=RUN_TIMEOUT)
    got = parse(r.stdout.decode(errors="replace"), prefix="BENCH")
    if set(got) != {"seqwrite", "seqread", "randread"}:
        tail = (r.stdout + r.stderr).decode(errors="replace")[-1500:]
        raise RuntimeError(f"{what}: exit {r.returncode}, no complete figures:\n{tail}")
    return got


def figures_of(results: dict[str, dict[str, tuple[int, int, float]]]) -> list[Figure]:
    def rate(name: str, mode: str) -> float:
        nbytes, requests, secs = results[name][mode]
        return requests / secs if mode == "randread" else nbytes / secs / (1 << 20)

    figures = []
    for mode, label, unit in (
        ("seqread", "sequential read, 1 MiB requests", "MiB/s"),
        ("seqwrite", "sequential write, 1 MiB requests, then fsync", "MiB/s"),
        ("randread", "random 4 KiB reads", "IOPS"),
    ):
        for base in ("host", "QEMU microvm"):
            if base in results:
                figures.append(
                    Figure(
                        f"{label}: osvmm virtio-blk",
                        unit,
                        Sample.of([rate("osvmm", mode)]),
                        f"{base}" + (" (the file itself, buffered)" if base == "host" else ""),
                        Sample.of([rate(base, mode)]),
                    )
                )
    return figures


# -- the network: guest to host over a tap ---------------------------------------------

NET_MIB = 2
NETNS, TAP = "osvmm-bench", "osvmmbench0"
NET_SCRIPT = f"""#!/bin/sh
# netbench: eth0 up, the host's end answering, then {NET_MIB} MiB to it over TCP.
ip link set eth0 up && ip addr add 10.98.0.2/24 dev eth0
i=0
until ping -c 1 -W 2 10.98.0.1 >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -ge 60 ] && break
done
dd if=/dev/urandom of=/tmp/blob bs=1024 count={NET_MIB * 1024} 2>/dev/null
t0=$(cut -d' ' -f1 /proc/uptime)
busybox nc 10.98.0.1 5000 < /tmp/blob
echo "NET $(wc -c < /tmp/blob) $t0 $(cut -d' ' -f1 /proc/uptime)"
"""
INSIDE = ("ip", "netns", "exec", NETNS)


def make_netns() -> None:
    if not os.path.exists("/dev/net/tun"):
        subprocess.run(["/bin/busybox", "modprobe", "tun"], check=True)
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    for cmd in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "tuntap", "add", TAP, "mode", "tap"],
        ["ip", "addr", "add", "10.98.0.1/24", "dev", TAP],
        ["ip", "link", "set", TAP, "up"],
    ):
        subprocess.run([*INSIDE, *cmd], check=True)


def net_run(cmd: list[str], what: str, tmp: Path) -> float:
    """MiB/s the guest's clock saw for its transfer; the bytes checked on arrival."""
    sink_path = tmp / "received"
    with open(sink_path, "wb") as sink:
        listener = subprocess.Popen(
            [*INSIDE, "busybox", "nc", "-l", "-p", "5000"], stdin=subprocess.PIPE, stdout=sink
        )
    try:
        r = subprocess.run(
            [*INSIDE, *cmd], capture_output=True, env=child_env(), timeout=RUN_TIMEOUT
        )
        listener.wait(timeout=30)
    finally:
        listener.kill()
        listener.wait()
        listener.stdin.close()
    text = r.stdout.decode(errors="replace").replace("\r", "")
    line = next((x.split() for x in text.splitlines() if x.startswith("NET ")), None)
    if line is None or int(line[1]) != sink_path.stat().st_size:
        raise RuntimeError(f"{what}: exit {r.returncode}, no whole transfer:\n{text[-1500:]}")
    return int(line[1]) / (float(line[3]) - float(line[2])) / (1 << 20)


# -- the network: partition to partition --------------------------------------------

P2P_MIB = 2
P2P_PORT = 5000
P2P_TIMEOUT = 900
P2P_SCRIPT = rf"""#!/bin/sh
# p2pbench ADDRESS PEER ROLE: eth0 up with ADDRESS/24. ROLE recv listens on TCP
# port {P2P_PORT} and times {P2P_MIB} MiB from its first byte to its last by this
# guest's clock; ROLE send waits until PEER answers a ping, then sends the bytes.
ip link set eth0 up && ip addr add "$1/24" dev eth0
up() {{ cut -d' ' -f1 /proc/uptime; }}
n={P2P_MIB << 20}
if [ "$3" = recv ]; then
    # nc half-closes when its stdin ends, and the sender's nc stops at that: a
    # stdin that does not end (sleep) keeps it listening until the data does. The
    # first byte is read alone (dd bs=1) to start the clock, the rest counted
    # (head -c) to stop it, whether or not nc ends.
    sleep 600 | busybox nc -l -p {P2P_PORT} | {{
        dd bs=1 count=1 of=/tmp/first 2>/dev/null
        t0=$(up)
        head -c $((n - 1)) > /tmp/rest
        t1=$(up)
        cat /tmp/first /tmp/rest > /tmp/blob
        echo "P2P recv $(wc -c < /tmp/blob) $(md5sum < /tmp/blob | cut -d' ' -f1) $t0 $t1"
        touch /tmp/done
    }} &
    i=0
    while [ ! -e /tmp/done ] && [ $i -lt 600 ]; do sleep 1; i=$((i + 1)); done
    sleep 5  # the last ACKs and the FIN reach the sender before this guest powers off
else
    dd if=/dev/urandom of=/tmp/blob bs=1024 count={P2P_MIB * 1024} 2>/dev/null
    echo "P2P sent $(md5sum < /tmp/blob | cut -d' ' -f1)"
    i=0
    until ping -c 1 -W 2 "$2" >/dev/null 2>&1; do  # the peer may still be booting
        i=$((i + 1)); [ $i -ge 150 ] && break
    done
    t0=$(up)
    i=0
    until busybox nc "$2" {P2P_PORT} < /tmp/blob; do  # nor listening yet
        i=$((i + 1)); [ $i -ge 30 ] && break; sleep 2
    done
    echo "P2P sendtime $t0 $(up)"
    # TCP's segments out and retransmitted (/proc/net/snmp: OutSegs, RetransSegs):
    # frames the path dropped show as retransmissions.
    echo "P2P tcp $(grep '^Tcp:' /proc/net/snmp | tail -1 | cut -d' ' -f12,13)"
fi
"""
P2P_SEND = "10.97.0.1 10.97.0.2 send"
P2P_RECV = "10.97.0.2 10.97.0.1 recv"


def p2p_rate(sender: str, receiver: str, what: str) -> tuple[float, float, str]:
    """MiB/s and seconds the receiver's clock saw, from the two consoles' text;
    the bytes checked whole (size and MD5 against the sender's); the sender's TCP
    segments out and retransmitted."""

    def words(text: str, tag: str) -> list[str] | None:
        for line in text.replace("\r", "").splitlines():
            if line.startswith(f"P2P {tag} "):
                return line.split()[2:]
        return None

    sent, got = words(sender, "sent"), words(receiver, "recv")
    if not sent or not got or int(got[0]) != P2P_MIB << 20 or got[1] != sent[0]:
        raise RuntimeError(
            f"{what}: no whole transfer (sent {sent}, received {got}):\n"
            f"sender: {sender[-1500:]}\nreceiver: {receiver[-1500:]}"
        )
    secs = max(float(got[3]) - float(got[2]), 0.01)  # /proc/uptime counts in 10 ms
    return int(got[0]) / secs / (1 << 20), secs, " ".join(words(sender, "tcp") or ["?"])


def p2p_osvmm(t: Path, initrd: Path) -> tuple[float, float, str]:
    """Two partitions of one ``osvmm up`` on a plan's [[network]] (the VMM's switch),
    each with an L1 CPU of its own, as tests/test_rig_network.py."""

    def part(name: str, cpu: int, args: str) -> str:
        cmdline = f"console=ttyS0 quiet -- /bin/p2pbench {args}"
        return (
            f'[[partition]]\nname = "{name}"\ncpus = "{cpu}"\nmemory = "{MEMORY}"\n'
            f'hugepages = false\nkernel = "{VMLINUX}"\ninitrd = "{initrd}"\n'
            f"cmdline = {json.dumps(cmdline)}\n\n"
        )

    d = t / "p2p-osvmm"
    d.mkdir()
    plan = d / "lan.toml"
    plan.write_text(
        f'[vmm]\ncontrol_socket = "{d}/osvmm.sock"\nlog_dir = "{d}/logs"\n\n'
        + part("sender", 1, P2P_SEND)
        + part("receiver", 2, P2P_RECV)
        + '[[network]]\nname = "lan"\nmembers = ["sender", "receiver"]\n'
    )
    osvmm = [sys.executable, "-m", "osvmm.cli"]
    env = child_env()
    r = subprocess.run([*osvmm, "up", "-d", str(plan)], capture_output=True, env=env, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"osvmm up: exit {r.returncode}: {r.stderr.decode(errors='replace')}")
    logs = {n: d / "logs" / f"{n}.console.log" for n in ("sender", "receiver")}

    def read(name: str) -> str:
        return logs[name].read_text(errors="replace") if logs[name].exists() else ""

    try:
        deadline = time.monotonic() + P2P_TIMEOUT
        while time.monotonic() < deadline:
            if all("[osvmm: ended" in read(n) for n in logs):
                break
            time.sleep(2)
    finally:
        subprocess.run(
            [*osvmm, "down", "--plan", str(plan)], capture_output=True, env=env, timeout=300
        )
    return p2p_rate(read("sender"), read("receiver"), "osvmm")


P2P_NETNS = "osvmm-p2p"
P2P_INSIDE = ("ip", "netns", "exec", P2P_NETNS)


def listening(port: int) -> bool:
    """Whether a TCP socket listens on PORT in P2P_NETNS (from its /proc/net/tcp,
    without connecting: QEMU's socket backend takes the first connection as its peer)."""
    r = subprocess.run([*P2P_INSIDE, "cat", "/proc/net/tcp"], capture_output=True, text=True)
    return any(
        w[1].endswith(f":{port:04X}") and w[3] == "0A"
        for w in (line.split() for line in r.stdout.splitlines()[1:])
    )


def p2p_qemu(t: Path, qemu: list[str], files) -> tuple[float, float, str]:
    """Two QEMU microvm guests, each with virtio-net-device on ``-netdev socket``
    (one listens, the other connects): frames pass between the two QEMUs'
    userspace over a TCP connection on a loopback, in a network namespace of
    their own (L1's own loopback is down: "Network is unreachable")."""
    port = 5555
    d = t / "p2p-qemu"
    d.mkdir()
    procs, outs = {}, {}

    def start(name: str, args: str, mac: str, netdev: str) -> None:
        outs[name] = d / f"{name}.out"
        with open(outs[name], "wb") as out:
            procs[name] = subprocess.Popen(
                [
                    *P2P_INSIDE,
                    *qemu,
                    *files(f"console=ttyS0 quiet -- /bin/p2pbench {args}"),
                    "-netdev",
                    netdev,
                    "-device",
                    f"virtio-net-device,netdev=n0,mac={mac}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(),
            )

    subprocess.run(["ip", "netns", "add", P2P_NETNS], check=True)
    subprocess.run([*P2P_INSIDE, "ip", "link", "set", "lo", "up"], check=True)
    try:
        start("receiver", P2P_RECV, "52:54:00:97:00:02", f"socket,id=n0,listen=127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while not listening(port):
            if time.monotonic() > deadline or procs["receiver"].poll() is not None:
                raise RuntimeError(f"QEMU never listened on {port}: {outs['receiver'].read_text()}")
            time.sleep(0.2)
        start("sender", P2P_SEND, "52:54:00:97:00:01", f"socket,id=n0,connect=127.0.0.1:{port}")
        deadline = time.monotonic() + P2P_TIMEOUT
        while time.monotonic() < deadline:  # on a timeout, p2p_rate shows the consoles
            if all(p.poll() is not None for p in procs.values()):
                break
            time.sleep(2)
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
        subprocess.run(["ip", "netns", "del", P2P_NETNS], check=False)
    text = {n: o.read_bytes().decode(errors="replace") for n, o in outs.items()}
    return p2p_rate(text["sender"], text["receiver"], "QEMU")


# -- vsock: a round trip from a host program to a guest's echo --------------------------

VSOCK_PORT = 5000
ROUND_TRIPS = 200


def round_trips(sock: socket.socket) -> list[float]:
    """Seconds per 64-byte message echoed, ROUND_TRIPS of them."""
    msg, out = b"x" * 64, []
    for _ in range(ROUND_TRIPS):
        t = time.perf_counter()
        sock.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = sock.recv(len(msg) - len(got))
            if not chunk:
                raise RuntimeError("the guest's echo ended early")
            got += chunk
        out.append(time.perf_counter() - t)
    return out


def connect_osvmm(path: str, deadline: float) -> socket.socket:
    """Firecracker's protocol (docs/devices.md): CONNECT PORT until the guest listens."""
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(120)
        try:
            s.connect(path)
            s.sendall(f"CONNECT {VSOCK_PORT}\n".encode())
            line = b""
            while not line.endswith(b"\n") and (c := s.recv(1)):
                line += c
            if line.startswith(b"OK "):
                return s
        except OSError:
            pass
        s.close()
        time.sleep(0.5)
    raise RuntimeError("the guest never listened on its vsock port")


def connect_vhost(cid: int, deadline: float) -> socket.socket:
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.settimeout(120)
        try:
            s.connect((cid, VSOCK_PORT))
            return s
        except OSError:
            s.close()
            time.sleep(0.5)
    raise RuntimeError("the QEMU guest never listened on its vsock port")


def vsock_run(cmd: list[str], connect) -> list[float]:
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    try:
        sock = connect(time.monotonic() + RUN_TIMEOUT)
        try:
            times = round_trips(sock)
        finally:
            sock.close()  # the guest's echo ends, and the guest powers off
        proc.wait(timeout=120)
        return times
    finally:
        proc.kill()
        proc.wait()


def disks(t, initrd, osvmm, qemu, files, no_qemu, log) -> list[Figure]:
    rd = initrd("blkbench", GUEST_SCRIPT, ("osvmm-iobench",), ("virtio_mmio", "virtio_blk"))
    tool = t / "osvmm-iobench"
    image = t / "disk.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_MIB << 20)
    results = {"host": {}}
    for mode, n in (("seqwrite", SEQ_MIB), ("seqread", SEQ_MIB), ("randread", RAND_S)):
        r = subprocess.run([str(tool), mode, str(image), str(n)], capture_output=True)
        results["host"].update(parse(r.stdout.decode()))
    log(f"disk, host: {results['host']}")
    results["osvmm"] = run_guest([*osvmm, *files(rd, APPEND), "--drive", str(image)], "osvmm")
    log(f"disk, osvmm: {results['osvmm']}")
    if not no_qemu:
        drive = ["-drive", f"id=d0,file={image},format=raw,if=none"]
        dev = ["-device", "virtio-blk-device,drive=d0"]
        results["QEMU microvm"] = run_guest([*qemu, *files(rd, APPEND), *drive, *dev], "QEMU")
        log(f"disk, QEMU microvm: {results['QEMU microvm']}")
    return figures_of(results)


def tap_net(t, initrd, osvmm, qemu, files, no_qemu, log) -> Figure:
    """The network: guest to host over a tap, in a network namespace of its own."""
    rd = initrd("netbench", NET_SCRIPT, (), ("virtio_mmio", "virtio_net"))
    append = "console=ttyS0 quiet -- /bin/netbench"
    make_netns()
    try:
        mine = net_run([*osvmm, *files(rd, append), "--net", f"tap={TAP}"], "osvmm", t)
        log(f"net, osvmm: {mine:.3f} MiB/s")
        base = None
        if not no_qemu:
            netdev = ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no"]
            dev = ["-device", "virtio-net-device,netdev=n0"]
            base = net_run([*qemu, *files(rd, append), *netdev, *dev], "QEMU", t)
            log(f"net, QEMU microvm: {base:.3f} MiB/s")
        return Figure(
            f"TCP guest to host over a tap, {NET_MIB} MiB: osvmm virtio-net",
            "MiB/s",
            Sample.of([mine]),
            "QEMU microvm virtio-net-device on the same tap" if base else None,
            Sample.of([base]) if base else None,
        )
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=False)


def p2p_net(t, initrd, qemu, files, no_qemu, log) -> Figure:
    """The network partition to partition: osvmm's switch against two QEMUs on
    ``-netdev socket``, the receiver's clock."""
    rd = initrd("p2pbench", P2P_SCRIPT, (), ("virtio_mmio", "virtio_net"))
    mine, secs, tcp = p2p_osvmm(t, rd)
    log(f"p2p, osvmm: {mine:.3f} MiB/s ({secs:.2f} s; sender's TCP out, retransmitted: {tcp})")
    base = None
    if not no_qemu:
        base, secs, tcp = p2p_qemu(t, qemu, lambda append: files(rd, append))
        log(f"p2p, QEMU microvm: {base:.3f} MiB/s ({secs:.2f} s; TCP out, retransmitted: {tcp})")
    return Figure(
        f"TCP partition to partition, {P2P_MIB} MiB: osvmm's switch (a plan's [[network]])",
        "MiB/s",
        Sample.of([mine]),
        "two QEMU microvm, virtio-net-device on -netdev socket" if base else None,
        Sample.of([base]) if base else None,
    )


def vsock(t, initrd, osvmm, qemu, files, no_qemu, log) -> Figure:
    """64-byte round trips from a host program to the guest's echo."""
    from osvmm.boot import kmodules

    append = "console=ttyS0 quiet -- /bin/vsockbench"
    script = f"#!/bin/sh\nexec /bin/osvmm-vsock listen {VSOCK_PORT}\n"  # echoes until EOF
    rd = initrd("vsockbench", script, ("osvmm-vsock",), kmodules.VIRTIO_VSOCK_MODULES)
    uds = str(t / "v.sock")
    mine_rt = vsock_run(
        [*osvmm, *files(rd, append), "--vsock", f"uds={uds}"],
        lambda deadline: connect_osvmm(uds, deadline),
    )
    log(f"vsock, osvmm: median {sorted(mine_rt)[len(mine_rt) // 2] * 1e3:.2f} ms")
    base_rt = None
    vhost = subprocess.run(["/bin/busybox", "modprobe", "vhost_vsock"], capture_output=True)
    if not no_qemu and vhost.returncode == 0 and os.path.exists("/dev/vhost-vsock"):
        base_rt = vsock_run(
            [*qemu, *files(rd, append), "-device", "vhost-vsock-device,guest-cid=3"],
            lambda deadline: connect_vhost(3, deadline),
        )
    elif not no_qemu:
        log("no /dev/vhost-vsock here: the vsock figure has no QEMU baseline")
    return Figure(
        f"vsock round trip, 64 bytes, {ROUND_TRIPS} of them: osvmm (Unix socket, CONNECT)",
        "ms",
        Sample.of([x * 1e3 for x in mine_rt]),
        "QEMU microvm vhost-vsock-device (AF_VSOCK)" if base_rt else None,
        Sample.of([x * 1e3 for x in base_rt]) if base_rt else None,
    )


PARTS = ("disk", "net", "p2p", "vsock")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m bench.rig_devices", description=__doc__.split("\n")[0]
    )
    p.add_argument("--no-qemu", action="store_true", help="skip the QEMU comparisons")
    p.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)",
    )
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    if not only <= set(PARTS):
        p.error(f"--only: unknown parts {sorted(only - set(PARTS))}; choose from {PARTS}")

    def log(msg: str) -> None:
        print(f"rig_devices: {msg}", file=sys.stderr, flush=True)

    if not VMLINUX.exists():
        log(f"no Debian kernel at {VMLINUX}: run scripts/fetch-debian-kernel --modules")
        return 2
    from osvmm.boot import kmodules
    from osvmm.boot.initramfs import build_initramfs

    osvmm = [sys.executable, "-m", "osvmm.cli", "run", "--memory", MEMORY, "--cpus", "1"]
    qemu = [*QEMU_COMMON[:1], "-M", "microvm", *QEMU_COMMON[1:]]
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="osvmm-rig-devices-") as tmp:
        t = Path(tmp)
        moddir = kmodules.module_dir(VMLINUX.resolve().parent / "modules")

        def initrd(name: str, script: str, tools: tuple[str, ...], modules) -> Path:
            path = t / name
            path.write_text(script)
            path.chmod(0o755)
            extra = [(path, f"/bin/{name}")]
            extra += [(build_tool(t / tool, tool), f"/bin/{tool}") for tool in tools]
            return build_initramfs(
                t / f"{name}.cpio",
                extra_files=extra,
                modules=kmodules.module_members(moddir, modules),
            )

        def files(rd: Path, append: str) -> list[str]:
            return ["-kernel", str(VMLINUX), "-initrd", str(rd), "-append", append]

        if "disk" in only:
            figures += disks(t, initrd, osvmm, qemu, files, args.no_qemu, log)
        if "net" in only:
            figures.append(tap_net(t, initrd, osvmm, qemu, files, args.no_qemu, log))
        if "p2p" in only:
            figures.append(p2p_net(t, initrd, qemu, files, args.no_qemu, log))
        if "vsock" in only:
            figures.append(vsock(t, initrd, osvmm, qemu, files, args.no_qemu, log))
    report(figures, "figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
