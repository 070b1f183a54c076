"""Build the bundled bare-metal guests with gcc.

The guests are small ELF images built from ``src/`` with the machine's gcc
and binutils. A build is cached under ``$OSVMM_CACHE/guests/<hash>/`` (or
``~/.cache/osvmm/guests/<hash>/``) where the hash covers every source file,
the flags and the compiler's path, so a changed source builds anew. A build
happens in a private temporary directory that is renamed into place in one
step, so concurrent test processes never see half a build.
``build_host_program`` gives the same cache to a one-file C program outside
the package (bench/floor.py builds the kvm_floor benchmark with it).

    python3 -m osvmm.guests.build [NAME...]     # build, print the image paths
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from osvmm.errors import BuildError, ConfigError, OsvmmError

SRC_DIR = Path(__file__).resolve().parent / "src"

CFLAGS = (
    "-std=gnu11",
    "-O2",
    "-m64",
    "-ffreestanding",
    "-nostdlib",
    "-fno-builtin",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-Wall",
    "-Wextra",
    "-Wa,--noexecstack",
)
LDFLAGS = (
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=4096",
    "-Wl,-z,noexecstack",
)
RUNTIME_SOURCES = ("entry.S", "rt.c")


@dataclass(frozen=True)
class GuestSpec:
    """How one guest image is linked: its own sources and its entry."""

    sources: tuple[str, ...]
    entry: str  # ELF e_entry symbol
    pvh: bool  # carries the XEN_ELFNOTE_PHYS32_ENTRY note


GUESTS: dict[str, GuestSpec] = {
    "hello": GuestSpec(("hello.c",), "pvh_entry", True),
    "smp": GuestSpec(("smp.c", "ap_tramp.S"), "pvh_entry", True),
    "compute": GuestSpec(("compute.c",), "pvh_entry", True),
    "ioloop": GuestSpec(("ioloop.c",), "pvh_entry", True),
    "triplefault": GuestSpec(("triplefault.c",), "pvh_entry", True),
    "hello64": GuestSpec(("hello64.c",), "entry64", False),
    "counter": GuestSpec(("counter.c",), "pvh_entry", True),
    # Every vCPU counting at CPL3, the PIT and the LAPIC timer interrupting (snapshots).
    "ticker": GuestSpec(("ticker.c", "ap_tramp.S", "hcirq.c"), "pvh_entry", True),
    # Memory rewritten pass after pass, each page checked (snapshots, migrations).
    "memtouch": GuestSpec(("memtouch.c",), "pvh_entry", True),
    # The PC platform as the tables describe it (TSC-deadline CPUID, PIT on pin 2).
    "platform": GuestSpec(("platform.c", "hcirq.c"), "pvh_entry", True),
    # Hypercall guests (docs/hypercalls.md); hcirq.c: doorbell interrupts.
    "hcinfo": GuestSpec(("hcinfo.c",), "pvh_entry", True),
    "ping": GuestSpec(("ping.c", "hcirq.c"), "pvh_entry", True),
    "pong": GuestSpec(("pong.c", "hcirq.c"), "pvh_entry", True),
    "intruder": GuestSpec(("intruder.c",), "pvh_entry", True),
    "hcfuzz": GuestSpec(("hcfuzz.c",), "pvh_entry", True),
    "hcloop": GuestSpec(("hcloop.c",), "pvh_entry", True),
    # What an earlier boot of a partition kept built left behind (vmm/reset.py).
    "leftover": GuestSpec(("leftover.c",), "pvh_entry", True),
    # A virtio-blk driver at CPL0 on the first virtio-mmio device (docs/devices.md).
    "virtioblk": GuestSpec(("virtioblk.c", "hcirq.c"), "pvh_entry", True),
    # A virtio-net driver at CPL0: two of them on a plan's network (docs/devices.md).
    "virtionet": GuestSpec(("virtionet.c", "hcirq.c"), "pvh_entry", True),
    # A virtio-vsock driver at CPL0: streams to and from the host (docs/devices.md).
    "virtiovsock": GuestSpec(("virtiovsock.c", "hcirq.c"), "pvh_entry", True),
    # The write monitor's kernel with a driver (docs/write-monitor.md).
    "wmkernel": GuestSpec(("wmkernel.c",), "pvh_entry", True),
}
GUEST_NAMES: tuple[str, ...] = tuple(GUESTS)

# The reference the bundled guests are written and tested against: QEMU's
# microvm booting a PVH image (add "-kernel IMAGE", "-append", "-smp"). The
# differential tests and the benchmarks run it; osvmm must match it.
QEMU_MICROVM: tuple[str, ...] = (
    "qemu-system-x86_64",
    "-accel",
    "kvm",
    "-M",
    "microvm",
    "-m",
    "64",
    "-nodefaults",
    "-nographic",
    "-serial",
    "stdio",
    "-no-reboot",
    "-device",
    "isa-debug-exit,iobase=0xf4",
)


def cache_root() -> Path:
    """$OSVMM_CACHE, else ~/.cache/osvmm."""
    env = os.environ.get("OSVMM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "osvmm"


def find_compiler() -> str:
    """The C compiler: $CC if set, else gcc on PATH."""
    cc = os.environ.get("CC") or "gcc"
    path = shutil.which(cc)
    if path is None:
        raise BuildError("no C compiler found: install gcc (Debian package build-essential)")
    return path


def guest_path(name: str) -> Path:
    """The image of guest ``name``, building every guest first if needed."""
    if name not in GUESTS:
        raise ConfigError(f"unknown guest {name!r}: choose from {', '.join(GUEST_NAMES)}")
    return build_guests() / f"{name}.elf"


def build_guests() -> Path:
    """Build all guests (or find them in the cache); return their directory."""
    cc = find_compiler()
    sources = sorted(p for p in SRC_DIR.iterdir() if p.is_file())
    digest = _digest(cc, CFLAGS, LDFLAGS, repr(sorted(GUESTS.items())), *sources)
    return _cached_build(cache_root() / "guests" / digest, lambda tmp: _build_guests(cc, tmp))


def build_host_program(source: Path, cflags: Sequence[str], kind: str) -> Path:
    """Compile the one-file C program ``source`` for the host (or find it cached).

    The program is cached under ``cache_root()/kind/<hash>/`` (the hash covers
    the source, the flags and the compiler's path) and named after the
    source's stem; its path is returned.
    """
    if not source.is_file():
        raise BuildError(f"{source.name} not found at {source}")
    cc = find_compiler()
    name = source.stem
    out = _cached_build(
        cache_root() / kind / _digest(cc, tuple(cflags), source),
        lambda tmp: _run([cc, *cflags, str(source), "-o", str(tmp / name)], tmp, name),
    )
    return out / name


def _digest(cc: str, *parts: object) -> str:
    h = hashlib.sha256()
    h.update(cc.encode())
    for part in parts:
        h.update(b"\0")
        if isinstance(part, Path):
            h.update(part.name.encode() + b"\0" + part.read_bytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:16]


def _cached_build(final: Path, build) -> Path:
    """Return ``final`` if present, else build into a temp dir and rename it there."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    except OSError as e:
        raise BuildError(f"cannot write the build cache {final.parent}: {e.strerror}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_guests(cc: str, out: Path) -> None:
    # One compiler run for every source; objects land in `out` by basename.
    srcs = sorted(str(p) for p in SRC_DIR.iterdir() if p.suffix in (".c", ".S"))
    _run([cc, *CFLAGS, "-c", *srcs], out, "guest runtime")
    runtime = [str(out / (Path(s).stem + ".o")) for s in RUNTIME_SOURCES]
    for name, spec in GUESTS.items():
        objs = list(runtime)
        if spec.pvh:
            objs.append(str(out / "pvh_note.o"))
        objs += [str(out / (Path(s).stem + ".o")) for s in spec.sources]
        cmd = [cc, *LDFLAGS, f"-Wl,-T,{SRC_DIR / 'guest.ld'}", f"-Wl,-e,{spec.entry}"]
        _run([*cmd, *objs, "-o", str(out / f"{name}.elf")], out, f"guest {name}")


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as e:
        raise BuildError(f"cannot run {cmd[0]}: {e.strerror}") from e
    except subprocess.TimeoutExpired as e:
        raise BuildError(f"building {what} took over 120 s") from e
    if proc.returncode != 0:
        raise BuildError(f"building {what} failed: {_first_error(proc.stderr)}")


def _first_error(stderr: str) -> str:
    """The first "error:" line of a compiler's output, source paths shortened."""
    stderr = stderr.replace(f"{SRC_DIR}/", "")
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if "error:" in ln or "Error:" in ln:
            return ln
    return lines[0] if lines else "no message from the compiler"


def main(argv: list[str] | None = None) -> int:
    names = sys.argv[1:] if argv is None else argv
    try:
        for name in names or GUEST_NAMES:
            print(guest_path(name))
    except OsvmmError as e:
        print(f"osvmm: {e}", file=sys.stderr)
        return e.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
