"""boot.prepare is pure: a BootSource, a Machine, a command line and Quirks in, a
BootImage out (bytes at addresses, entry state, CPUID masks, notes), with no
partition, guest memory or /dev/kvm involved."""

from __future__ import annotations

import pytest

from osvmm.arch.x86 import layout
from osvmm.boot.image import NO_QUIRKS, BootSource, Quirks, StagedMemory, read_boot_source
from osvmm.boot.prepare import prepare
from osvmm.errors import ConfigError, GuestMemoryError, ImageError
from osvmm.guests.build import guest_path
from osvmm.machine import Machine

MiB = layout.MiB


@pytest.fixture(scope="module")
def hello() -> BootSource:
    return read_boot_source(image=str(guest_path("hello")))


def cmdline_of(boot) -> bytes:
    return dict(boot.writes)[layout.CMDLINE_ADDR]


def test_same_inputs_same_bytes(hello):
    machine = Machine.build(64 * MiB, 2)
    a = prepare(hello, machine, "x=1")
    b = prepare(hello, machine, "x=1")
    assert a.writes == b.writes and a.entry == b.entry
    assert a.entry.mode == "pvh32" and a.entry.rbx == layout.PVH_START_INFO_ADDR
    assert cmdline_of(a) == b"x=1\0"


def test_every_write_is_inside_the_machines_ram(hello):
    machine = Machine.build(64 * MiB, 1)
    staged = StagedMemory(machine.ram_ranges)
    for gpa, data in prepare(hello, machine).writes:
        assert staged.contains(gpa, len(data))


def test_staged_memory_refuses_what_is_outside_ram():
    staged = StagedMemory(Machine.build(4 * MiB, 1).ram_ranges)
    with pytest.raises(GuestMemoryError):
        staged.write(4 * MiB - 2, b"abcd")


def test_a_pvh_image_gets_no_quirks_and_no_linux_words(hello):
    boot = prepare(hello, Machine.build(64 * MiB, 1), "a=1", Quirks(("cx16",), ("noxsave",)))
    assert cmdline_of(boot) == b"a=1\0"
    assert boot.cpuid_mask == () and boot.notes == ()


def test_bad_command_line_is_a_config_error(hello):
    with pytest.raises(ConfigError, match="--append"):
        prepare(hello, Machine.build(64 * MiB, 1), 'a"b"=1')


def test_initrd_needs_linux():
    with pytest.raises(ConfigError, match="--initrd needs a Linux kernel"):
        read_boot_source(image=str(guest_path("hello")), initrd=str(guest_path("hello")))


def test_not_an_elf_is_an_image_error(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"hello world" * 100)
    with pytest.raises(ImageError, match="not an ELF image"):
        read_boot_source(image=str(p))


# -- Linux: the quirk words go before init's "--" -----------------------------------


def _vmlinux():
    from pathlib import Path

    path = Path.home() / ".cache" / "osvmm" / "kernel" / "vmlinux"
    if not path.exists():
        pytest.skip(f"no Debian kernel at {path}: run ./setup.sh")
    return read_boot_source(kernel=str(path))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("console=ttyS0", "console=ttyS0 pci=off noxsave"),
        ("console=ttyS0 -- uname -a", "console=ttyS0 pci=off noxsave -- uname -a"),
        (
            'console=ttyS0 -- sh -c "uname -a; cat /proc/uptime"',
            'console=ttyS0 pci=off noxsave -- sh -c "uname -a; cat /proc/uptime"',
        ),
        ("noxsave quiet -- true", "noxsave quiet pci=off -- true"),
        # The user's pci= stands; a pci= for init is init's.
        ("pci=nommconf noxsave", "pci=nommconf noxsave"),
        ("quiet -- pci=x", "quiet pci=off noxsave -- pci=x"),
    ],
)
def test_linux_platform_and_quirk_words_go_before_the_init_arguments(text, expected):
    quirks = Quirks(("cx16",), ("noxsave",), ("a note",))
    boot = prepare(_vmlinux(), Machine.build(256 * MiB, 1), text, quirks)
    assert cmdline_of(boot) == expected.encode() + b"\0"
    assert boot.cpuid_mask == ("cx16",) and boot.notes == ("a note",)
    assert boot.entry.mode == "long64" and boot.entry.rsi == layout.ZERO_PAGE_ADDR


def test_linux_without_quirks_gets_only_pci_off():
    # The machine has no PCI bus: Linux is told so, and looks for none.
    boot = prepare(_vmlinux(), Machine.build(256 * MiB, 1), 'a=1 -- sh -c "x y"', NO_QUIRKS)
    assert cmdline_of(boot) == b'a=1 pci=off -- sh -c "x y"\0'
