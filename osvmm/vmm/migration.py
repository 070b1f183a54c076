"""Live migration of a running partition to another VMM (docs/snapshots.md).

Source (``send``), over a connected ``snapshot.stream.Stream``:

    1. HELO   the partition's name and vCPU profile (machine, CPUID, TSC, XSAVE);
              the destination checks it can run it and answers OKAY or FAIL
    2. pre-copy, the partition running:
              round 1   every page it ever touched that is not all zeros
              round n   the pages written since the previous round (KVM's dirty
                        log for the guest's writes, GuestMemory.written_pages for
                        the VMM's own), until what is left would take no longer
                        than the downtime target at the bandwidth measured, or
                        ``max_rounds``, or STALL_ROUNDS rounds without fewer
                        pages left than the best round (the guest writes faster
                        than they are sent: going on would not help)
    3. stop-and-copy, the partition paused (Partition.paused):
              the last written pages, the state (STAT: vmm/snapshot.py ``collect``),
              the images of the layers above (IMAG: channels), DONE
    4. the destination builds the partition, starts it and answers RUNS; only
       then does ``then()`` run, still paused, and stop the source for good.

Whatever fails before RUNS (the connection drops, the destination answers FAIL
or nothing) leaves the source as it was: its vCPUs go on, dirty tracking off.
The downtime measured is from the pause to RUNS.

Destination (``receive``): the frames of one migration into an
``IncomingSnapshot``, which ``Partition.build`` resumes as it does a snapshot
read from a directory (PartitionConfig.restore).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from osvmm.arch.x86.layout import PAGE_SIZE
from osvmm.errors import GuestMemoryError, OsvmmError, SnapshotError
from osvmm.snapshot import format as fmt
from osvmm.snapshot import memfile
from osvmm.snapshot.stream import STREAM_VERSION
from osvmm.vmm import snapshot

MAX_RUN = 4 << 20  # bytes of one PAGE frame at most
STALL_ROUNDS = 5


@dataclass
class Report:
    """What a migration did, for the user and the benchmarks."""

    rounds: int  # pre-copy rounds, the first one included
    bytes_sent: int  # every byte sent: pages, state, images
    pages_sent: int
    stop_pages: int  # pages sent with the partition paused
    total_ms: float
    downtime_ms: float  # paused: from the pause to the destination's RUNS


def profile(part) -> dict:
    """The HELO's vCPU profile, read without touching the running vCPUs."""
    xsave = snapshot.xsave_size(part.vm)
    return {
        "machine": snapshot.machine_state(part.machine),
        "vcpus": [
            {"cpuid": b"".join(bytes(e) for e in cpuid), "tsc_khz": khz, "xsave": xsave}
            for cpuid, khz in zip(part.cpuids, part.tsc_khz, strict=True)
        ],
    }


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted page addresses to (gpa, bytes) runs of at most MAX_RUN."""
    out: list[list[int]] = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p and out[-1][1] < MAX_RUN:
            out[-1][1] += PAGE_SIZE
        else:
            out.append([p, PAGE_SIZE])
    return [(g, n) for g, n in out]


def _send_runs(stream, memory, runs) -> int:
    """Send each run of guest memory; the pages sent."""
    pages = 0
    for gpa, size in runs:
        region = memory.region_of(gpa)
        end = min(gpa + size, region.end)  # a run never crosses a region
        view = memory.view(gpa, end - gpa)
        try:
            stream.send_pages(gpa, view)
        finally:
            view.release()
        pages += (end - gpa) // PAGE_SIZE
    return pages


def send(
    part,
    stream,
    name: str,
    downtime_ms: float = 300,
    extra=None,
    then=None,
    max_rounds: int = 30,
) -> Report:
    """Migrate the running ``part`` over ``stream`` (above). ``extra()`` gives the
    layers above's (state, images) with the partition paused; ``then()`` runs once
    the destination runs it, still paused (a stop: the source never goes on)."""
    t0 = time.perf_counter()
    stream.send(
        b"HELO", fmt.encode({"version": STREAM_VERSION, "name": name, "profile": profile(part)})
    )
    stream.expect(b"OKAY")
    memory = part.memory
    part.track_dirty(True)
    done = False
    try:
        # Round 1: what the partition ever touched, zero pages left out (the
        # destination's memory starts zeroed).
        t = time.perf_counter()
        sent = 0
        for region in memory.regions:
            runs = memfile.nonzero_pages(region.mem, snapshot.region_candidates(region))
            sent += _send_runs(stream, memory, [(region.gpa + lo, hi - lo) for lo, hi in runs])
        pages_sent, rounds = sent, 1
        rate = sent * PAGE_SIZE / max(time.perf_counter() - t, 1e-6)  # bytes per second
        # Later rounds: what was written meanwhile, until the rest fits the downtime.
        best, since_best = None, 0
        while True:
            pending = part.dirty_pages()
            if len(pending) * PAGE_SIZE / max(rate, 1) * 1000 <= downtime_ms:
                break
            if best is None or len(pending) < best:
                best, since_best = len(pending), 0
            else:
                since_best += 1
            if rounds >= max_rounds or since_best >= STALL_ROUNDS:
                break
            t = time.perf_counter()
            sent = _send_runs(stream, memory, _runs(pending))
            pages_sent += sent
            rounds += 1
            rate = max(rate * 0.5, sent * PAGE_SIZE / max(time.perf_counter() - t, 1e-6))
        with part.paused():
            t_stop = time.perf_counter()
            if not part.running:
                raise SnapshotError(f"partition {name!r} ended during its migration")
            last = sorted(set(pending) | set(part.dirty_pages()))
            stop_pages = _send_runs(stream, memory, _runs(last))
            state, images = extra() if extra is not None else ({}, {})
            stream.send(b"STAT", fmt.encode(snapshot.collect(part, state)))
            for image, buf in images.items():
                key = image.encode()
                stream.send(b"IMAG", struct.pack("<H", len(key)), key, memoryview(buf))
            stream.send(b"DONE")
            stream.expect(b"RUNS")
            downtime = time.perf_counter() - t_stop
            done = True
            if then is not None:
                then()
    finally:
        if not done:
            part.track_dirty(False)  # the source goes on as it was
    return Report(
        rounds,
        stream.sent,
        pages_sent + stop_pages,
        stop_pages,
        (time.perf_counter() - t0) * 1000,
        downtime * 1000,
    )


# -- the destination ------------------------------------------------------------------------


class IncomingSnapshot(snapshot.Snapshot):
    """A migrated partition's state and memory, as ``Partition.build`` takes a
    snapshot (PartitionConfig.restore); the memory moves into the partition."""

    def __init__(self, origin: str, state: dict, memory, images: dict[str, bytearray]):
        super().__init__(origin, state, {})
        self.origin = f"a migration from {origin}"
        self.name = state.get("name")  # the partition's name (the HELO's, once received)
        self._memory = memory
        self._images = images

    def map_memory(self, memory, lazy: bool, backing) -> None:
        for region in list(self._memory.regions):
            self._memory.regions.remove(region)
            memory._add(region)

    def extra_images(self) -> dict[str, bytearray]:
        return dict(self._images)

    def close(self) -> None:
        self._memory.close()  # what the partition did not take


def receive(stream, accept) -> IncomingSnapshot:
    """One migration's frames, HELO to DONE. ``accept(name, profile)`` checks that
    this VMM can take the partition and returns its zeroed GuestMemory, or raises an
    OsvmmError, sent back as FAIL (then this raises it too)."""
    kind, length = stream.recv_header()
    if kind != b"HELO":
        raise SnapshotError(f"{stream.peer} did not start with HELO")
    hello = fmt.decode(stream.recv_exact(length), "the migration's HELO")
    try:
        if hello.get("version") != STREAM_VERSION:
            raise SnapshotError(
                f"migration stream version {hello.get('version')}; this osvmm speaks "
                f"{STREAM_VERSION}"
            )
        memory = accept(hello["name"], hello["profile"])
    except (KeyError, TypeError) as err:
        stream.send_json(b"FAIL", {"error": f"malformed HELO ({err!r})"})
        raise SnapshotError(f"{stream.peer} sent a malformed HELO") from None
    except OsvmmError as err:
        stream.send_json(b"FAIL", {"error": str(err)})
        raise
    try:
        stream.send_json(b"OKAY", {})
        state, images = None, {}
        while True:
            kind, length = stream.recv_header()
            if kind == b"PAGE":
                (gpa,) = struct.unpack("<Q", stream.recv_exact(8))
                size = length - 8
                try:
                    if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
                        raise GuestMemoryError(f"{size} bytes at {gpa:#x}")
                    view = memory.view(gpa, size)
                except GuestMemoryError as err:
                    raise SnapshotError(f"{stream.peer} sent pages outside memory: {err}") from None
                try:
                    stream.recv_into(view)
                finally:
                    view.release()
            elif kind == b"STAT":
                state = fmt.decode(stream.recv_exact(length), "the migrated state")
                try:
                    snapshot.check_sections(state, with_images=False)
                except (KeyError, TypeError, ValueError) as err:
                    raise SnapshotError(f"the migrated state is malformed ({err!r})") from None
            elif kind == b"IMAG":
                (n,) = struct.unpack("<H", stream.recv_exact(2))
                name = stream.recv_exact(n).decode("utf-8", "replace")
                images[name] = bytearray(stream.recv_exact(length - 2 - n))
            elif kind == b"DONE":
                break
            else:
                raise SnapshotError(f"{stream.peer} sent {kind.decode()} during the migration")
        if state is None:
            raise SnapshotError(f"{stream.peer} finished without the partition's state")
        incoming = IncomingSnapshot(stream.peer, state, memory, images)
        incoming.name = hello["name"]
        return incoming
    except BaseException:
        memory.close()
        raise
