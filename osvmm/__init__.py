"""osvmm: a lightweight partitioning virtual machine monitor on Linux KVM."""

__version__ = "0.1.0"
