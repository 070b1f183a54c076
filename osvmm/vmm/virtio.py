"""A partition's virtio-mmio devices at work: each on the MMIO bus, its queues'
notifications on KVM ioeventfds, its interrupt on a KVM irqfd, and a thread
of its own that serves its queues.

    guest writes QueueNotify (4 bytes, the queue's index)
        -> KVM signals that queue's eventfd (KVM_IOEVENTFD, datamatch on the
           index): the vCPU goes on at once, no exit reaches the VMM
        -> the device's thread wakes (poll), serves the queue (the transport
           and model, devices/virtio/), writes the used ring
        -> writes the device's irqfd eventfd: KVM raises the device's GSI
           (KVM_IRQFD, an edge on its I/O APIC pin), again without a vCPU

Every other register access (status, features, queue set-up, interrupt
status and acknowledge, configuration space) is an MMIO exit handled on the
vCPU's thread through the MMIO bus, as any device's. A QueueNotify that
reaches the bus anyway (a write of another width) is handed to the device's
thread the same way.

Where each device sits (MMIO page, ISA IRQ) is devices/virtio/mmio.py's
``slot``; Linux learns it from the kernel command line (``cmdline_announcement``).
"""

from __future__ import annotations

import os
import select
import threading
from contextlib import contextmanager

from osvmm.devices.virtio import spec
from osvmm.devices.virtio.blk import VirtioBlk
from osvmm.devices.virtio.mmio import VirtioMmio, slot
from osvmm.devices.virtio.net import VirtioNet
from osvmm.devices.virtio.vsock import VirtioVsock
from osvmm.errors import OsvmmError, VmmBug
from osvmm.vmm import enforce


class DeviceThread:
    """One device: its transport, eventfds and serving thread."""

    def __init__(self, name: str, index: int, vm, memory, model, on_error):
        self.name = name
        self.base, self.irq = slot(index)
        self.vm = vm
        self._on_error = on_error
        self._irq_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._queue_fds: list[int] = []
        self._assigned: list[tuple[int, int]] = []  # (fd, queue index) given to KVM
        self.transport = VirtioMmio(model, memory, self._interrupt, self._notify)
        self.thread: threading.Thread | None = None
        try:
            vm.irqfd(self._irq_fd, self.irq)
            for q in range(model.num_queues):
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._queue_fds.append(fd)
                vm.ioeventfd(fd, self.base + spec.QUEUE_NOTIFY, 4, datamatch=q)
                self._assigned.append((fd, q))
        except BaseException:
            self.close()
            raise

    def _interrupt(self) -> None:
        os.eventfd_write(self._irq_fd, 1)

    def _notify(self, index: int) -> None:
        os.eventfd_write(self._queue_fds[index], 1)

    def start(self, thread_name: str) -> None:
        self.thread = threading.Thread(
            target=self._serve, args=(thread_name,), name=thread_name, daemon=True
        )
        self.thread.start()

    def _serve(self, thread_name: str) -> None:
        enforce.name_thread(thread_name)
        poller = select.poll()
        poller.register(self._stop_fd, select.POLLIN)
        for fd in self._queue_fds:
            poller.register(fd, select.POLLIN)
        index_of = {fd: i for i, fd in enumerate(self._queue_fds)}
        # A device with input of its own (a NIC's tap, vsock's sockets): the fds its
        # model asks for now, asked again after every wake-up (a NIC starved of
        # buffers asks for none until the driver's next notify).
        polled: dict[int, int] = {}
        try:
            while True:
                wanted = self.transport.poll_fds()
                for fd in [fd for fd in polled if fd not in wanted]:
                    poller.unregister(fd)
                    del polled[fd]
                for fd, events in wanted.items():
                    if polled.get(fd) != events:
                        poller.register(fd, events)  # or modify
                        polled[fd] = events
                for fd, revents in poller.poll():
                    if fd == self._stop_fd:
                        return
                    index = index_of.get(fd)
                    if index is None:
                        self.transport.fd_ready(fd, revents)
                        continue
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        continue
                    self.transport.process(index)
        except OsvmmError as err:
            self._on_error(err)
        except Exception as err:  # noqa: BLE001 - a bug: reported, never a dead thread unseen
            self._on_error(VmmBug.from_exception(f"{self.name} device thread", err))

    def describe(self) -> dict:
        """What ``osvmm stat`` shows of the device: its slot, the model's counts, its
        backend's (a switch port's drops, its switch's drops and floods), and the
        transport's state."""
        model = self.transport.model
        backend = getattr(model, "backend", None)
        stat_counts = getattr(backend, "stat_counts", None)  # a switch port's
        return {
            "name": self.name,
            "base": self.base,
            "irq": self.irq,
            "counts": dict(getattr(model, "counts", {})),
            "backend": stat_counts() if stat_counts else dict(getattr(backend, "counts", {})),
            "rx_starved": bool(getattr(model, "rx_starved", False)),
            **self.transport.describe(),
        }

    def stop(self) -> None:
        """The thread ended between two wake-ups (a serve is never cut short: it
        finishes, its used ring written and its interrupt raised); the eventfds
        keep what came meanwhile for the next ``start``."""
        if self.thread is not None and self.thread.is_alive():
            os.eventfd_write(self._stop_fd, 1)
            self.thread.join(5)
            if self.thread.is_alive():
                raise VmmBug(f"{self.name}: the device thread did not stop")
            try:
                os.eventfd_read(self._stop_fd)  # ready for a next start
            except BlockingIOError:
                pass
        self.thread = None

    def close(self) -> None:
        self.stop()
        for fd, q in self._assigned:
            if self.vm.fd >= 0:
                self.vm.ioeventfd(fd, self.base + spec.QUEUE_NOTIFY, 4, datamatch=q, deassign=True)
        self._assigned = []
        if self.vm.fd >= 0:
            try:
                self.vm.irqfd(self._irq_fd, self.irq, deassign=True)
            except OsvmmError:
                pass  # never assigned (its failure is what is being reported)
        for fd in (*self._queue_fds, self._irq_fd, self._stop_fd):
            os.close(fd)
        self._queue_fds = []
        self._irq_fd = self._stop_fd = -1


class VirtioDevices:
    """A partition's virtio devices, in slot order."""

    def __init__(self):
        self.devices: list[DeviceThread] = []
        self.backends: list = []
        self._partition_name = "guest"  # for the names of the threads (start)
        # Handed to another VMM (a migration, a takeover: vmm/device_handover.py): the
        # threads never run here again, whatever is left in the queues is its.
        self.handed_off = False

    def add_blk(self, vm, memory, mmio_bus, backend, on_error) -> DeviceThread:
        serial = f"osvmm-vd{chr(ord('a') + len(self.devices))}".encode()
        model = VirtioBlk(backend, memory, serial=serial)
        name = f"virtio-blk {backend.path}"
        return self._add(name, model, backend, vm, memory, mmio_bus, on_error)

    def add_net(self, vm, memory, mmio_bus, tap, mac: bytes, on_error) -> DeviceThread:
        model = VirtioNet(tap, memory, mac)
        return self._add(f"virtio-net {tap.name}", model, tap, vm, memory, mmio_bus, on_error)

    def add_vsock(self, vm, memory, mmio_bus, backend, cid: int, on_error) -> DeviceThread:
        model = VirtioVsock(backend, memory, cid)
        name = f"virtio-vsock {backend.path}"
        return self._add(name, model, backend, vm, memory, mmio_bus, on_error)

    def _add(self, name, model, backend, vm, memory, mmio_bus, on_error) -> DeviceThread:
        """The device in the next slot: its thread's eventfds, its page on the MMIO bus;
        its backend closed with the devices."""
        dev = DeviceThread(name, len(self.devices), vm, memory, model, on_error)
        self.devices.append(dev)
        self.backends.append(backend)
        mmio_bus.register(dev.base, 0x1000, dev.transport)
        return dev

    def start(self, partition_name: str) -> None:
        self._partition_name = partition_name
        if self.handed_off:
            return
        for i, dev in enumerate(self.devices):
            if dev.thread is None:
                dev.start(enforce.thread_name(partition_name, f"vd{i}"))

    @contextmanager
    def quiesced(self, resume=lambda: True):
        """Every device's thread stopped for the block (none half way through a
        request: a snapshot's state and memory agree), then started again unless
        ``resume()`` says no (the partition was stopped in the block: after a
        migration or a takeover its memory is another VMM's, never to be written
        here again). Queue notifications that came meanwhile wait in their eventfds."""
        running = [dev for dev in self.devices if dev.thread is not None and dev.thread.is_alive()]
        try:
            for dev in running:
                dev.stop()
            yield
        finally:
            if resume():
                for i, dev in enumerate(self.devices):
                    if dev in running and dev.thread is None and not self.handed_off:
                        dev.start(enforce.thread_name(self._partition_name, f"vd{i}"))

    def state(self) -> list[dict]:
        """Each device's transport state (VirtioMmio.state), in slot order; quiesced."""
        return [dev.transport.state() for dev in self.devices]

    def restore(self, states: list[dict]) -> None:
        """Put a snapshot's ``state()`` into these devices (new, not started), then
        have each look at its queues and raise a pending interrupt again once its
        thread starts (VirtioMmio.resume: the notify lands in the queue's eventfd)."""
        if len(states) != len(self.devices):
            raise ValueError(f"{len(states)} virtio device states for {len(self.devices)}")
        for i, (dev, st) in enumerate(zip(self.devices, states, strict=True)):
            dev.transport.restore(st, f"virtio device {i} ({dev.name})")
        for dev in self.devices:
            dev.transport.resume()

    def reset(self) -> None:
        """Every device as after a power-on (a partition recycled for its next boot)."""
        for dev in self.devices:
            dev.transport.reset()

    def remove_host_files(self) -> None:
        """Files the backends made on the host (vsock's socket) removed, the rest
        left as it is: the process ends next and the kernel reclaims that."""
        for b in self.backends:
            unlink = getattr(b, "unlink", None)
            if unlink is not None:
                unlink()

    def close(self) -> None:
        for dev in self.devices:
            dev.close()
        self.devices = []
        for b in self.backends:
            b.close()
        self.backends = []
