"""Inside the hardware-virtualization rig: Debian's stock kernel finds osvmm's
virtio-blk disks through the DSDT (LNRO0005), with its own virtio_mmio and
virtio_blk modules loaded from the initramfs, and uses them: reads what the host
wrote, writes raw sectors, is refused writes on a read-only disk, discards,
makes an ext2 file system, writes a file, and reads it back after the partition
is started again. Interrupts arrive on I/O APIC pins 5, 6, 7, edge-triggered.
(scripts/hwvirt-rig, docs/testing.md; docs/devices.md.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import VMLINUX, run_osvmm, tap_in_netns

pytestmark = pytest.mark.rig

MARKER = b"osvmm disk image"
RO_BYTES = bytes(range(256)) * 4096  # 1 MiB

SCRIPT = r"""#!/bin/sh
case "$1" in
first)
    echo "disktest: serial $(cat /sys/block/vda/serial) $(cat /sys/block/vdb/serial)"
    echo "disktest: ro $(cat /sys/block/vda/ro) $(cat /sys/block/vdb/ro)"
    echo "disktest: sectors $(cat /sys/block/vda/size)"
    echo "disktest: sector0 $(head -c 16 /dev/vda)"
    printf 'written by linux' | dd of=/dev/vda bs=512 seek=1 conv=sync,fsync 2>/dev/null
    echo "disktest: readback $(dd if=/dev/vda bs=512 skip=1 count=1 2>/dev/null | head -c 16)"
    if dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then
        echo "disktest: vdb written"
    else
        echo "disktest: vdb refused"
    fi
    if blkdiscard -o 1048576 -l 1048576 /dev/vda; then
        echo "disktest: discard ok"
    else
        echo "disktest: discard failed"
    fi
    mke2fs -q /dev/vdc >/dev/null 2>&1 || mke2fs /dev/vdc
    mkdir -p /mnt
    mount -t ext2 /dev/vdc /mnt && echo "kept across a restart" > /mnt/file && sync &&
        umount /mnt && echo "disktest: file written"
    grep virtio /proc/interrupts | sed 's/^ */disktest: irq /'
    ;;
net)
    echo "disktest: mac $(cat /sys/class/net/eth0/address)"
    ip link set eth0 up && ip addr add 10.99.0.2/24 dev eth0
    ping -c 3 -W 10 10.99.0.1 | sed -n 's/.* \([0-9]*\) packets received.*/disktest: ping \1/p'
    dd if=/dev/urandom of=/tmp/blob bs=1024 count=1024 2>/dev/null
    echo "disktest: sent $(md5sum < /tmp/blob | cut -d' ' -f1)"
    t0=$(cut -d' ' -f1 /proc/uptime)
    busybox nc 10.99.0.1 5000 < /tmp/blob
    echo "disktest: sendtime $t0 $(cut -d' ' -f1 /proc/uptime)"
    grep virtio /proc/interrupts | sed 's/^ */disktest: irq /'
    ;;
second)
    mkdir -p /mnt
    mount -t ext2 -o ro /dev/vdc /mnt && echo "disktest: file $(cat /mnt/file)"
    echo "disktest: sector1 $(dd if=/dev/vda bs=512 skip=1 count=1 2>/dev/null | head -c 16)"
    ;;
esac
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    if not VMLINUX.exists():
        pytest.skip(f"no Debian kernel at {VMLINUX}: scripts/fetch-debian-kernel --modules")
    from osvmm.boot import kmodules
    from osvmm.boot.initramfs import build_initramfs

    tmp = tmp_path_factory.mktemp("disks")
    script = tmp / "disktest"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    moddir = kmodules.module_dir(VMLINUX.resolve().parent / "modules")
    # ext4 (it mounts ext2) needs a crc32c driver, which it asks for by name.
    wanted = (*kmodules.VIRTIO_DISK_MODULES, "ext4", "crc32c_generic", "virtio_net")
    initrd = build_initramfs(
        tmp / "initrd.cpio",
        extra_files=[(script, "/bin/disktest")],
        modules=kmodules.module_members(moddir, wanted),
    )
    (tmp / "raw.img").write_bytes(MARKER.ljust(512, b"\0") + bytes((8 << 20) - 512))
    (tmp / "ro.img").write_bytes(RO_BYTES)
    (tmp / "fs.img").write_bytes(bytes(16 << 20))
    return tmp, initrd


def boot(tmp: Path, initrd: Path, mode: str, *extra: str, prefix=()) -> list[str]:
    r = run_osvmm(
        "run",
        "--kernel",
        str(VMLINUX),
        "--initrd",
        str(initrd),
        "--memory",
        "256M",
        "--drive",
        str(tmp / "raw.img"),
        "--drive",
        f"{tmp / 'ro.img'},ro",
        "--drive",
        str(tmp / "fs.img"),
        "--append",
        f"console=ttyS0 panic=-1 -- /bin/disktest {mode}",
        *extra,
        timeout=400,
        prefix=prefix,
    )
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, out[-3000:] + r.stderr.decode(errors="replace")
    assert "osvmm-initramfs: exit 0" in out, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("disktest: ")]
    return Output(lines, out)


class Output(list):
    """The disktest lines, with the whole console kept for a failure's message."""

    def __init__(self, lines, console):
        super().__init__(lines)
        self.console = console

    def __repr__(self):
        return f"{list(self)!r}\n--- console ---\n{self.console[-4000:]}"


def test_linux_uses_its_disks_and_finds_them_again_after_a_restart(files):
    from osvmm.vmm.blockfile import open_drive

    tmp, initrd = files
    probe = open_drive(str(tmp / "raw.img"), readonly=False)
    can_discard = probe.can_discard
    probe.close()

    first = boot(tmp, initrd, "first")
    assert first[:7] == [
        "disktest: serial osvmm-vda osvmm-vdb",
        "disktest: ro 0 1",
        f"disktest: sectors {(8 << 20) // 512}",
        f"disktest: sector0 {MARKER.decode()}",
        "disktest: readback written by linux",
        "disktest: vdb refused",
        f"disktest: discard {'ok' if can_discard else 'failed'}",
    ], first
    assert "disktest: file written" in first, first
    irqs = {line.split()[-1]: line.split() for line in first if line.startswith("disktest: irq")}
    assert set(irqs) == {"virtio0", "virtio1", "virtio2"}, first
    for name, pin in (("virtio0", "5-edge"), ("virtio1", "6-edge"), ("virtio2", "7-edge")):
        assert pin in irqs[name] and int(irqs[name][3]) > 0, irqs[name]

    raw = (tmp / "raw.img").read_bytes()
    assert raw[:16] == MARKER and raw[512:528] == b"written by linux"
    if can_discard:
        assert raw[1 << 20 : 2 << 20] == bytes(1 << 20)
    assert (tmp / "ro.img").read_bytes() == RO_BYTES

    second = boot(tmp, initrd, "second")
    assert second == [
        "disktest: file kept across a restart",
        "disktest: sector1 written by linux",
    ], second


TAP = "osvmmrig0"
NETNS = "osvmm-rig"


def test_linux_pings_the_host_over_a_tap_and_sends_it_a_file(files):
    """The host's end in a network namespace the test makes (``ip netns``): the
    tap, its address, osvmm and the host's listener all in it, so that nothing of
    the test reaches the machine's own network."""
    import hashlib
    import subprocess

    from osvmm.vmm.tap import default_mac

    tmp, initrd = files
    received = tmp / "received"
    with tap_in_netns(NETNS, TAP, "10.99.0.1/24") as inside:
        # The host's end of the transfer: busybox nc, its stdin a pipe kept open (an
        # nc whose stdin ends half-closes the connection: docs/testing.md).
        with open(received, "wb") as sink:
            listener = subprocess.Popen(
                [*inside, "busybox", "nc", "-l", "-p", "5000"], stdin=subprocess.PIPE, stdout=sink
            )
        try:
            out = boot(tmp, initrd, "net", "--net", f"tap={TAP}", prefix=inside)
            listener.wait(timeout=30)  # it ends with the guest's data
        finally:
            listener.kill()
            listener.wait()
            listener.stdin.close()
        mac = ":".join(f"{b:02x}" for b in default_mac(TAP))
        assert out[:2] == [f"disktest: mac {mac}", "disktest: ping 3"], out
        sent = next(line.split()[2] for line in out if line.startswith("disktest: sent "))
        assert received.stat().st_size == 1 << 20, out
        assert hashlib.md5(received.read_bytes()).hexdigest() == sent, out
        start, end = (
            float(x) for x in next(w for w in out if w.startswith("disktest: sendtime")).split()[2:]
        )
        print(f"1 MiB guest to host over the tap in {end - start:.1f} s of the guest's uptime")
        irq = [line.split() for line in out if line.endswith("virtio3")]
        assert irq and "10-edge" in irq[0] and int(irq[0][3]) > 0, out  # the 4th slot
