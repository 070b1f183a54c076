"""virtio 1.x devices: split virtqueues, the virtio-mmio transport, virtio-blk.

Pure models, as the other devices: guest memory is reached through the object
given to them (``read``/``write``/``view``/``contains``, as vmm/memory.py's
GuestMemory), interrupts leave through an injected callable, and a block device's
I/O goes to an injected backend. Threads, eventfds and KVM are vmm/virtio.py's.
"""
