"""KVM_IOEVENTFD and KVM_IRQFD through kvm/system.py: registered, refused twice,
undone (a guest's write reaching them: tests/test_virtio_guest.py)."""

from __future__ import annotations

import errno
import os

import pytest

from osvmm.errors import KvmError
from osvmm.kvm import Kvm

pytestmark = pytest.mark.kvm


@pytest.fixture
def vm():
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_irqchip()
    yield vm
    vm.close()
    kvm.close()


def test_ioeventfd_is_assigned_once_and_deassigned(vm):
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        vm.ioeventfd(fd, 0xC000_0050, 4, datamatch=0)
        with pytest.raises(KvmError) as err:
            vm.ioeventfd(fd, 0xC000_0050, 4, datamatch=0)
        assert err.value.errno == errno.EEXIST and err.value.request == "KVM_IOEVENTFD"
        vm.ioeventfd(fd, 0xC000_0050, 4, datamatch=1)  # another value: another match
        vm.ioeventfd(fd, 0xC000_0050, 4, datamatch=0, deassign=True)
        vm.ioeventfd(fd, 0xC000_0050, 4, datamatch=0)  # free again
        with pytest.raises(KvmError):
            vm.ioeventfd(fd, 0xC000_0050, 3)  # 3 bytes is no access width
    finally:
        os.close(fd)


def test_irqfd_is_assigned_once_and_deassigned(vm):
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        vm.irqfd(fd, 5)
        with pytest.raises(KvmError) as err:
            vm.irqfd(fd, 5)
        assert err.value.errno == errno.EBUSY and err.value.request == "KVM_IRQFD"
        vm.irqfd(fd, 5, deassign=True)
        vm.irqfd(fd, 5)
    finally:
        os.close(fd)
