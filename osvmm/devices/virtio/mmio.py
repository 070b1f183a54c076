"""The virtio-mmio transport, version 2 (virtio 1.2 section 4.2.2: modern, no
legacy registers). Where each device sits: arch/x86/layout.py
``virtio_mmio_slot``; how Linux learns it: the DSDT (boot/acpi/dsdt.py).

``VirtioMmio`` is a device on the MMIO bus (``mmio_read``/``mmio_write``) in
front of a device model (blk.py). The model gives ``device_id``, ``features``,
``queue_max``, ``num_queues``, ``config`` (its configuration space, bytes),
``reset()`` and ``serve(index, queue) -> bool`` (take the queue's chains,
answer them, say whether the driver wants an interrupt). A model with input
of its own (net.py's tap, vsock.py's sockets) also gives ``poll_fds()`` (fds
and poll events to wait on now), ``fd_ready(fd, revents)`` (take the input,
return the queues to serve) and, optionally, ``wanted_queues()`` (queues it
has work for after any serve, such as replies owed after a transmit).
Registers below 0x100 are 32 bits wide and read or written whole; other
widths read 0 and are ignored.

Threads: registers are read and written on vCPU threads; queues are served on
the device's own thread (vmm/virtio.py), which calls ``process(index)`` when
the queue's notify eventfd fires (or ``notify(index)`` was called because a
QueueNotify write reached the bus instead of the ioeventfd). A lock keeps the
registers consistent; a second one makes a device reset (status 0) wait for
a queue being served to finish, so nothing is written into guest memory
after the driver was told the device is reset. Only a reset waits for it.

A driver breaking the queue rules (queue.py QueueError), or setting up a
queue outside guest RAM, sets DEVICE_NEEDS_RESET (and, once DRIVER_OK, a
configuration-change interrupt, as 2.1.2 asks); the device serves nothing more
until the driver resets it. ``error`` keeps the reason.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from osvmm.arch.x86 import layout
from osvmm.devices.virtio import spec
from osvmm.devices.virtio.queue import QueueError, Virtqueue

_U32 = struct.Struct("<I")
MASK64 = (1 << 64) - 1


def slot(index: int) -> tuple[int, int]:
    """(MMIO base, ISA IRQ) of virtio-mmio device ``index`` (layout.virtio_mmio_slot)."""
    return layout.virtio_mmio_slot(index)


@dataclass
class QueueState:
    """What the driver wrote for one queue (4.2.2's Queue* registers)."""

    num: int = 0
    ready: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0
    vq: Virtqueue | None = None


class VirtioMmio:
    def __init__(
        self,
        model,
        memory,
        interrupt: Callable[[], None],
        notify: Callable[[int], None] | None = None,
    ):
        """``interrupt()`` raises the device's interrupt line (an edge); ``notify(i)``
        hands queue ``i`` to the device's thread (None: served on the caller's)."""
        self.model = model
        self.memory = memory
        self.interrupt = interrupt
        self.notify = notify
        self._lock = threading.Lock()  # the registers
        self._serve_lock = threading.Lock()  # held while a queue is served
        self.error: str | None = None  # why DEVICE_NEEDS_RESET was set
        self.config_generation = 0
        self._reset_state()

    def _reset_state(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.interrupts = 0  # raised since the last reset (osvmm stat)
        self.queues = [QueueState() for _ in range(self.model.num_queues)]

    def reset(self) -> None:
        """A device reset (the driver wrote status 0, or the VMM reboots the guest)."""
        with self._serve_lock, self._lock:
            self._reset_state()
            self.error = None
            self.model.reset()

    # -- registers -----------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> bytes:
        if offset >= spec.CONFIG:
            config = self.model.config
            at = offset - spec.CONFIG
            data = config[at : at + size] if at < len(config) else b""
            return data + bytes(size - len(data))
        if size != 4 or offset % 4:
            return bytes(size)
        with self._lock:
            return _U32.pack(self._register(offset) & 0xFFFFFFFF)

    def _register(self, offset: int) -> int:
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if offset == spec.MAGIC_VALUE:
            return spec.MMIO_MAGIC
        if offset == spec.VERSION:
            return spec.MMIO_VERSION
        if offset == spec.DEVICE_ID:
            return self.model.device_id
        if offset == spec.VENDOR_ID:
            return spec.VENDOR
        if offset == spec.DEVICE_FEATURES:
            if self.device_features_sel >= 2:
                return 0
            return self.model.features >> (32 * self.device_features_sel)
        if offset == spec.QUEUE_NUM_MAX:
            return self.model.queue_max if q is not None else 0
        if offset == spec.QUEUE_READY:
            return int(q.ready) if q is not None else 0
        if offset == spec.INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == spec.STATUS:
            return self.status
        if offset == spec.CONFIG_GENERATION:
            return self.config_generation
        if offset in (spec.SHM_LEN_LOW, spec.SHM_LEN_HIGH, spec.SHM_BASE_LOW, spec.SHM_BASE_HIGH):
            return 0xFFFFFFFF  # no shared memory regions (4.2.2: length all ones)
        if q is not None:
            low_high = {
                spec.QUEUE_DESC_LOW: (q.desc, 0),
                spec.QUEUE_DESC_HIGH: (q.desc, 32),
                spec.QUEUE_DRIVER_LOW: (q.driver, 0),
                spec.QUEUE_DRIVER_HIGH: (q.driver, 32),
                spec.QUEUE_DEVICE_LOW: (q.device, 0),
                spec.QUEUE_DEVICE_HIGH: (q.device, 32),
            }.get(offset)
            if low_high is not None:
                return low_high[0] >> low_high[1]
        return 0  # write-only registers, reserved ones

    def mmio_write(self, offset: int, data: bytes) -> None:
        if offset >= spec.CONFIG:
            return  # virtio-blk's writable field (writeback) is not offered
        if len(data) != 4 or offset % 4:
            return
        value = _U32.unpack(data)[0]
        if offset == spec.QUEUE_NOTIFY:
            self._notified(value)
            return
        if offset == spec.STATUS and value == 0:
            self.reset()
            return
        with self._lock:
            self._write_register(offset, value)

    def _write_register(self, offset: int, value: int) -> None:
        if offset == spec.DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == spec.DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == spec.DRIVER_FEATURES:
            if self.driver_features_sel < 2 and not self.status & spec.FEATURES_OK:
                shift = 32 * self.driver_features_sel
                mask = 0xFFFFFFFF << shift
                self.driver_features = (self.driver_features & ~mask | value << shift) & MASK64
        elif offset == spec.QUEUE_SEL:
            self.queue_sel = value
        elif offset == spec.INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == spec.STATUS:
            self._write_status(value)
        elif self.queue_sel < len(self.queues):
            self._write_queue(self.queues[self.queue_sel], offset, value)

    def _write_status(self, value: int) -> None:
        if value & spec.FEATURES_OK and not self.status & spec.FEATURES_OK:
            offered = self.model.features
            wanted = self.driver_features
            if wanted & ~offered or not wanted >> spec.VIRTIO_F_VERSION_1 & 1:
                value &= ~spec.FEATURES_OK  # refused: the driver reads it back clear
        # The device's own bit stays; the driver sets the others (2.1: it never clears one).
        self.status = value | (self.status & spec.DEVICE_NEEDS_RESET)

    def _write_queue(self, q: QueueState, offset: int, value: int) -> None:
        if offset == spec.QUEUE_READY:
            if value == 1 and not q.ready:
                self._make_ready(q)
            elif value == 0:
                q.ready, q.vq = False, None
            return
        if q.ready:
            return  # 4.2.2: the driver may not change a queue that is ready
        if offset == spec.QUEUE_NUM:
            q.num = value
        elif offset in (spec.QUEUE_DESC_LOW, spec.QUEUE_DRIVER_LOW, spec.QUEUE_DEVICE_LOW):
            name = {
                spec.QUEUE_DESC_LOW: "desc",
                spec.QUEUE_DRIVER_LOW: "driver",
                spec.QUEUE_DEVICE_LOW: "device",
            }[offset]
            setattr(q, name, getattr(q, name) & ~0xFFFFFFFF | value)
        elif offset in (spec.QUEUE_DESC_HIGH, spec.QUEUE_DRIVER_HIGH, spec.QUEUE_DEVICE_HIGH):
            name = {
                spec.QUEUE_DESC_HIGH: "desc",
                spec.QUEUE_DRIVER_HIGH: "driver",
                spec.QUEUE_DEVICE_HIGH: "device",
            }[offset]
            setattr(q, name, getattr(q, name) & 0xFFFFFFFF | value << 32)

    def _make_ready(self, q: QueueState) -> None:
        try:
            q.vq = self._virtqueue(q)
            q.ready = True
        except QueueError as err:
            self._needs_reset_locked(f"queue {self.queue_sel}: {err}")

    def _virtqueue(self, q: QueueState) -> Virtqueue:
        """The virtqueue the driver set up in ``q`` (QueueError if it breaks a rule)."""
        features = self.driver_features
        if q.num > self.model.queue_max:
            raise QueueError(f"queue size {q.num} is over the device's {self.model.queue_max}")
        return Virtqueue(
            self.memory,
            q.num,
            q.desc,
            q.driver,
            q.device,
            indirect=bool(features >> spec.VIRTIO_F_INDIRECT_DESC & 1),
            event_idx=bool(features >> spec.VIRTIO_F_EVENT_IDX & 1),
        )

    # -- queues --------------------------------------------------------------------------
    def _notified(self, index: int) -> None:
        if index >= len(self.queues):
            return
        if self.notify is not None:
            self.notify(index)
        else:
            self.process(index)

    def process(self, index: int) -> bool:
        """Serve queue ``index`` (on the device's thread): answer every chain the
        driver made available, then interrupt if the driver wants it; then the
        queues the model has work for (``wanted_queues``, such as packets owed
        to the driver after a transmit). False when the queue could not be served
        (not set up, the driver not ready, the device needing a reset)."""
        with self._serve_lock:
            if not self._serve(index):
                return False
            self._serve_wanted()
            return True

    def _serve(self, index: int) -> bool:  # the serve lock held
        with self._lock:
            if index >= len(self.queues) or not self._live_locked():
                return False
            vq = self.queues[index].vq
        if vq is None:
            return False
        try:
            wanted = self.model.serve(index, vq)
        except QueueError as err:
            with self._lock:
                self._needs_reset_locked(f"queue {index}: {err}")
            return False
        if wanted:
            self._raise(spec.VIRTIO_MMIO_INT_VRING)
        return True

    def _serve_wanted(self) -> None:  # the serve lock held
        wanted_queues = getattr(self.model, "wanted_queues", None)
        if wanted_queues is not None:
            for index in wanted_queues():
                self._serve(index)

    def _live_locked(self) -> bool:
        return bool(self.status & spec.DRIVER_OK and not self.status & spec.DEVICE_NEEDS_RESET)

    # -- a model's own fds (a NIC's tap, vsock's sockets) ----------------------------------
    def poll_fds(self) -> dict[int, int]:
        """The fds (and poll events) the device's thread waits on for the model, from
        its ``poll_fds()``: none while the driver is not ready (DRIVER_OK, no
        DEVICE_NEEDS_RESET), so that a backend with input does not wake the thread
        for a device that cannot take it; the driver's next notify wakes it."""
        poll_fds = getattr(self.model, "poll_fds", None)
        if poll_fds is None:
            return {}
        with self._serve_lock:
            with self._lock:
                if not self._live_locked():
                    return {}
            return poll_fds()

    def fd_ready(self, fd: int, revents: int) -> None:
        """One of those fds is ready: the model takes what it has (``fd_ready``
        gives the queues to serve then) and those queues are served."""
        with self._serve_lock:
            with self._lock:
                if not self._live_locked():
                    return
            for index in self.model.fd_ready(fd, revents):
                self._serve(index)
            self._serve_wanted()

    def _raise(self, bit: int) -> None:
        with self._lock:
            self.interrupt_status |= bit
            self.interrupts += 1
        self.interrupt()

    def describe(self) -> dict:
        """The transport's state for ``osvmm stat``: the driver's status, the
        interrupts raised, and each set-up queue's indices (Virtqueue.indices)."""
        with self._lock:
            set_up = [(i, q.vq) for i, q in enumerate(self.queues) if q.vq is not None]
            queues = [{"index": i, **vq.indices()} for i, vq in set_up]
            return {
                "status": self.status,
                "interrupts": self.interrupts,
                "error": self.error,
                "queues": queues,
            }

    # -- snapshots (vmm/snapshot.py, vmm/virtio.py) ---------------------------------------
    def state(self) -> dict:
        """The transport's registers, each queue's set-up and indices, the
        configuration space and the model's own ``state()`` (a disk's identity).
        Taken with the device quiesced: its thread stopped (vmm/virtio.py), so no
        request is half done; the serve lock is taken all the same."""
        with self._serve_lock, self._lock:
            return {
                "device_id": self.model.device_id,
                "features": self.model.features,
                "status": self.status,
                "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel,
                "driver_features": self.driver_features,
                "queue_sel": self.queue_sel,
                "interrupt_status": self.interrupt_status,
                "interrupts": self.interrupts,
                "config_generation": self.config_generation,
                "error": self.error,
                "config": bytes(self.model.config),
                "queues": [
                    {
                        "num": q.num,
                        "ready": q.ready,
                        "desc": q.desc,
                        "driver": q.driver,
                        "device": q.device,
                        "indices": q.vq.state() if q.vq is not None else None,
                    }
                    for q in self.queues
                ],
                "model": self.model.state(),
            }

    def restore(self, st: dict, who: str) -> None:
        """Take ``state()`` back into a new transport (its model over the reopened
        backend, guest memory in place, nothing served yet). SnapshotError
        (``who``: ...) when the device is not the snapshot's: another kind, a
        configuration space that differs (a disk's capacity), features the driver
        accepted that are no longer offered; ValueError for a malformed state.
        ``resume()`` next, once the device's thread may serve."""
        from osvmm.errors import SnapshotError

        model = self.model
        if st["device_id"] != model.device_id:
            raise SnapshotError(
                f"{who}: the snapshot has virtio device {st['device_id']} there, "
                f"not {model.device_id}"
            )
        if st["config"] != bytes(model.config):
            raise SnapshotError(f"{who}: its configuration space differs from the snapshot's")
        lost = st["driver_features"] & ~model.features
        if lost:
            raise SnapshotError(
                f"{who}: the driver accepted features {lost:#x} that the device no longer "
                "offers (another host file system?)"
            )
        if len(st["queues"]) != len(self.queues):
            raise ValueError(f"{len(st['queues'])} queues for {len(self.queues)}")
        with self._serve_lock, self._lock:
            self.status = int(st["status"])
            self.device_features_sel = int(st["device_features_sel"])
            self.driver_features_sel = int(st["driver_features_sel"])
            self.driver_features = int(st["driver_features"]) & MASK64
            self.queue_sel = int(st["queue_sel"])
            self.interrupt_status = int(st["interrupt_status"])
            self.interrupts = int(st["interrupts"])
            self.config_generation = int(st["config_generation"])
            self.error = st["error"]
            for i, (q, qs) in enumerate(zip(self.queues, st["queues"], strict=True)):
                q.num, q.desc, q.driver, q.device = (
                    int(qs[k]) for k in ("num", "desc", "driver", "device")
                )
                q.ready, q.vq = bool(qs["ready"]), None
                if q.ready:
                    try:
                        q.vq = self._virtqueue(q)
                    except QueueError as err:
                        raise ValueError(f"queue {i}: {err}") from None
                    q.vq.restore(qs["indices"])
            model.restore(st["model"])

    def resume(self) -> None:
        """After ``restore``, the device's thread ready to serve: each ready queue is
        looked at once (a notify the snapshot caught on its way, in an eventfd, is
        in no state), and an interrupt the driver had not acknowledged is raised
        again (it may have been on its way into the interrupt controller)."""
        with self._lock:
            ready = [i for i, q in enumerate(self.queues) if q.vq is not None]
            pending = self.interrupt_status
        for index in ready:
            self._notified(index)
        if pending:
            self.interrupt()

    def _needs_reset_locked(self, why: str) -> None:
        self.error = why
        self.status |= spec.DEVICE_NEEDS_RESET
        if self.status & spec.DRIVER_OK:
            self.interrupt_status |= spec.VIRTIO_MMIO_INT_CONFIG
            self.interrupt()
