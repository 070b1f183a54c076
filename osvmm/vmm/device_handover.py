"""A partition's device backends moving to another VMM: its disk images, taps and
vsock socket, with a live migration or a takeover (docs/snapshots.md).

The devices' state (virtio transports and queues, a NIC's held frame) moves in
the state as in a snapshot; what moves here is what a snapshot reopens by path:

- ``profile(part)``: per virtio device, what the other VMM must match (a disk's
  size and mode, a NIC's MAC, the vsock's CID), sent in the HELO, and
  ``check_profile`` the destination's check of its plan against it, before any
  page moves (a disk of another size: one line, nothing moved).
- A migration (``release``, the partition quiesced, its state collected): the
  images flushed and their locks released, the taps closed, the vsock's
  listener closed and its file removed, so that a destination on this host can
  open them; ``Released.reacquire`` takes them back when the migration fails
  after that (the vsock's connections were never closed: they go on).
- A takeover (``fds``): the open descriptors themselves go with the memfds
  (SCM_RIGHTS); an image's lock belongs to the open file, so it goes with the
  descriptor and is never taken again. The new VMM builds the backends on them
  (``adopt``), the vsock's file not its own (not removed) until the takeover is
  confirmed (``claim``).
- ``hand_off(part)``, once the other VMM runs the partition: the device threads
  never run here again (a request still in a queue is the other VMM's to serve),
  and the vsock's file is left to it.

NICs on a plan's network are not here: their port is the VMM's own switch's, so
there is nothing to release or hand over; the migration profile names their
networks and MACs (vmm/migration.py), and the other VMM attaches each to its
port of the network of that name.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

from osvmm.errors import ConfigError, SnapshotError
from osvmm.vmm.blockfile import RawImage, lock_image
from osvmm.vmm.switch_port import SwitchPort
from osvmm.vmm.tap import Tap, default_mac, open_tap
from osvmm.vmm.vsock_uds import UdsBackend

RELOCK_SECONDS = 10  # a failed migration's destination may still be closing the image


def _kind(backend) -> str:
    if isinstance(backend, RawImage):
        return "blk"
    if isinstance(backend, Tap):
        return "net"
    if isinstance(backend, UdsBackend):
        return "vsock"
    if isinstance(backend, SwitchPort):
        return "switch"  # a port of the VMM's own switch: nothing to hand over
    raise SnapshotError(f"a device on {getattr(backend, 'path', backend)!r} cannot be moved")


def profile(part) -> list[dict]:
    """Per virtio device in slot order: ``kind`` and what must match at the other end."""
    if part.virtio is None:
        return []
    out = []
    for dev, backend in zip(part.virtio.devices, part.virtio.backends, strict=True):
        model, kind = dev.transport.model, _kind(backend)
        if kind == "switch":  # the migration profile's "networks" names them
            continue
        if kind == "blk":
            st = os.fstat(backend.fd)  # the file itself, for a takeover (same host)
            out.append(
                {
                    "kind": kind,
                    "path": backend.path,
                    "size": backend.size,
                    "ro": backend.readonly,
                    "file": [st.st_dev, st.st_ino],
                }
            )
        elif kind == "net":
            out.append({"kind": kind, "tap": backend.name, "mac": model.mac.hex(":")})
        else:
            out.append({"kind": kind, "uds": backend.path, "cid": model.guest_cid})
    return out


def check_profile(
    devices: list[dict], drives, nets, vsock, who: str, takeover: bool = False
) -> None:
    """SnapshotError (one line) unless a partition given ``drives`` (plan/drives.py
    Drive), ``nets`` (Net) and ``vsock`` (Vsock or None) can take the devices of
    ``profile``: as many disks, each of the same size (the guest knows its
    capacity: shared storage, or a copy) and mode; as many tap NICs, each with its
    MAC (the tap may be another); the vsock's CID. ``takeover``: and the very
    files and taps (this host's), which the new VMM adopts."""
    disks = [d for d in devices if d["kind"] == "blk"]
    if len(disks) != len(drives):
        raise SnapshotError(f"{who} has {len(drives)} disks, the migrated one {len(disks)}")
    for i, (had, drive) in enumerate(zip(disks, drives, strict=True)):
        try:
            size = os.stat(drive.path).st_size
        except OSError as e:
            raise SnapshotError(f"{who}: disk {i} {drive.path}: {e.strerror}") from None
        if size != had["size"]:
            raise SnapshotError(
                f"{who}: disk {i} {drive.path} has {size} bytes, the migrated one "
                f"({had['path']}) {had['size']}: it needs the same disk"
            )
        if drive.readonly != had["ro"]:
            mode = "read-only" if had["ro"] else "writable"
            raise SnapshotError(f"{who}: disk {i} {drive.path}: the migrated one is {mode}")
        if takeover and list(_identity(drive.path)) != had.get("file"):
            raise SnapshotError(
                f"{who}: disk {i} {drive.path} is not the running partition's ({had['path']})"
            )
    taps = [d for d in devices if d["kind"] == "net"]
    if len(taps) != len(nets):
        raise SnapshotError(f"{who} has {len(nets)} tap NICs, the migrated one {len(taps)}")
    for i, (had, net) in enumerate(zip(taps, nets, strict=True)):
        mac = (net.mac or default_mac(net.tap)).hex(":")
        if mac != had["mac"]:  # the driver read it: the guest knows it
            raise SnapshotError(
                f"{who}: NIC {i} tap={net.tap}: MAC {mac}, the migrated one's (tap "
                f"{had['tap']}) is {had['mac']}: give mac={had['mac']}"
            )
        if takeover and net.tap != had["tap"]:  # its descriptor is handed over
            raise SnapshotError(
                f"{who}: NIC {i}: tap {net.tap}, the running partition's is {had['tap']}"
            )
    socks = [d for d in devices if d["kind"] == "vsock"]
    if bool(socks) != (vsock is not None):
        raise SnapshotError(
            f"{who} has {'a vsock' if vsock is not None else 'no vsock'}, the migrated one "
            f"{'has one' if socks else 'none'}"
        )
    if socks and socks[0]["cid"] != vsock.cid:
        raise SnapshotError(
            f"{who}: vsock cid {vsock.cid}, the migrated one's is {socks[0]['cid']}"
        )
    if socks and takeover and socks[0]["uds"] != vsock.uds:
        raise SnapshotError(
            f"{who}: vsock {vsock.uds}, the running partition's listens at {socks[0]['uds']}"
        )


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


# -- a migration: released at stop-and-copy, taken back if it fails -------------------------------


class Released:
    """What ``release`` let go of, to take back (``reacquire``)."""

    def __init__(self, images: list[RawImage], taps: list[Tap], socks: list[UdsBackend]):
        self.images = images
        self.taps = taps
        self.socks = socks

    def reacquire(self, timeout: float = RELOCK_SECONDS) -> list[str]:
        """Every image locked again, tap attached again, socket listening again; what
        could not be (one line each: the partition goes on without it)."""
        problems = []
        deadline = time.monotonic() + timeout
        for image in self.images:
            while True:
                try:
                    lock_image(image.fd, image.readonly)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        problems.append(f"{image.path}: not locked again (held elsewhere)")
                        break
                    time.sleep(0.05)
                except OSError as e:
                    problems.append(f"{image.path}: not locked again: {e.strerror}")
                    break
        for tap in self.taps:
            try:
                fresh = open_tap(tap.name, "net")
            except ConfigError as err:
                problems.append(str(err))
            else:
                tap.fd, fresh.fd = fresh.fd, -1
        for sock in self.socks:
            try:
                sock.listen_again()
            except ConfigError as err:
                problems.append(str(err))
        return problems


def release(part) -> Released:
    """With ``part`` quiesced (its device threads stopped) and its state collected:
    each writable image flushed and every image's lock released (the descriptor
    stays open), each tap closed (one osvmm made goes, as at the end of a run), the
    vsock's listener closed and its file removed (its connections stay)."""
    images, taps, socks = [], [], []
    if part.virtio is None:
        return Released(images, taps, socks)
    try:
        for backend in part.virtio.backends:
            if isinstance(backend, RawImage):
                if not backend.readonly:
                    backend.flush()
                fcntl.flock(backend.fd, fcntl.LOCK_UN)
                images.append(backend)
            elif isinstance(backend, Tap):
                backend.close()
                taps.append(backend)
            elif isinstance(backend, UdsBackend):
                backend.stop_listening()
                socks.append(backend)
    except OSError as e:
        Released(images, taps, socks).reacquire(0)
        raise SnapshotError(f"cannot release the devices: {e.strerror}") from None
    return Released(images, taps, socks)


def hand_off(part) -> None:
    """The other VMM runs the partition: its devices never serve here again, and the
    vsock's socket file (a takeover's: the very one the new VMM listens on) stays."""
    if part.virtio is None:
        return
    part.virtio.handed_off = True
    for backend in part.virtio.backends:
        if isinstance(backend, UdsBackend):
            backend.disown_file()


# -- a takeover: the descriptors themselves ------------------------------------------------------


def fds(part) -> tuple[list[dict], list[int]]:
    """Each device backend's descriptor and what it is: (spec in slot order, fds)."""
    spec, out = [], []
    for backend in part.virtio.backends if part.virtio is not None else ():
        kind = _kind(backend)
        if kind == "switch":  # the new VMM's switch has its own ports
            continue
        if kind == "vsock":
            if backend.listener is None:
                raise SnapshotError(f"vsock {backend.path}: not listening")
            fd = backend.listener.fileno()
        else:
            fd = backend.fd
        spec.append({"kind": kind, "fd": len(out)})
        out.append(fd)
    return spec, out


def adopt(handed: list[tuple[str, int]], config, who: str) -> tuple[list, list, UdsBackend | None]:
    """The backends of ``config`` (vmm/partition.py PartitionConfig: its drives, nets
    and vsock) on the descriptors a takeover handed over (``handed``: (kind, fd) in
    slot order, each closed here, or the backend's): each must be the one the
    config names (the same file, tap, socket path), else a ConfigError."""
    taken: list = []
    try:
        kinds = [k for k, _ in handed]
        wanted = ["blk"] * len(config.drives) + ["net"] * len(config.nets)
        wanted += ["vsock"] * (config.vsock is not None)
        if kinds != wanted:
            raise ConfigError(f"{who}: the devices handed over are {kinds}, the plan's {wanted}")
        fd_of = iter(fd for _, fd in handed)
        disks, taps = [], []
        for drive in config.drives:
            fd = next(fd_of)
            try:
                st, there = os.fstat(fd), os.stat(drive.path)
            except OSError as e:
                raise ConfigError(f"{who}: drive {drive.path}: {e.strerror}") from None
            readonly = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
            if (st.st_dev, st.st_ino) != (there.st_dev, there.st_ino):
                raise ConfigError(f"{who}: drive {drive.path}: not the running partition's disk")
            if readonly != drive.readonly:
                raise ConfigError(f"{who}: drive {drive.path}: the running one's mode differs")
            disks.append(RawImage(fd, st.st_size, readonly, drive.path))
            taken.append(disks[-1])
        for net in config.nets:
            taps.append(Tap(next(fd_of), net.tap))
            taken.append(taps[-1])
        vsock = None
        if config.vsock is not None:
            sock = socket.socket(fileno=next(fd_of))
            vsock = UdsBackend(config.vsock.uds, sock, owns_file=False)
            taken.append(vsock)
            if sock.getsockname() != config.vsock.uds:
                raise ConfigError(
                    f"{who}: vsock {config.vsock.uds}: the running one listens at "
                    f"{sock.getsockname()}"
                )
        return disks, taps, vsock
    except BaseException:
        for backend in taken:
            backend.close()
        for _, fd in handed[len(taken) :]:
            os.close(fd)
        raise


def claim(part) -> None:
    """The takeover is confirmed: the vsock's socket file is this VMM's to remove."""
    for backend in part.virtio.backends if part.virtio is not None else ():
        if isinstance(backend, UdsBackend):
            backend.own_file()
