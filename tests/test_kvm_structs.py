"""Differential test: osvmm's ctypes mirrors of <linux/kvm.h> against the kernel headers.

A C program generated from the Python mirrors prints, for every structure,
its size and the offset and size of every field (recursively through nested
structures and unions), and the value of every ioctl number, capability and
KVM_* constant osvmm defines. gcc compiles it against the installed
<linux/kvm.h> (Debian: linux-libc-dev); the test compares each number with
ctypes' view of the same thing.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from osvmm.kvm import ioctls
from osvmm.kvm import structs as s

# Python mirror -> C struct name.
MIRRORS = {
    s.kvm_userspace_memory_region: "kvm_userspace_memory_region",
    s.kvm_dirty_log: "kvm_dirty_log",
    s.kvm_dirty_gfn: "kvm_dirty_gfn",
    s.kvm_regs: "kvm_regs",
    s.kvm_segment: "kvm_segment",
    s.kvm_dtable: "kvm_dtable",
    s.kvm_sregs: "kvm_sregs",
    s.kvm_vcpu_events: "kvm_vcpu_events",
    s.kvm_sync_regs: "kvm_sync_regs",
    s.kvm_cpuid_entry2: "kvm_cpuid_entry2",
    s.kvm_cpuid2_header: "kvm_cpuid2",
    s.kvm_irq_level: "kvm_irq_level",
    s.kvm_pit_config: "kvm_pit_config",
    s.kvm_irq_routing_irqchip: "kvm_irq_routing_irqchip",
    s.kvm_irq_routing_entry: "kvm_irq_routing_entry",
    s.kvm_irq_routing_header: "kvm_irq_routing",
    s.kvm_msi: "kvm_msi",
    s.kvm_irqfd: "kvm_irqfd",
    s.kvm_ioeventfd: "kvm_ioeventfd",
    s.kvm_mp_state: "kvm_mp_state",
    s.kvm_lapic_state: "kvm_lapic_state",
    s.kvm_msr_entry: "kvm_msr_entry",
    s.kvm_msrs_header: "kvm_msrs",
    s.kvm_enable_cap: "kvm_enable_cap",
    s.kvm_stats_header: "kvm_stats_header",
    s.kvm_stats_desc: "kvm_stats_desc",
    s.kvm_run: "kvm_run",
    # vCPU and VM state (snapshots)
    s.kvm_fpu: "kvm_fpu",
    s.kvm_xsave: "kvm_xsave",
    s.kvm_xcr: "kvm_xcr",
    s.kvm_xcrs: "kvm_xcrs",
    s.kvm_msr_entry: "kvm_msr_entry",
    s.kvm_msrs_header: "kvm_msrs",
    s.kvm_msr_list_header: "kvm_msr_list",
    s.kvm_debugregs: "kvm_debugregs",
    s.kvm_irqchip: "kvm_irqchip",
    s.kvm_pit_channel_state: "kvm_pit_channel_state",
    s.kvm_pit_state2: "kvm_pit_state2",
    s.kvm_clock_data: "kvm_clock_data",
}

# Python field paths whose C spelling differs: the kvm_run exit union is anonymous in C.
RENAMED_PREFIXES = {"kvm_run": [("exit.", "")]}
# Fields with no C counterpart (only the enclosing size is compared).
NO_C_FIELD = {
    ("kvm_vcpu_events", "raw"),
    ("kvm_sync_regs", "events.raw"),
    ("kvm_run", "s.regs.events.raw"),
    ("kvm_run", "exit"),  # anonymous in C; its char padding[256] is compared instead
}

# Offsets the exit decoder relies on without a ctypes mirror (KVM_INTERNAL_ERROR_EMULATION's
# overlay of kvm_run.internal): checked against the header too.
EMULATION_FAILURE = {
    "emulation_failure.flags": s.kvm_run.exit.offset + 8,
    "emulation_failure.insn_size": s.kvm_run.exit.offset + 16,
    "emulation_failure.insn_bytes": s.kvm_run.exit.offset + 17,
}


def _fields(struct, prefix="", base=0):
    """(dotted path, offset, size) of every field, descending into structures and unions."""
    for name, ctype, *_ in struct._fields_:
        desc = getattr(struct, name)
        path, off = prefix + name, base + desc.offset
        yield path, off, desc.size
        if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure | ctypes.Union):
            yield from _fields(ctype, path + ".", off)


def _c_path(cname: str, path: str) -> str:
    for old, new in RENAMED_PREFIXES.get(cname, []):
        if path.startswith(old):
            path = new + path[len(old) :]
    return path


def _constants() -> dict[str, int]:
    consts = dict(ioctls.CAPS)
    for name, value in vars(ioctls).items():
        if name.startswith("KVM_") and isinstance(value, int):
            consts[name] = value
    for name, value in vars(s).items():
        if name.startswith("KVM_") and isinstance(value, int):
            consts[name] = value
    return consts


def _expected() -> dict[str, int]:
    """What the Python side says, keyed as the C program prints."""
    exp = {}
    for struct, cname in MIRRORS.items():
        exp[f"sizeof {cname}"] = ctypes.sizeof(struct)
        for path, off, size in _fields(struct):
            if (cname, path) in NO_C_FIELD:
                continue
            cpath = _c_path(cname, path)
            if not cpath:
                continue
            exp[f"offsetof {cname}.{cpath}"] = off
            exp[f"sizeof {cname}.{cpath}"] = size
    for path, off in EMULATION_FAILURE.items():
        exp[f"offsetof kvm_run.{path}"] = off
    exp["offsetof kvm_cpuid2.entries"] = ctypes.sizeof(s.kvm_cpuid2_header)
    exp["offsetof kvm_irq_routing.entries"] = ctypes.sizeof(s.kvm_irq_routing_header)
    exp["offsetof kvm_stats_desc.name"] = ctypes.sizeof(s.kvm_stats_desc)
    exp["offsetof kvm_msrs.entries"] = ctypes.sizeof(s.kvm_msrs_header)
    exp["offsetof kvm_msr_list.indices"] = ctypes.sizeof(s.kvm_msr_list_header)
    exp["offsetof kvm_xsave.extra"] = ctypes.sizeof(s.kvm_xsave)
    return exp


def _c_program(expected: dict[str, int], consts: dict[str, int]) -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/kvm.h>",
        "#define M(T, f) sizeof(((struct T *)0)->f)",
        "int main(void) {",
    ]
    for key in expected:
        kind, what = key.split(" ", 1)
        if "." in what:
            cname, path = what.split(".", 1)
            if kind == "offsetof":
                expr = f"offsetof(struct {cname}, {path})"
            else:
                expr = f"M({cname}, {path})"
        else:
            expr = f"sizeof(struct {what})"
        lines.append(f'  printf("{key} %llu\\n", (unsigned long long)({expr}));')
    for name in consts:
        lines += [
            f"#ifdef {name}",
            f'  printf("const {name} %llu\\n", (unsigned long long)({name}));',
            "#else",
            f'  printf("absent {name}\\n");',
            "#endif",
        ]
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """What the installed headers say: {'sizeof kvm_regs': 144, ...} and absent names."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    probe = subprocess.run(
        [gcc, "-E", "-x", "c", "-"],
        input="#include <linux/kvm.h>\n",
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip("<linux/kvm.h> is not installed (Debian package linux-libc-dev)")
    tmp = tmp_path_factory.mktemp("kvmlayout")
    src, exe = tmp / "kvmlayout.c", tmp / "kvmlayout"
    src.write_text(_c_program(_expected(), _constants()))
    cc = subprocess.run(
        [gcc, "-std=gnu11", "-Wall", "-o", str(exe), str(src)], capture_output=True, text=True
    )
    assert cc.returncode == 0, f"the generated layout program does not compile:\n{cc.stderr}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    values, absent = {}, set()
    for line in out.splitlines():
        if line.startswith("absent "):
            absent.add(line.split()[1])
        else:
            key, value = line.rsplit(" ", 1)
            values[key] = int(value)
    return values, absent


def test_every_struct_field_offset_and_size_matches_the_header(kernel):
    values, _ = kernel
    expected = _expected()
    wrong = {k: (v, values.get(k)) for k, v in expected.items() if values.get(k) != v}
    assert not wrong, "python vs <linux/kvm.h>: " + ", ".join(
        f"{k}: {p} != {c}" for k, (p, c) in wrong.items()
    )


def test_the_comparison_covers_the_kvm_run_exit_union_and_sync_regs(kernel):
    values, _ = kernel
    for key in (
        "offsetof kvm_run.io.data_offset",
        "offsetof kvm_run.mmio.is_write",
        "offsetof kvm_run.fail_entry.cpu",
        "offsetof kvm_run.internal.data",
        "offsetof kvm_run.system_event.data",
        "offsetof kvm_run.kvm_valid_regs",
        "offsetof kvm_run.s.regs.sregs.efer",
        "offsetof kvm_run.s.regs.events",
        "sizeof kvm_run",
        "sizeof kvm_sync_regs",
        "offsetof kvm_dirty_log.dirty_bitmap",
    ):
        assert key in values


def test_every_ioctl_number_matches_the_header(kernel):
    values, absent = kernel
    assert ioctls.NAMES, "ioctls.NAMES is empty"
    for number, name in ioctls.NAMES.items():
        assert name not in absent, f"{name} is not defined by <linux/kvm.h>"
        assert values[f"const {name}"] == number, (
            f"{name}: python {number:#x}, header {values[f'const {name}']:#x}"
        )


def test_every_capability_matches_the_header(kernel):
    values, absent = kernel
    for name, number in ioctls.CAPS.items():
        assert name not in absent, f"{name} is not defined by <linux/kvm.h>"
        assert values[f"const {name}"] == number, name
        assert getattr(ioctls, name) == number


def test_every_exit_reason_and_constant_matches_the_header(kernel):
    values, absent = kernel
    consts = _constants()
    exits = [n for n in consts if n.startswith("KVM_EXIT_")]
    assert "KVM_EXIT_IO" in exits and "KVM_EXIT_INTERNAL_ERROR" in exits
    # Names newer than these headers cannot be compared; everything else must be present.
    compared = 0
    for name, value in consts.items():
        if name in absent:
            continue
        assert values[f"const {name}"] == value, (
            f"{name}: python {value}, header {values[f'const {name}']}"
        )
        compared += 1
    missing_exits = [n for n in exits if n in absent]
    assert len(missing_exits) <= 2, f"exit reasons unknown to the header: {missing_exits}"
    assert compared >= len(consts) - 8


def test_exit_reason_names_cover_every_exit_constant():
    for name, value in vars(s).items():
        if name.startswith("KVM_EXIT_") and not name.startswith("KVM_EXIT_IO_"):
            assert s.EXIT_REASON_NAMES[value] == name[len("KVM_EXIT_") :].lower()
    # KVM_EXIT_IO_IN/OUT (0/1) are directions, not reasons: they must not rename 0 and 1.
    assert s.EXIT_REASON_NAMES[0] == "unknown"
    assert s.EXIT_REASON_NAMES[1] == "exception"
