"""Snapshots under ``osvmm up``: the control API's snapshot route, and the
hypercall monitor's part of a snapshot (docs/snapshots.md).

``SnapshotService(supervisor, live)`` answers ``POST
/v1/partitions/{name}/snapshot`` with ``{"dir": D, "stop": false}``: the
partition is paused, written with the state of the hypercall monitor that
concerns it (``monitor_extra``: the channels it has attached, and their
memory as images), and then goes on, or is stopped for good (a user stop: the
restart policy does not apply).

``reattach(live, pid, partition)`` is the other half, run when a partition
resumed from a snapshot is bound (up/hypercalls.py): each channel it had
attached is attached again through the monitor's own CHANNEL_ATTACH (so the
plan's rules apply: a channel this plan does not give it is an error), and its
memory is restored from the snapshot when no other partition has that channel
attached now (else the live content wins: it is shared, and others use it).
"""

from __future__ import annotations

import os

from osvmm.errors import ControlError, SnapshotError, WrongState
from osvmm.hypercall import abi

STATE_KEY = "hypercall"


def image_name(channel: str) -> str:
    return f"channel-{channel}"


def monitor_extra(live, pid: int):
    """(state, images) of what the monitor holds for partition ``pid`` (with its vCPUs
    paused): its attachments by channel name, each channel's memory."""
    with live.lock:
        if pid >= len(live.topology.partitions):  # one the monitor does not number
            return {}, {}
        chans = live.topology.channels
        held = live.state.attached(pid)
        state = {
            STATE_KEY: {
                "partition": live.topology.partitions[pid].name,
                "attachments": [
                    {"channel": chans[a.channel].name, "writable": a.writable} for a in held
                ],
            }
        }
        images = {image_name(chans[a.channel].name): live.channels[a.channel].mem for a in held}
    return state, images


def reattach(live, pid: int, partition) -> None:
    """Attach again what a resumed partition had attached (see above)."""
    extra = (partition.snapshot_extra or {}).get(STATE_KEY)
    if not extra:
        return
    by_name = {c.name: c for c in live.topology.channels if c.members}  # withdrawn: gone
    for att in extra["attachments"]:
        chan = by_name.get(att["channel"])
        if chan is None:
            raise SnapshotError(
                f"the snapshot had channel {att['channel']!r} attached; this plan has none"
            )
        with live.lock:
            others = [a for a in live.state.attachments if a.channel == chan.id]
        flags = 0 if att["writable"] else abi.ATTACH_READONLY
        result = live.call(pid, abi.CHANNEL_ATTACH, (chan.id, flags, 0, 0))
        if result < 0 or live.state.attachment(pid, chan.id).writable != att["writable"]:
            raise SnapshotError(
                f"channel {chan.name!r}: this plan does not let the partition attach it as "
                f"the snapshot had it ({'rw' if att['writable'] else 'ro'})"
            )
        data = partition.snapshot_images.get(image_name(chan.name))
        if data is not None and not others and len(data) == chan.size:
            live.channels[chan.id].write(0, bytes(data))


class SnapshotService:
    """The ``snapshot`` request of the control socket."""

    def __init__(self, supervisor, live):
        from collections import Counter

        self.sup = supervisor
        self.live = live
        self.taken: Counter = Counter()  # partition -> snapshots written (``/metrics``)

    def routes(self) -> list:
        """``POST /v1/partitions/{name}/snapshot`` (docs/openapi.yaml)."""
        from osvmm.up.api import NAME, Route

        body = {"dir": NAME, "stop": ((bool,), False)}
        return [
            Route(
                "POST", "/v1/partitions/{name}/snapshot", "snapshotPartition", self.snapshot, body
            )
        ]

    def snapshot(self, msg: dict) -> dict:
        from osvmm.up.supervisor import RUNNING

        name, directory = msg.get("name"), msg.get("dir")
        if not isinstance(name, str):
            raise ControlError("snapshot: needs a partition name")
        if not isinstance(directory, str) or not os.path.isabs(directory):
            raise ControlError("snapshot: needs an absolute directory (dir)")
        stop = bool(msg.get("stop", False))
        entry = self.sup.entry(name)
        part = entry.partition
        if part is None or entry.state != RUNNING:
            raise WrongState(f"partition {name!r} is not running ({entry.state})")
        reason = f"stopped after a snapshot to {directory}"

        def then() -> None:  # still paused: its vCPUs never run again
            self.sup.stop(name, wait=False, reason=reason)

        written, paused_ms = part.snapshot(
            directory,
            extra=lambda: monitor_extra(self.live, entry.index),
            then=then if stop else None,
        )
        self.sup.log(
            f"{name}: snapshot in {directory}: {written.bytes_stored >> 10} KiB stored, "
            f"paused {paused_ms:.1f} ms" + (", stopped" if stop else "")
        )
        state = self.sup.wait_stopped(name) if stop else entry.state
        self.taken[name] += 1
        return {
            "name": name,
            "dir": directory,
            "state": state,
            "memory": written.memory_size,
            "stored": written.bytes_stored,
            "state_bytes": written.state_size,
            "paused_ms": round(paused_ms, 3),
            "write_ms": round(written.seconds * 1000, 3),
        }
