"""Mutated inputs: the loaders and the plan parser end every input quickly, in bounded
memory, with nothing but an OsvmmError.

Valid seeds (PVH ELF64 and ELF32, plain ELF64, a vmlinux, a bzImage, a kernel with an
initrd; the example plans) are mutated by bit flips, truncations, deletions, inserted
bytes and interesting values written over header fields, and run through what osvmm
does with a user's file: ``read_boot_source`` then ``prepare`` for a Machine, and
``load_plan`` then ``place`` on a fixture host. Each input must be handled within
2 s and 32 MiB of Python allocations beyond twice its size, and raise nothing but
an OsvmmError with a one-line message.
"""

from __future__ import annotations

import os
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osvmm.arch.x86.layout import MMIO_HOLE_START, PAGE_SIZE
from osvmm.boot.image import NO_QUIRKS, read_boot_source
from osvmm.boot.prepare import prepare
from osvmm.errors import ImageError, OsvmmError
from osvmm.loader.bzimage import extract_vmlinux
from osvmm.loader.initrd import place_initrd
from osvmm.machine import Machine
from osvmm.plan.config import load_plan
from osvmm.plan.placement import place
from osvmm.plan.topology import read_topology
from tests.test_inputs_bounded import within
from tests.test_loader_bzimage import VMLINUX, bzimage
from tests.test_loader_elf import EM_386, elf, note, pvh_note

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
TIME_LIMIT = 2.0  # seconds per input
MEMORY_LIMIT = 32 * MiB  # peak Python allocations per input, beyond twice its size

# OSVMM_FUZZ_EXAMPLES=5000 for a longer search than the suite's.
EXAMPLES = int(os.environ.get("OSVMM_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

IMAGE_SEEDS = {
    "pvh64": elf(notes=pvh_note(0x100000)),
    "pvh64-desc8": elf(
        notes=note(b"GNU", 3, b"abc") + pvh_note(0x100010, size=8),
        segments=[
            {"paddr": 0x100000, "data": b"\xf4" * 64, "memsz": 0x3000},
            {"paddr": 0x200000, "vaddr": 0xFFFF800000200000, "data": b"\x90" * 32},
        ],
    ),
    "pvh32": elf(cls=32, machine=EM_386, notes=pvh_note(0x100008)),
    "elf64": elf(entry=0x100004, segments=[{"paddr": 0x100000, "data": b"\x90" * 48}]),
    "vmlinux": VMLINUX,
    "bzimage": bzimage(),
}
PLAN_SEEDS = [p.read_bytes() for p in sorted((REPO / "examples").glob("*.toml"))] + [
    b'[vmm]\ncontrol_socket = "s"\n[[partition]]\nname = "a"\ncpus = "0-1"\nmemory = "16M"\n'
    b'kernel = "k"\ninitrd = "i"\ncmdline = "console=ttyS0"\nrestart = "restart"\n'
    b'doorbells = ["b"]\nprivileged = true\n[[partition]]\nname = "b"\ncpus = 1\n'
    b'memory = 16777216\nimage = "guests:hello"\nrestart_limit = 3\n'
    b'[[channel]]\nname = "c"\nsize = "64K"\n'
    b'members = { a = "rw", b = "ro" }\n'
]
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF]
INTERESTING += [0x100000, 0xC000_0000, 1 << 32, 1 << 63, (1 << 64) - 1]
TOKENS = [b"[", b"]", b"[[", b"{", b"}", b"=", b'"', b"'", b"\n", b"-", b",", b"\\", b"#"]
TOKENS += [b"99999999999999999999", b"0-99999999999", b"[[partition]]\n", b"[[channel]]\n"]
TOKENS += [b"1e999", b"\xff\xfe", b"\0", b"floating", b"guests:", b"~/", b"../" * 8]

MACHINES = [Machine.build(64 * MiB, 1), Machine.build(3 * 1024 * MiB + 2 * MiB, 2)]


@st.composite
def mutations(draw, seed: bytes, tokens: list[bytes] | None = None) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        # Half the edits land in the first 0x300 bytes: the ELF, program and setup headers.
        hi = min(len(data), 0x300) if draw(st.booleans()) else len(data)
        pos = draw(st.integers(0, hi - 1))
        kind = draw(st.sampled_from(["flip", "truncate", "delete", "insert", "value"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif kind == "insert":
            chunk = draw(st.sampled_from(tokens) if tokens else st.binary(min_size=1, max_size=16))
            data[pos:pos] = chunk * draw(st.integers(1, 4))
        else:
            value = draw(st.sampled_from(INTERESTING))
            width = draw(st.sampled_from([1, 2, 4, 8]))
            raw = struct.pack("<Q", value & ((1 << 64) - 1))[:width]
            data[pos : pos + width] = raw
    return bytes(data)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="osvmm-fuzz-") as d:
        yield Path(d)


def bounded(run, size: int = 0) -> None:
    """Run ``run()`` on an input of ``size`` bytes: OsvmmError is fine; anything else,
    more than 2 s, or more than 32 MiB of allocations beyond twice the input, is a failure."""
    tracemalloc.start()
    try:
        with within(TIME_LIMIT):
            try:
                run()
            except OsvmmError as err:
                message = str(err)
                assert message and "\n" not in message, repr(message)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT + 2 * size, f"{peak >> 20} MiB allocated for {size} bytes"


def boot(path: Path, kind: str, machine: Machine, initrd: Path | None = None) -> None:
    if kind in ("vmlinux", "bzimage"):
        source = read_boot_source(kernel=str(path), initrd=str(initrd) if initrd else None)
    else:
        source = read_boot_source(image=str(path))
    image = prepare(source, machine, "console=ttyS0", NO_QUIRKS)
    assert image.writes and all(machine_contains(machine, g, len(d)) for g, d in image.writes)


def machine_contains(machine: Machine, gpa: int, size: int) -> bool:
    return any(s <= gpa and gpa + size <= s + n for s, n in machine.ram_ranges)


@st.composite
def mutated_images(draw):
    kind = draw(st.sampled_from(sorted(IMAGE_SEEDS)))
    return kind, draw(mutations(IMAGE_SEEDS[kind]))


@FUZZ
@given(mutated_images(), st.sampled_from(range(len(MACHINES))))
def test_mutated_images_load_or_fail_cleanly(scratch, case, machine_index):
    kind, data = case
    path = scratch / f"image-{kind}"
    path.write_bytes(data)
    bounded(lambda: boot(path, kind, MACHINES[machine_index]), len(data))


@settings(FUZZ, max_examples=max(10, EXAMPLES // 5))
@given(st.sampled_from(["vmlinux", "bzimage"]), st.integers(1, 80 * MiB))
def test_kernel_with_an_initrd_of_any_size_places_it_or_fails_cleanly(scratch, kind, size):
    kernel = scratch / f"kernel-{kind}"
    kernel.write_bytes(IMAGE_SEEDS[kind])
    initrd = scratch / "initrd"
    with open(initrd, "wb") as f:
        f.truncate(size)  # sparse
    bounded(lambda: boot(kernel, kind, MACHINES[0], initrd), size)


@FUZZ
@given(mutations(IMAGE_SEEDS["bzimage"]))
def test_mutated_bzimage_payloads_extract_or_fail_cleanly(data):
    bounded(lambda: extract_vmlinux(data, "fuzz"), len(data))


@FUZZ
@given(
    ram_top=st.integers(0, 1 << 40),
    length=st.integers(-1, 1 << 40),
    addr_max=st.integers(0, (1 << 32) - 1),
    kernel_end=st.integers(0, 1 << 40),
)
def test_initrd_placement_obeys_the_boot_protocol(ram_top, length, addr_max, kernel_end):
    try:
        addr = place_initrd(ram_top, length, addr_max, kernel_end)
    except ImageError as err:
        assert "\n" not in str(err)
        return
    assert addr % PAGE_SIZE == 0 and addr >= kernel_end
    assert addr + length <= min(ram_top, addr_max + 1, MMIO_HOLE_START)


TOPOLOGIES = [
    read_topology(str(REPO / "tests" / "fixtures" / "sysfs" / name))
    for name in ("small-2cpu", "opteron-8node")
]


@FUZZ
@given(st.sampled_from(range(len(PLAN_SEEDS))), st.data(), st.sampled_from([0, 1]))
def test_mutated_plans_parse_or_fail_cleanly(scratch, seed, data, host):
    text = data.draw(mutations(PLAN_SEEDS[seed], TOKENS))
    path = scratch / "plan.toml"
    path.write_bytes(text)

    def run() -> None:
        place(load_plan(path), TOPOLOGIES[host])

    bounded(run, len(text))
