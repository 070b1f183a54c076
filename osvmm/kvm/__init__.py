"""The KVM binding: structures, ioctl numbers, the fd objects, exit decoding, statistics."""

from osvmm.kvm.system import Kvm, Vcpu, Vm

__all__ = ["Kvm", "Vm", "Vcpu"]
