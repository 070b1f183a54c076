"""A port of a switch inside the VMM (devices/switch.py): the backend of one
virtio-net device on a plan's ``[[network]]``, in place of a tap (vmm/tap.py).

``SwitchNetwork`` owns one switch model and a lock: the device threads of its
members send concurrently, and the model is not thread-safe. Each port keeps a
bounded queue of frames for its device; ``fd`` is an eventfd readable while
that queue holds a frame (the device thread polls it, as a tap's fd). A frame
for a port whose queue is full is dropped and counted (``queue_full``): a
sender's device thread never waits on a receiver that does not drain, so one
stuck partition cannot stall the others.

The network outlives its ports' devices: a partition that restarts gets its
port back (``port(number)``, ``attach``), the MAC table kept; while it is down its
port drops what is sent to it (``down``), so it boots to an empty queue.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque

from osvmm.devices.switch import Switch

QUEUE_FRAMES = 256  # per port: as many frames as a receive queue of QUEUE_MAX chains


class SwitchPort:
    """One port: frames in (``recv``) from its queue, out (``send``) to the switch."""

    def __init__(self, network: SwitchNetwork, number: int, depth: int):
        self.network = network
        self.number = number
        self.name = f"{network.name}.{number}"
        self.path = f"network {network.name} port {number}"
        self.queue: deque[bytes] = deque()
        self.depth = depth
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.counts = {"queue_full": 0, "down": 0}
        self.attached = True  # a device reads the queue (False: frames for it dropped)

    def recv(self) -> bytes | None:
        with self.network.lock:
            if not self.queue:
                return None
            frame = self.queue.popleft()
            if not self.queue:
                try:
                    os.eventfd_read(self.fd)  # empty again: no longer readable
                except BlockingIOError:
                    pass
            return frame

    def send(self, frame: bytes) -> bool:
        """Whether the switch took the frame (short and long frames it drops);
        a full queue at a receiver drops that receiver's copy only."""
        return self.network.deliver(self.number, bytes(frame))

    def _enqueue(self, frame: bytes) -> None:  # the network's lock held
        if not self.attached:
            self.counts["down"] += 1
            return
        if len(self.queue) >= self.depth:
            self.counts["queue_full"] += 1
            return
        self.queue.append(frame)
        if len(self.queue) == 1:
            os.eventfd_write(self.fd, 1)

    def pending(self) -> list[bytes]:
        """The frames queued for the device, oldest first (a snapshot's: vmm/snapshot.py)."""
        with self.network.lock:
            return list(self.queue)

    def requeue(self, frames: list[bytes]) -> None:
        """Put a snapshot's ``pending`` frames back, ahead of any that came since the
        port was attached (they are older); as many as the queue holds."""
        with self.network.lock:
            room = max(self.depth - len(self.queue), 0)
            self.queue.extendleft(reversed(frames[:room]))
            if self.queue:
                os.eventfd_write(self.fd, 1)

    def stat_counts(self) -> dict[str, int]:
        """What ``osvmm stat`` shows of the port: its queue's drops, and the switch's
        counts of the frames this port sent it since the network was made: dropped
        (``switch_dropped``: shorter than 14 bytes or longer than 1514) and flooded
        to every other port (``switch_flooded``: broadcast, multicast, unknown unicast)."""
        with self.network.lock:
            ingress = self.network.switch.ports[self.number].counts
            return {
                **self.counts,
                "switch_dropped": ingress["dropped"],
                "switch_flooded": ingress["flooded"],
            }

    def flush(self) -> None:
        with self.network.lock:
            self.queue.clear()
            try:
                os.eventfd_read(self.fd)
            except BlockingIOError:
                pass

    def attach(self) -> None:
        """A device is made on the port (its partition is built): frames queue again."""
        with self.network.lock:
            self.attached = True

    def close(self) -> None:
        """The device is gone (its partition stops): the port stays, emptied, and
        frames for it are dropped (``down``) until a device is attached again."""
        with self.network.lock:
            self.attached = False
        self.flush()


class SwitchNetwork:
    """One ``[[network]]``: its switch and a port per member, for the VMM's lifetime."""

    def __init__(self, name: str, depth: int = QUEUE_FRAMES, clock=time.monotonic, **switch):
        self.name = name
        self.switch = Switch(name, **switch)
        self.lock = threading.Lock()
        self.depth = depth
        self.clock = clock
        self.ports: list[SwitchPort] = []

    def add_port(self) -> SwitchPort:
        with self.lock:
            port = SwitchPort(self, self.switch.add_port(), self.depth)
            self.ports.append(port)
            return port

    def port(self, number: int) -> SwitchPort:
        return self.ports[number]

    def deliver(self, ingress: int, frame: bytes) -> bool:
        with self.lock:
            before = self.switch.ports[ingress].counts["dropped"]
            for number in self.switch.forward(ingress, frame, self.clock()):
                self.ports[number]._enqueue(frame)
            return self.switch.ports[ingress].counts["dropped"] == before

    def close(self) -> None:
        for port in self.ports:
            if port.fd >= 0:
                os.close(port.fd)
                port.fd = -1


def build_networks(specs) -> dict[str, SwitchNetwork]:
    """A SwitchNetwork per plan/config.py NetworkSpec, its ports in ``members`` order."""
    networks = {}
    for spec in specs:
        network = SwitchNetwork(spec.name)
        for _ in spec.members:
            network.add_port()
        networks[spec.name] = network
    return networks
