"""Disks inside the rig: a Linux partition's virtio-blk against the same image
read and written on the host directly, and under QEMU.

    scripts/hwvirt-rig run -v --cpus 5 --timeout 1800 -- python3 -m bench.rig_devices

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
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, Figure, Sample
from bench.rig_linux import QEMU_COMMON, VMLINUX, child_env, markdown

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


def build_tool(out: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("no gcc to build tools/osvmm-iobench.c")
    src = REPO / "tools" / "osvmm-iobench.c"
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m bench.rig_devices", description=__doc__.split("\n")[0]
    )
    p.add_argument("--no-qemu", action="store_true", help="skip the QEMU comparison")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"rig_devices: {msg}", file=sys.stderr, flush=True)

    if not VMLINUX.exists():
        log(f"no Debian kernel at {VMLINUX}: run scripts/fetch-debian-kernel --modules")
        return 2
    from osvmm.boot import kmodules
    from osvmm.boot.initramfs import build_initramfs

    with tempfile.TemporaryDirectory(prefix="osvmm-rig-devices-") as tmp:
        t = Path(tmp)
        tool = build_tool(t / "osvmm-iobench")
        script = t / "blkbench"
        script.write_text(GUEST_SCRIPT)
        script.chmod(0o755)
        moddir = kmodules.module_dir(VMLINUX.resolve().parent / "modules")
        initrd = build_initramfs(
            t / "initrd.cpio",
            extra_files=[(tool, "/bin/osvmm-iobench"), (script, "/bin/blkbench")],
            modules=kmodules.module_members(moddir, ("virtio_mmio", "virtio_blk")),
        )
        image = t / "disk.img"
        with open(image, "wb") as f:
            f.truncate(IMAGE_MIB << 20)
        results = {}
        host = {}
        for mode, n in (("seqwrite", SEQ_MIB), ("seqread", SEQ_MIB), ("randread", RAND_S)):
            r = subprocess.run([str(tool), mode, str(image), str(n)], capture_output=True)
            host.update(parse(r.stdout.decode()))
        results["host"] = host
        log(f"host: {host}")
        files = ["-kernel", str(VMLINUX), "-initrd", str(initrd), "-append", APPEND]
        osvmm = [sys.executable, "-m", "osvmm.cli", "run", "--memory", MEMORY, "--cpus", "1"]
        results["osvmm"] = run_guest([*osvmm, *files, "--drive", str(image)], "osvmm")
        log(f"osvmm: {results['osvmm']}")
        if not args.no_qemu:
            qemu = [
                *QEMU_COMMON[:1],
                "-M",
                "microvm",
                *QEMU_COMMON[1:],
                *files,
                "-drive",
                f"id=d0,file={image},format=raw,if=none",
                "-device",
                "virtio-blk-device,drive=d0",
            ]
            results["QEMU microvm"] = run_guest(qemu, "QEMU")
            log(f"QEMU microvm: {results['QEMU microvm']}")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    inside = "inside scripts/hwvirt-rig" if os.environ.get("OSVMM_RIG") == "1" else "on this host"
    print(f"Measured {when} {inside}, Linux {platform.release()}, {os.cpu_count()} CPUs.")
    print("Absolute figures in the rig are emulated: read the ratios.\n")
    print(markdown(figures_of(results)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
