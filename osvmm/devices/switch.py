"""A learning Ethernet switch (IEEE 802.1D's forwarding, no spanning tree): the
model of a plan's ``[[network]]``, no I/O and no threads of its own.

``forward(ingress, frame, now)`` says which ports a frame goes to:

- a frame shorter than an Ethernet header (14 bytes) or longer than
  ``max_frame`` goes nowhere, counted as ``dropped`` on its ingress port;
- its source address, when unicast, is learned: the MAC table maps it to the
  ingress port (a station that moved is relearned at once);
- a unicast destination in the table, not older than ``ageing`` seconds, goes
  to that one port; one learned on the ingress port itself goes nowhere (the
  station is on the sender's side already);
- broadcast, multicast and unknown unicast are flooded to every other port.

Never back to the ingress port, never to a port of another switch (a switch
knows only its own ports). The table holds at most ``table_size`` addresses:
a new one evicts the least recently seen. Time comes from the caller (``now``,
seconds, any monotonic clock), so the model is deterministic under test.
"""

from __future__ import annotations

from collections import OrderedDict

ETH_HEADER = 14
MAX_FRAME = 1514  # an untagged frame without FCS at the standard MTU of 1500
TABLE_SIZE = 1024
AGEING = 300.0  # seconds, 802.1D's default ageing time


class Port:
    """One port's counters: frames in (``rx``), out (``tx``), dropped on input."""

    def __init__(self, number: int):
        self.number = number
        self.counts = {"rx": 0, "tx": 0, "dropped": 0, "flooded": 0}


class Switch:
    def __init__(
        self,
        name: str = "",
        *,
        max_frame: int = MAX_FRAME,
        table_size: int = TABLE_SIZE,
        ageing: float = AGEING,
    ):
        if table_size < 1:
            raise ValueError("a MAC table holds at least one address")
        self.name = name
        self.max_frame = max_frame
        self.table_size = table_size
        self.ageing = ageing
        self.ports: list[Port] = []
        self.table: OrderedDict[bytes, tuple[int, float]] = OrderedDict()
        self.evicted = 0

    def add_port(self) -> int:
        port = Port(len(self.ports))
        self.ports.append(port)
        return port.number

    def _learn(self, mac: bytes, port: int, now: float) -> None:
        if mac[0] & 1:
            return  # a group address is never a source: not learned
        self.table[mac] = (port, now)
        self.table.move_to_end(mac)
        while len(self.table) > self.table_size:
            self.table.popitem(last=False)
            self.evicted += 1

    def lookup(self, mac: bytes, now: float) -> int | None:
        entry = self.table.get(mac)
        if entry is None:
            return None
        port, seen = entry
        if now - seen > self.ageing:
            del self.table[mac]
            return None
        return port

    def forward(self, ingress: int, frame: bytes, now: float) -> list[int]:
        """The ports ``frame``, received on port ``ingress``, goes out of."""
        if not 0 <= ingress < len(self.ports):
            raise ValueError(f"switch {self.name}: no port {ingress}")
        port = self.ports[ingress]
        if not ETH_HEADER <= len(frame) <= self.max_frame:
            port.counts["dropped"] += 1
            return []
        port.counts["rx"] += 1
        dst, src = bytes(frame[0:6]), bytes(frame[6:12])
        self._learn(src, ingress, now)
        egress = None if dst[0] & 1 else self.lookup(dst, now)
        if egress is None:
            port.counts["flooded"] += 1
            out = [p.number for p in self.ports if p.number != ingress]
        elif egress == ingress:
            out = []
        else:
            out = [egress]
        for number in out:
            self.ports[number].counts["tx"] += 1
        return out
