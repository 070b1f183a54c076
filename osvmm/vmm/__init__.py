"""One partition: its machine, memory, VM, vCPUs, devices and host enforcement."""
