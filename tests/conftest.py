"""Shared test fixtures: KVM and QEMU availability, with the reason when absent."""

from __future__ import annotations

import os
import shutil

import pytest


def kvm_unusable_reason() -> str | None:
    """None when /dev/kvm can be opened read-write, else why not."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is absent on this machine"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm cannot be opened: {e.strerror}"
    os.close(fd)
    return None


def qemu_missing_reason() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (Debian package qemu-system-x86)"
    return None


def rig_absent_reason() -> str | None:
    """None inside the hardware-virtualization rig (scripts/hwvirt-rig sets OSVMM_RIG=1)."""
    if os.environ.get("OSVMM_RIG") != "1":
        return "runs inside the rig only: scripts/hwvirt-rig run -- python3 -m pytest -m rig"
    return None


def pytest_collection_modifyitems(config, items):
    kvm_reason = kvm_unusable_reason()
    qemu_reason = qemu_missing_reason()
    rig_reason = rig_absent_reason()
    for item in items:
        if rig_reason and item.get_closest_marker("rig"):
            item.add_marker(pytest.mark.skip(reason=rig_reason))
        if kvm_reason and "kvm" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=kvm_reason))
        if qemu_reason and "qemu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=qemu_reason))
