"""Live migration of a running partition to another VMM (docs/snapshots.md).

Source (``send``), over a connected ``snapshot.stream.Stream``:

    1. HELO   the partition's name and vCPU profile (machine, CPUID, TSC, XSAVE);
              the destination checks it can run it and answers OKAY or FAIL
    2. pre-copy, the partition running:
              round 1   every page it ever touched that is not all zeros
              round n   the pages written since the previous round (KVM's dirty
                        log for the guest's writes: its dirty ring where the
                        partition has one, vmm/dirty_ring.py, else its dirty
                        bitmap; GuestMemory.written_pages for
                        the VMM's own), until what is left would take no longer
                        than the downtime target at the bandwidth measured, or
                        ``max_rounds``, or STALL_ROUNDS rounds without fewer
                        pages left than the best round (the guest writes faster
                        than they are sent: going on would not help)
    3. stop-and-copy, the partition quiesced (Partition.quiesced: its vCPUs
              paused, its device threads stopped between two requests):
              the last written pages, the state (STAT: vmm/snapshot.py ``collect``,
              the virtio devices' included), the images of the layers above (IMAG:
              channels); the disks, taps and vsock socket released
              (vmm/device_handover.py ``release``: a destination on this host
              opens them next); DONE
    4. the destination builds the partition (opening its disks, taps and socket),
       starts it and answers RUNS; only then does ``then()`` run, still paused,
       and stop the source for good (its devices never serve again).

Whatever fails before RUNS (the connection drops, the destination answers FAIL
or nothing) leaves the source as it was: its devices taken back (images locked,
taps attached, the socket listening again), its vCPUs go on, dirty tracking off.
The downtime measured is from the pause to RUNS.

Destination (``receive``): the frames of one migration into an
``IncomingSnapshot``, which ``Partition.build`` resumes as it does a snapshot
read from a directory (PartitionConfig.restore).
"""

from __future__ import annotations

import os
import struct
import time
from contextlib import ExitStack
from dataclasses import dataclass

from osvmm.arch.x86.layout import PAGE_SIZE
from osvmm.errors import GuestMemoryError, OsvmmError, SnapshotError
from osvmm.snapshot import format as fmt
from osvmm.snapshot import memfile
from osvmm.snapshot.stream import STREAM_VERSION
from osvmm.vmm import device_handover, snapshot

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
    dirty_log: str = ""  # "dirty ring" or "dirty bitmap" (Partition.dirty_log)
    ring_full_exits: int = 0  # vCPU exits for a full dirty ring during the migration


def profile(part) -> dict:
    """The HELO's profile, read without touching the running vCPUs: the machine,
    each vCPU's CPUID, TSC and XSAVE size, the devices and the networks, which the
    destination checks before the first page is sent."""
    xsave = snapshot.xsave_size(part.vm)
    return {
        "machine": snapshot.machine_state(part.machine),
        "vcpus": [
            {"cpuid": b"".join(bytes(e) for e in cpuid), "tsc_khz": khz, "xsave": xsave}
            for cpuid, khz in zip(part.cpuids, part.tsc_khz, strict=True)
        ],
        "devices": device_handover.profile(part),  # disks, NICs, vsock (their size, MAC, CID)
        # Its NICs on plan networks, checked by the destination before any page comes.
        "networks": [[port.network.name, mac.hex(":")] for port, mac in part.config.switch_nics],
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
    log=None,
) -> Report:
    """Migrate the running ``part`` over ``stream`` (above). ``extra()`` gives the
    layers above's (state, images) with the partition paused; ``then()`` runs once
    the destination runs it, still paused (a stop: the source never goes on).
    ``log(line)``: what could not be taken back after a failure (an image another
    process locked meanwhile: the partition goes on without the lock)."""
    t0 = time.perf_counter()
    stream.send(
        b"HELO", fmt.encode({"version": STREAM_VERSION, "name": name, "profile": profile(part)})
    )
    stream.expect(b"OKAY")
    memory = part.memory
    part.track_dirty(True)
    full_before = part.dirty_ring_full_exits
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
        with part.quiesced():  # its devices too: their state agrees with its memory
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
            released = device_handover.release(part)
            try:
                stream.send(b"DONE")
                stream.expect(b"RUNS")
            except BaseException:
                for problem in released.reacquire():
                    if log is not None:
                        log(f"{name}: after the failed migration: {problem}")
                raise
            downtime = time.perf_counter() - t_stop
            done = True
            device_handover.hand_off(part)
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
        part.dirty_log,
        part.dirty_ring_full_exits - full_before,
    )


def hand_over(parts, stream, then=None) -> Report:
    """A takeover: every partition of ``parts`` ((name, Partition, extra) triples,
    ``extra`` as in ``send``) to a new VMM on this host over ``stream`` (a Unix
    socket). All are quiesced at once (partitions sharing a channel stay in step;
    device threads stopped between two requests); guest memory in memfds is
    passed as file descriptors, not copied (any other region's pages are sent),
    and so are the devices' disk images (their locks with them), taps and vsock
    listener (vmm/device_handover.py); the new VMM resumes them all and answers
    RUNS; then the devices here are handed off (they never serve again) and
    ``then()`` runs, every partition still paused (it stops them for good). On
    any failure before RUNS they all go on here as they were."""
    t0 = time.perf_counter()
    hello = {
        "version": STREAM_VERSION,
        "takeover": True,
        "partitions": [{"name": name, "profile": profile(part)} for name, part, _ in parts],
    }
    stream.send(b"HELO", fmt.encode(hello))
    stream.expect(b"OKAY")
    pages = 0
    with ExitStack() as paused:
        for _, part, _ in parts:
            paused.enter_context(part.quiesced())  # devices too: none left to write memory
        t_stop = time.perf_counter()
        for name, part, extra in parts:
            if not part.running:
                raise SnapshotError(f"partition {name!r} ended during the takeover")
            stream.send_json(b"PART", {"name": name})
            shared = [r for r in part.memory.regions if r.backing == "memfd"]
            spec = [{"gpa": r.gpa, "size": r.size, "fd": i} for i, r in enumerate(shared)]
            # The devices' disk images, taps and vsock listener, open (an image's lock
            # goes with its open file): the new VMM adopts them (vmm/device_handover.py).
            devices, device_fds = device_handover.fds(part)
            for dev in devices:
                dev["fd"] += len(shared)
            stream.send_fds(
                b"FDS ",
                {"regions": spec, "devices": devices},
                [r.fd for r in shared] + device_fds,
            )
            for r in shared:
                r.shared_out = True  # the new VMM's pages too: never zeroed here
            for region in part.memory.regions:
                if region.backing != "memfd":  # anonymous or a snapshot's file: copied
                    runs = memfile.nonzero_pages(region.mem, snapshot.region_candidates(region))
                    pages += _send_runs(
                        stream, part.memory, [(region.gpa + lo, hi - lo) for lo, hi in runs]
                    )
            state, images = extra() if extra is not None else ({}, {})
            stream.send(b"STAT", fmt.encode(snapshot.collect(part, state)))
            for image, buf in images.items():
                key = image.encode()
                stream.send(b"IMAG", struct.pack("<H", len(key)), key, memoryview(buf))
        stream.send(b"DONE")
        stream.expect(b"RUNS")
        downtime = time.perf_counter() - t_stop
        for _, part, _ in parts:
            device_handover.hand_off(part)
        if then is not None:
            then()
    total = (time.perf_counter() - t0) * 1000
    return Report(1, stream.sent, pages, pages, total, downtime * 1000)


# -- the destination ------------------------------------------------------------------------


class IncomingSnapshot(snapshot.Snapshot):
    """A migrated partition's state and memory, as ``Partition.build`` takes a
    snapshot (PartitionConfig.restore); the memory moves into the partition."""

    def __init__(
        self, origin: str, state: dict, memory, images: dict[str, bytearray], ready=None, handed=()
    ):
        super().__init__(origin, state, {})
        self.origin = f"a migration from {origin}"
        self.name = state.get("name")  # the partition's name (the HELO's, once received)
        self._memory = memory
        self._images = images
        # vmm/ready.py ReadyVm made while the pages came, its memory the reservations':
        # the partition's build takes it (no VM made, no memslot registered then).
        self.ready = ready
        # A takeover's device backends: (kind, open fd) in slot order, which the build
        # adopts instead of opening its disks, taps and socket (``take_handed``).
        self._handed = list(handed)

    def take_handed(self) -> list[tuple[str, int]]:
        """The handed-over device descriptors, the caller's from now on."""
        handed, self._handed = self._handed, []
        return handed

    def map_memory(self, memory, lazy: bool, backing, reserved=None) -> None:
        """The regions that arrived move into ``memory`` (``reserved`` is unused: they
        lie over a ready VM's reservations already, where it made one)."""
        for region in list(self._memory.regions):
            self._memory.regions.remove(region)
            memory._add(region)

    def extra_images(self) -> dict[str, bytearray]:
        return dict(self._images)

    def close(self) -> None:
        self._memory.close()  # what the partition did not take
        for _, fd in self.take_handed():
            os.close(fd)
        if self.ready is not None:
            self.ready.close()  # taken (then nothing is left to close), or not


def _hello(stream, accept) -> tuple[dict, list]:
    """The HELO, each partition in it accepted (``accept(name, profile)`` returns
    the backing of its new RAM regions: vmm/memory.py), then OKAY; or FAIL sent
    back and the error raised."""
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
        wanted = hello["partitions"] if hello.get("takeover") else [hello]
        backings = [accept(p["name"], p["profile"]) for p in wanted]
    except (KeyError, TypeError) as err:
        stream.send_json(b"FAIL", {"error": f"malformed HELO ({err!r})"})
        raise SnapshotError(f"{stream.peer} sent a malformed HELO") from None
    except OsvmmError as err:
        stream.send_json(b"FAIL", {"error": str(err)})
        raise
    stream.send_json(b"OKAY", {})
    return hello, [(p["name"], p["profile"], b) for p, b in zip(wanted, backings, strict=True)]


class _Arriving:
    """One partition's memory, state and images as its frames come in."""

    def __init__(self, stream, name: str, profile: dict, backing, make_ready=None):
        from osvmm.vmm.memory import GuestMemory

        self.stream = stream
        self.name = name
        self.machine = snapshot.machine_from_state(profile["machine"])
        self.ranges = self.machine.ram_ranges
        self.backing = backing
        self.make_ready = make_ready
        self.ready = None
        self.memory = GuestMemory([])
        self.state = None
        self.images: dict[str, bytearray] = {}
        self.handed: list[tuple[str, int]] = []  # a takeover's device fds (kind, fd)

    def allocate_rest(self) -> None:
        """Zeroed regions for every RAM range no file descriptor brought; when none
        did and ``make_ready(machine)`` is given, over the reservations of the VM it
        makes now, while the pages come (vmm/ready.py)."""
        have = {r.gpa for r in self.memory.regions}
        if not have and self.make_ready is not None:
            try:
                self.ready = self.make_ready(self.machine)
            except OsvmmError:
                self.ready = None  # the build makes the VM then (and reports what fails)
        for gpa, size in self.ranges:
            if gpa not in have:
                reserved = self.ready.claim(gpa) if self.ready is not None else None
                self.memory.add_region(gpa, size, self.backing(size), reserved)

    def adopt(self, spec: dict, fds: list[int]) -> None:
        """FDS: the regions given as memfds (the very pages of the old VMM)."""
        used = set()
        try:
            for dev in spec.get("devices", []):
                if dev["kind"] not in ("blk", "net", "vsock"):
                    raise SnapshotError(f"a {dev['kind']!r} device handed over")
                self.handed.append((dev["kind"], fds[dev["fd"]]))
                used.add(fds[dev["fd"]])
            for reg in spec["regions"]:
                if (reg["gpa"], reg["size"]) not in self.ranges:
                    where = f"{reg['gpa']:#x}+{reg['size']:#x}"
                    raise SnapshotError(f"a memfd for {where}: no such RAM range")
                fd = fds[reg["fd"]]
                self.memory.add_fd_region(reg["gpa"], reg["size"], fd)
                used.add(fd)
        finally:
            for fd in fds:
                if fd not in used:
                    os.close(fd)
        self.allocate_rest()

    def frame(self, kind: bytes, length: int) -> None:
        stream = self.stream
        if kind == b"PAGE":
            if not self.memory.regions:
                self.allocate_rest()
            (gpa,) = struct.unpack("<Q", stream.recv_exact(8))
            size = length - 8
            try:
                if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
                    raise GuestMemoryError(f"{size} bytes at {gpa:#x}")
                view = self.memory.view(gpa, size)
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
            self.state = state
        elif kind == b"IMAG":
            (n,) = struct.unpack("<H", stream.recv_exact(2))
            name = stream.recv_exact(n).decode("utf-8", "replace")
            self.images[name] = bytearray(stream.recv_exact(length - 2 - n))
        elif kind == b"FDS ":
            fds, stream.fds = stream.fds, []
            try:
                spec = stream.recv_json(length)
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            if self.memory.regions:
                for fd in fds:
                    os.close(fd)
                raise SnapshotError(f"{stream.peer} sent memfds after pages")
            self.adopt(spec, fds)
        else:
            raise SnapshotError(f"{stream.peer} sent {kind.decode()} during the migration")

    def done(self) -> IncomingSnapshot:
        if self.state is None:
            raise SnapshotError(f"{self.stream.peer} sent no state for {self.name!r}")
        if not self.memory.regions:
            self.allocate_rest()
        incoming = IncomingSnapshot(
            self.stream.peer, self.state, self.memory, self.images, self.ready, self.handed
        )
        self.ready = None  # the arrival's now
        self.handed = []
        incoming.name = self.name
        return incoming

    def close(self) -> None:
        self.memory.close()
        for _, fd in self.handed:
            os.close(fd)
        self.handed = []
        if self.ready is not None:
            self.ready.close()


def receive(stream, accept, make_ready=None) -> list[IncomingSnapshot]:
    """One migration's frames, HELO to DONE (or a takeover's, every partition's):
    the partitions that arrived, to resume. ``accept(name, profile)`` checks that
    this VMM can take a partition and returns the backing of its new memory, or
    raises an OsvmmError, sent back as FAIL (then this raises it too).
    ``make_ready(machine)``: a ReadyVm (vmm/ready.py) for a migrated partition,
    made when its first pages arrive, which its build takes."""
    hello, accepted = _hello(stream, accept)
    arriving: list[_Arriving] = []
    try:
        if not hello.get("takeover"):
            arriving.append(_Arriving(stream, *accepted[0], make_ready))
        by_name = {name: (name, profile, backing) for name, profile, backing in accepted}
        while True:
            kind, length = stream.recv_header()
            if kind != b"FDS ":
                for fd in stream.fds:  # file descriptors only come with FDS
                    os.close(fd)
                stream.fds = []
            if kind == b"DONE":
                break
            if kind == b"PART":
                name = stream.recv_json(length).get("name")
                if name not in by_name or any(a.name == name for a in arriving):
                    raise SnapshotError(f"{stream.peer} sent partition {name!r} unannounced")
                arriving.append(_Arriving(stream, *by_name[name]))
                continue
            if not arriving:
                raise SnapshotError(f"{stream.peer} sent {kind.decode()} before a PART")
            arriving[-1].frame(kind, length)
        if len(arriving) != len(accepted):
            raise SnapshotError(f"{stream.peer} sent {len(arriving)} of {len(accepted)} partitions")
        return [a.done() for a in arriving]
    except BaseException:
        for a in arriving:
            a.close()
        raise
