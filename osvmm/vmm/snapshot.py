"""Snapshots of a partition: what is collected, written, read back and applied.

A snapshot is a directory (docs/snapshots.md):

    state            the state file (osvmm/snapshot/format.py): every vCPU's and
                     the VM's KVM state, the devices, the machine, the images
    memory           guest RAM as a sparse image (osvmm/snapshot/memfile.py)
    <other images>   e.g. the channels a partition had attached (``osvmm up``)

Writing (``write``) happens with every vCPU parked (``Partition.paused``): each
vCPU has left KVM_RUN through the interrupted-exit path, after KVM finished
whatever I/O or MMIO it was completing, so its registers are between two
instructions and nothing is half done. Files are written under temporary names
and renamed, memory first and the state last: a snapshot directory holds a
whole snapshot or the previous one, and a partition whose memory is mapped from
a snapshot (a lazy restore) may write a new snapshot into the same directory
(the file it maps is replaced, never changed).

Reading (``Snapshot.read``) checks everything before anything is built: the
state file (magic, version, size, SHA-256), its sections, every image (size,
each extent's CRC-32, nothing but zeros outside the extents). Applying
(``apply``) happens on vCPUs that exist but have not run, in the order KVM
needs: CPUID first (when the vCPU is created), then per vCPU the general
registers, XSAVE (or the legacy FPU state), XCRs, special registers, MSRs
(all but the TSC deadline), the MP state, the LAPIC, the TSC deadline (which
needs the LAPIC in that mode), pending events and debug registers; then the
PICs, the I/O APIC and the PIT; the devices; and last the KVM clock.

What a host must offer to restore a snapshot (else ``SnapshotError``,
"incompatible host: ..."): every CPUID feature the vCPUs had, the same TSC
frequency (within 250 ppm) unless KVM can scale it, an XSAVE area at least as
large, and every MSR the snapshot holds.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass

from osvmm import __version__
from osvmm.arch.x86.cpuid import missing_features, vcpu_cpuid
from osvmm.errors import KvmError, SnapshotError
from osvmm.kvm import ioctls as io
from osvmm.kvm import structs as s
from osvmm.machine import Machine, NumaNode
from osvmm.snapshot import format as fmt
from osvmm.snapshot import memfile

STATE_FILE = "state"
MEMORY_FILE = "memory"
MEMORY_IMAGE = "memory"
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
TSC_TOLERANCE_PPM = 250  # KVM's own tolerance before it scales a TSC
_VCPU_BLOBS = {  # key -> the structure its bytes must fill
    "regs": s.kvm_regs,
    "sregs": s.kvm_sregs,
    "xcrs": s.kvm_xcrs,
    "lapic": s.kvm_lapic_state,
    "events": s.kvm_vcpu_events,
    "debugregs": s.kvm_debugregs,
}
_VM_BLOBS = {
    "pic_master": s.kvm_irqchip,
    "pic_slave": s.kvm_irqchip,
    "ioapic": s.kvm_irqchip,
    "pit": s.kvm_pit_state2,
}
_CHIPS = {
    "pic_master": s.KVM_IRQCHIP_PIC_MASTER,
    "pic_slave": s.KVM_IRQCHIP_PIC_SLAVE,
    "ioapic": s.KVM_IRQCHIP_IOAPIC,
}


# -- collecting (vCPUs parked) ----------------------------------------------------------------


def xsave_size(vm) -> int:
    """Bytes of this host's XSAVE area (0: no XSAVE, the legacy FPU state instead)."""
    if not vm.check_extension(io.KVM_CAP_XSAVE):
        return 0
    return max(vm.check_extension(io.KVM_CAP_XSAVE2), ctypes.sizeof(s.kvm_xsave))


def read_msrs(vcpu, indices: list[int]) -> list[list[int]]:
    """[index, value] of every MSR of ``indices`` KVM can read on ``vcpu`` (one it
    cannot, e.g. for a feature this vCPU lacks, is left out)."""
    out: list[list[int]] = []
    todo = list(indices)
    while todo:
        got = vcpu.get_msrs(todo)
        out.extend([i, v] for i, v in got)
        todo = todo[len(got) + 1 :]  # skip the one KVM stopped at
    return out


def capture_vcpu(vcpu, cpuid, msr_indices: list[int], xsave_bytes: int) -> dict:
    """``cpuid``: the entries osvmm set on the vCPU (KVM_GET_CPUID2 is not asked: a
    PVM host answers with its own features, not those the vCPU was given)."""
    st = {
        "regs": bytes(vcpu.get_regs()),
        "sregs": bytes(vcpu.get_sregs()),
        "msrs": read_msrs(vcpu, msr_indices),
        "mp_state": vcpu.get_mp_state(),
        "lapic": bytes(vcpu.get_lapic()),
        "events": bytes(vcpu.get_vcpu_events()),
        "debugregs": bytes(vcpu.get_debugregs()),
        "cpuid": b"".join(bytes(e) for e in cpuid),
        "tsc_khz": vcpu.tsc_khz(),
    }
    if xsave_bytes:
        st["xsave"] = bytes(vcpu.get_xsave(xsave_bytes))
        st["xcrs"] = bytes(vcpu.get_xcrs())
    else:
        st["fpu"] = bytes(vcpu.get_fpu())
    return st


def capture_vm(vm) -> dict:
    st = {name: bytes(vm.get_irqchip(chip)) for name, chip in _CHIPS.items()}
    st["pit"] = bytes(vm.get_pit2())
    clock = vm.get_clock()
    st["clock"] = {"clock": clock.clock, "flags": clock.flags}
    return st


def machine_state(machine: Machine) -> dict:
    return {
        "memory": machine.memory,
        "apic_ids": list(machine.apic_ids),
        "numa_nodes": [
            {"node_id": n.node_id, "apic_ids": list(n.apic_ids), "mem_ranges": n.mem_ranges}
            for n in machine.numa_nodes
        ],
        "reserved": machine.reserved,
        "distances": machine.distances,
        "virtio_mmio": machine.virtio_mmio,
    }


def machine_from_state(st: dict) -> Machine:
    return Machine(
        memory=st["memory"],
        apic_ids=tuple(st["apic_ids"]),
        numa_nodes=tuple(
            NumaNode(n["node_id"], tuple(n["apic_ids"]), tuple(map(tuple, n["mem_ranges"])))
            for n in st["numa_nodes"]
        ),
        reserved=tuple(map(tuple, st["reserved"])),
        distances=None if st["distances"] is None else tuple(map(tuple, st["distances"])),
        virtio_mmio=st.get("virtio_mmio", 0),  # version 1 has none
    )


def region_candidates(region) -> list[tuple[int, int]]:
    """The pages of a RAM region worth reading (vmm/memory.py's backings): a memfd's
    touched pages; an anonymous mapping's present ones; for a snapshot file mapped
    copy-on-write, the file's data and the pages the guest wrote since."""
    if region.backing == "memfd":
        return memfile.fd_data_ranges(region.fd, 0, region.size)
    if region.backing == "file":
        start = region.fd_offset
        return memfile.union(
            memfile.fd_data_ranges(region.fd, start, start + region.size),
            memfile.touched_ranges(region.host_addr, region.size, private_only=True),
        )
    return memfile.touched_ranges(region.host_addr, region.size)


@dataclass
class Written:
    """What ``write`` wrote: for the user and the benchmarks."""

    directory: str
    bytes_stored: int  # bytes of memory and images actually written (zero pages are holes)
    memory_size: int
    state_size: int
    seconds: float  # writing, from the first state read to the renames


def collect(part, extra: dict | None = None) -> dict:
    """The state of ``part`` (every vCPU parked, or not started) but its images: the
    state file's content without ``images`` (a migration sends it as it is)."""
    msr_indices = part.kvm.msr_index_list()
    xsave_bytes = xsave_size(part.vm)
    cfg = part.config
    return {
        "osvmm": __version__,
        "created": time.time(),
        "name": cfg.name,
        "boot": {"image": cfg.image, "kernel": cfg.kernel, "cmdline": cfg.cmdline},
        "machine": machine_state(part.machine),
        "vcpus": [
            capture_vcpu(v, cpuid, msr_indices, xsave_bytes)
            for v, cpuid in zip(part.vcpus, part.cpuids, strict=True)
        ],
        "vm": capture_vm(part.vm),
        "devices": {name: dev.state() for name, dev in part.devices.items()},
        **({"virtio": part.virtio.state()} if part.virtio is not None else {}),
        "extra": extra or {},
    }


def write(part, directory: str, extra: dict | None = None, images: dict | None = None) -> Written:
    """Write a snapshot of ``part`` (every vCPU parked, or not started) into
    ``directory``. ``extra``: more state from the layers above (the hypercall
    monitor's), stored as the state's ``extra``; ``images``: name -> buffer (a
    channel's memory), each written as a sparse image of its own."""
    t0 = time.perf_counter()
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise SnapshotError(f"{directory}: cannot create the directory: {e.strerror}") from None
    state = collect(part, extra)
    memory = part.memory
    offsets, offset = [], 0
    for r in memory.regions:
        offsets.append(offset)
        offset += r.size
    sources = [
        (r.mem, off, region_candidates(r)) for r, off in zip(memory.regions, offsets, strict=True)
    ]
    written = []  # (temporary path, final path)
    try:
        state["images"] = {MEMORY_IMAGE: _write_image(directory, MEMORY_FILE, offset, sources)}
        written.append(state["images"][MEMORY_IMAGE].pop("_tmp"))
        state["images"][MEMORY_IMAGE]["regions"] = [
            {"gpa": r.gpa, "size": r.size, "offset": off}
            for r, off in zip(memory.regions, offsets, strict=True)
        ]
        for name, buf in (images or {}).items():
            info = _write_image(directory, f"image-{name}", len(buf), [(buf, 0, [(0, len(buf))])])
            written.append(info.pop("_tmp"))
            state["images"][name] = info
        data = fmt.encode(state)
        tmp = os.path.join(directory, f".{STATE_FILE}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        written.append((tmp, os.path.join(directory, STATE_FILE)))
        for src, dst in written:
            os.replace(src, dst)
    except OSError as e:
        for src, _ in written:
            try:
                os.unlink(src)
            except OSError:
                pass
        raise SnapshotError(f"{directory}: cannot write the snapshot: {e.strerror}") from None
    stored = sum(n for img in state["images"].values() for _, n, _ in img["extents"])
    return Written(directory, stored, memory.size, len(data), time.perf_counter() - t0)


def _write_image(directory: str, filename: str, size: int, sources) -> dict:
    tmp = os.path.join(directory, f".{filename}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        extents = memfile.write_image(fd, sources)
    finally:
        os.close(fd)
    return {
        "file": filename,
        "size": size,
        "extents": extents,
        "_tmp": (tmp, os.path.join(directory, filename)),
    }


# -- reading ---------------------------------------------------------------------------------


class Snapshot:
    """A snapshot read from its directory and checked whole (``read``); its images
    stay open until ``close``."""

    def __init__(self, directory: str, state: dict, fds: dict[str, int], machine=None):
        """``machine``: ``state``'s, where the caller has it already."""
        self.directory = directory
        self.origin = f"the snapshot in {directory}"  # what a resumed partition came from
        self.state = state
        self._fds = fds  # image name -> open file
        self.machine = machine or machine_from_state(state["machine"])

    @classmethod
    def read(cls, directory: str) -> Snapshot:
        path = os.path.join(directory, STATE_FILE)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            what = "no such directory" if not os.path.isdir(directory) else "no state file"
            raise SnapshotError(f"{directory}: not a snapshot ({what})") from None
        except OSError as e:
            raise SnapshotError(f"{path}: {e.strerror}") from None
        state = fmt.decode(data, path)
        try:
            check_sections(state)
            machine = machine_from_state(state["machine"])
        except (KeyError, TypeError, ValueError) as err:
            raise SnapshotError(f"{path}: malformed state ({err!r})") from None
        except SnapshotError as err:
            raise SnapshotError(f"{path}: {err}") from None
        fds: dict[str, int] = {}
        try:
            for name, img in state["images"].items():
                file = os.path.join(directory, img["file"])
                try:
                    fds[name] = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise SnapshotError(f"{file}: {e.strerror}") from None
                memfile.check_image(fds[name], img["size"], img["extents"], file)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return cls(directory, state, fds, machine)

    def image(self, name: str) -> tuple[int, dict] | None:
        """(open file, its description) of an image, None if the snapshot has none."""
        if name not in self._fds:
            return None
        return self._fds[name], self.state["images"][name]

    @property
    def extra(self) -> dict:
        return self.state.get("extra") or {}

    def describe(self) -> str:
        m = self.machine
        return f"{m.memory >> 20} MiB, {m.vcpus} vCPU{'s' if m.vcpus != 1 else ''}"

    def check_machine(self, machine: Machine, who: str) -> None:
        """A SnapshotError unless ``machine`` (what the partition would be) is the
        snapshot's machine."""
        snap = self.machine
        if machine == snap:
            return
        diffs = []
        if machine.memory != snap.memory:
            diffs.append(f"memory {snap.memory >> 20} MiB, not {machine.memory >> 20} MiB")
        if machine.apic_ids != snap.apic_ids:
            diffs.append(f"{snap.vcpus} vCPUs (APIC IDs {list(snap.apic_ids)})")
        if machine.reserved != snap.reserved:
            diffs.append("another reserved layout (channel window)")
        if machine.virtio_mmio != snap.virtio_mmio:
            diffs.append(f"{snap.virtio_mmio} virtio devices, not {machine.virtio_mmio}")
        if not diffs:
            diffs.append("another NUMA layout")
        raise SnapshotError(
            f"{who}: the snapshot in {self.directory} does not fit: it has " + ", ".join(diffs)
        )

    def map_memory(self, memory, lazy: bool, backing, reserved: dict | None = None) -> None:
        """Give ``memory`` (an empty GuestMemory) the snapshot's RAM: mapped from the
        image copy-on-write (``lazy``; over ``reserved[gpa]``, a ready VM's address
        space, where given), or copied into new regions of ``backing(size)``
        (vmm/memory.py's backings)."""
        fd, img = self.image(MEMORY_IMAGE)
        for reg in img["regions"]:
            if lazy:
                memory.add_file_region(
                    reg["gpa"],
                    reg["size"],
                    os.dup(fd),
                    reg["offset"],
                    (reserved or {}).get(reg["gpa"]),
                )
            else:
                region = memory.add_region(reg["gpa"], reg["size"], backing(reg["size"]))
                memfile.load_image(fd, region.mem, reg["offset"], reg["size"], img["extents"])

    def extra_images(self) -> dict[str, bytearray]:
        """Every image but guest memory (a channel's memory), read whole."""
        out = {}
        for name, (fd, img) in ((n, self.image(n)) for n in self._fds if n != MEMORY_IMAGE):
            out[name] = bytearray(img["size"])
            memfile.load_image(fd, out[name], 0, img["size"], img["extents"])
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def check_sections(state: dict, with_images: bool = True) -> None:
    """Every section there, every KVM structure of its size (or a KeyError,
    TypeError, ValueError or SnapshotError). ``with_images``: and the memory image
    (a migration's state comes without: its memory came as pages)."""
    for key in ("machine", "vcpus", "vm", "devices", *(("images",) if with_images else ())):
        if key not in state:
            raise SnapshotError(f"no {key!r} section")
    machine = state["machine"]
    if len(state["vcpus"]) != len(machine["apic_ids"]):
        raise SnapshotError(
            f"{len(state['vcpus'])} vCPU states for {len(machine['apic_ids'])} vCPUs"
        )
    for i, vcpu in enumerate(state["vcpus"]):
        for key, struct in _VCPU_BLOBS.items():
            if key == "xcrs" and "xsave" not in vcpu:
                continue
            _check_size(vcpu[key], struct, f"vcpu {i} {key}")
        if "xsave" in vcpu:
            if len(vcpu["xsave"]) < ctypes.sizeof(s.kvm_xsave) or len(vcpu["xsave"]) % 4:
                raise SnapshotError(f"vcpu {i} xsave: {len(vcpu['xsave'])} bytes")
        else:
            _check_size(vcpu["fpu"], s.kvm_fpu, f"vcpu {i} fpu")
        if len(vcpu["cpuid"]) % ctypes.sizeof(s.kvm_cpuid_entry2):
            raise SnapshotError(f"vcpu {i} cpuid: {len(vcpu['cpuid'])} bytes")
        for index, value in vcpu["msrs"]:
            int(index), int(value)
    for key, struct in _VM_BLOBS.items():
        _check_size(state["vm"][key], struct, key)
    virtio = state.get("virtio", [])
    if len(virtio) != machine.get("virtio_mmio", 0):
        raise SnapshotError(
            f"{len(virtio)} virtio device states for {machine.get('virtio_mmio', 0)} devices"
        )
    for i, dev in enumerate(virtio):
        if not isinstance(dev["config"], bytes) or not isinstance(dev["queues"], list):
            raise SnapshotError(f"virtio device {i}: malformed")
        if dev["model"]["kind"] not in ("blk", "net", "vsock"):
            raise SnapshotError(f"virtio device {i}: a {dev['model']['kind']!r} device")
    if not with_images:
        return
    memory = state["images"][MEMORY_IMAGE]
    ram = sum(r["size"] for r in memory["regions"])
    if ram != machine["memory"] or memory["size"] != ram:
        raise SnapshotError(
            f"memory image of {memory['size']} bytes for {machine['memory']} bytes of RAM"
        )


def _check_size(blob, struct, what: str) -> None:
    if not isinstance(blob, bytes) or len(blob) != ctypes.sizeof(struct):
        size = len(blob) if isinstance(blob, bytes) else type(blob).__name__
        raise SnapshotError(f"{what}: {size} bytes, expected {ctypes.sizeof(struct)}")


# -- disks (checked before anything is built) --------------------------------------------------


def snapshot_drives(state: dict) -> tuple:
    """The disks of a snapshot's partition as given to it (plan/drives.py Drive), in
    slot order: what a restore reopens unless told other images."""
    from osvmm.plan.drives import Drive

    return tuple(
        Drive(dev["model"]["path"], dev["model"]["readonly"])
        for dev in state.get("virtio", [])
        if dev["model"]["kind"] == "blk"
    )


def snapshot_nets(state: dict) -> tuple:
    """The tap NICs of a snapshot's partition as given to it (plan/drives.py Net: the
    tap's name, the MAC), in slot order."""
    from osvmm.plan.drives import Net

    return tuple(
        Net(dev["model"]["tap"], _mac(dev["model"]))
        for dev in state.get("virtio", [])
        if dev["model"]["kind"] == "net" and dev["model"].get("network") is None
    )


def _mac(model: dict) -> bytes:
    return bytes.fromhex(model["mac"].replace(":", ""))


def snapshot_networks(state: dict) -> tuple[tuple[str, bytes], ...]:
    """The NICs of a snapshot's partition on a plan's networks: (network name, MAC)
    in slot order (after its tap NICs, as a build places them)."""
    return tuple(
        (dev["model"]["network"], _mac(dev["model"]))
        for dev in state.get("virtio", [])
        if dev["model"]["kind"] == "net" and dev["model"].get("network") is not None
    )


def check_networks(state: dict, nics: list[tuple[str, bytes]], who: str) -> None:
    """SnapshotError unless the network NICs to restore, (network name, MAC) in slot
    order, are the snapshot's: on the same networks, in the same order (which
    device is on which network is the guest's configuration), each with its MAC
    (the driver read it; a plan derives it from the network's and the partition's
    names). The networks' other members may differ: they are not the partition's
    state (a peer relearns, as after a cable is plugged again)."""
    match_networks(snapshot_networks(state), nics, who)


def match_networks(had, nics: list[tuple[str, bytes]], who: str) -> None:
    """``check_networks`` on the snapshot's (network name, MAC) pairs ``had`` (a
    migration's profile sends them ahead of the state)."""
    names, given = [n for n, _ in had], [n for n, _ in nics]
    if names != given:
        on = ", ".join(names) or "none"
        raise SnapshotError(
            f"{who}: the snapshot's NICs are on networks {on}; this plan puts the "
            f"partition on {', '.join(given) or 'none'}"
        )
    for (network, mac), (_, want) in zip(had, nics, strict=True):
        if mac != want:
            raise SnapshotError(
                f"{who}: NIC on network {network!r}: MAC {want.hex(':')}, the snapshot's had "
                f"{mac.hex(':')} (a plan's MAC is its network's and partition's: restore it "
                "as the partition it was)"
            )


def check_nics(state: dict, macs: list[bytes], who: str) -> None:
    """SnapshotError unless the NICs to restore (their MACs, in slot order) are the
    snapshot's: as many, each with its MAC (the driver knows it). The tap may
    be another."""
    had = snapshot_nets(state)
    if len(had) != len(macs):
        raise SnapshotError(f"{who}: the snapshot has {len(had)} NICs, {len(macs)} given")
    for i, (net, mac) in enumerate(zip(had, macs, strict=True)):
        if net.mac != mac:
            raise SnapshotError(
                f"{who}: NIC {i}: MAC {mac.hex(':')}, the snapshot's (tap {net.tap}) had "
                f"{net.mac.hex(':')}: give mac={net.mac.hex(':')}"
            )


def snapshot_vsock(state: dict):
    """The vsock of a snapshot's partition as given to it (plan/drives.py Vsock: the
    Unix socket's path, the CID), or None."""
    from osvmm.plan.drives import Vsock

    for dev in state.get("virtio", []):
        if dev["model"]["kind"] == "vsock":
            return Vsock(dev["model"]["uds"], dev["model"]["cid"])
    return None


def check_vsock(state: dict, vsock, who: str) -> None:
    """SnapshotError unless ``vsock`` (plan/drives.py Vsock, or None) is there when
    the snapshot had one, with its CID (the guest knows it); the path may be another."""
    had = snapshot_vsock(state)
    if (had is None) != (vsock is None):
        what = "a vsock, none given" if had is not None else "no vsock, one given"
        raise SnapshotError(f"{who}: the snapshot has {what}")
    if had is not None and had.cid != vsock.cid:
        raise SnapshotError(f"{who}: vsock cid {vsock.cid}, the snapshot's had cid {had.cid}")


def check_disks(state: dict, disks: list, who: str) -> None:
    """SnapshotError unless ``disks`` (vmm/blockfile.py RawImage, opened for the
    restore) are the snapshot's: as many, each read-only as it was and of the
    same size (the driver knows its capacity). Another path is allowed: the same
    disk copied or moved (``osvmm run --restore DIR --drive FILE``)."""
    had = [dev["model"] for dev in state.get("virtio", []) if dev["model"]["kind"] == "blk"]
    if len(had) != len(disks):
        raise SnapshotError(f"{who}: the snapshot has {len(had)} disks, {len(disks)} given")
    for i, (st, disk) in enumerate(zip(had, disks, strict=True)):
        if disk.size != st["size"]:
            raise SnapshotError(
                f"{who}: disk {i} {disk.path}: {disk.size} bytes, the snapshot's disk "
                f"({st['path']}) had {st['size']}: a restore needs the same disk"
            )
        if disk.readonly != st["readonly"]:
            ro = "read-only" if st["readonly"] else "writable"
            raise SnapshotError(f"{who}: disk {i} {disk.path}: the snapshot's disk was {ro}")


# -- applying (vCPUs created, not run) ---------------------------------------------------------


def vcpu_cpuid_entries(state: dict, index: int) -> list[s.kvm_cpuid_entry2]:
    blob = state["vcpus"][index]["cpuid"]
    size = ctypes.sizeof(s.kvm_cpuid_entry2)
    return [s.kvm_cpuid_entry2.from_buffer_copy(blob, i) for i in range(0, len(blob), size)]


def vcpu_profile(state: dict) -> dict:
    """What a host must match of a snapshot's vCPUs (``check_host``): the machine,
    and per vCPU its CPUID, TSC frequency and XSAVE size. A migration sends it first."""
    return {
        "machine": state["machine"],
        "vcpus": [
            {"cpuid": v["cpuid"], "tsc_khz": v["tsc_khz"], "xsave": len(v.get("xsave", b""))}
            for v in state["vcpus"]
        ],
    }


def host_tsc_khz(kvm) -> int:
    """This host's guest TSC frequency (KVM_GET_TSC_KHZ of a vCPU made for the question)."""
    vm = kvm.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        try:
            return vcpu.tsc_khz()
        finally:
            vcpu.close()
    finally:
        vm.close()


def check_host(kvm, profile: dict, supported, tsc_khz: int | None = None) -> None:
    """A SnapshotError ("incompatible host") unless this host can run the vCPUs of
    ``profile`` (``vcpu_profile``) as they were: CPUID features, XSAVE size, and with
    ``tsc_khz`` (this host's) the TSC frequency (else each vCPU's is checked when
    its state is applied)."""
    apic_ids = profile["machine"]["apic_ids"]
    deadline = kvm.tsc_deadline_timer()
    for i, apic_id in enumerate(apic_ids):
        vcpu = profile["vcpus"][i]
        offered = vcpu_cpuid(supported, apic_id, len(apic_ids), (), deadline)
        size = ctypes.sizeof(s.kvm_cpuid_entry2)
        wanted = [
            s.kvm_cpuid_entry2.from_buffer_copy(vcpu["cpuid"], o)
            for o in range(0, len(vcpu["cpuid"]), size)
        ]
        lacking = missing_features(wanted, offered)
        if lacking:
            raise SnapshotError(
                f"incompatible host: the snapshot's vCPU {i} has CPUID features this "
                f"host's KVM lacks ({', '.join(lacking)})"
            )
        if vcpu["xsave"] > max(xsave_size(kvm), 1):
            raise SnapshotError(
                f"incompatible host: the snapshot's XSAVE area is {vcpu['xsave']} bytes, "
                f"this host's {xsave_size(kvm)}"
            )
        if tsc_khz is not None:
            _tsc_fits(vcpu["tsc_khz"], tsc_khz, kvm)


def _tsc_fits(want_khz: int, have_khz: int, kvm) -> bool:
    """True when the TSC frequencies match (within KVM's tolerance), False when KVM
    can scale the TSC to ``want_khz``; else the SnapshotError."""
    if abs(have_khz - want_khz) * 1_000_000 <= want_khz * TSC_TOLERANCE_PPM:
        return True
    if kvm.check_extension(io.KVM_CAP_TSC_CONTROL):
        return False
    raise SnapshotError(
        f"incompatible host: the snapshot's TSC runs at {want_khz} kHz, this host's at "
        f"{have_khz} kHz, and its KVM cannot scale the TSC"
    )


def check_tsc(vcpu, want_khz: int) -> None:
    """Give ``vcpu`` the snapshot's TSC frequency, or refuse."""
    if not _tsc_fits(want_khz, vcpu.tsc_khz(), vcpu.vm.kvm):
        vcpu.set_tsc_khz(want_khz)


def apply_vcpu(vcpu, st: dict) -> None:
    check_tsc(vcpu, st["tsc_khz"])
    vcpu.set_regs(s.kvm_regs.from_buffer_copy(st["regs"]))
    if "xsave" in st:
        vcpu.set_xsave(s.kvm_xsave2(len(st["xsave"])).from_buffer_copy(st["xsave"]))
        vcpu.set_xcrs(s.kvm_xcrs.from_buffer_copy(st["xcrs"]))
    else:
        vcpu.set_fpu(s.kvm_fpu.from_buffer_copy(st["fpu"]))
    vcpu.set_sregs(s.kvm_sregs.from_buffer_copy(st["sregs"]))
    msrs = [(i, v) for i, v in st["msrs"] if i != MSR_IA32_TSC_DEADLINE]
    _set_msrs(vcpu, msrs)
    vcpu.set_mp_state(st["mp_state"])
    vcpu.set_lapic(s.kvm_lapic_state.from_buffer_copy(st["lapic"]))
    _set_msrs(vcpu, [(i, v) for i, v in st["msrs"] if i == MSR_IA32_TSC_DEADLINE])
    vcpu.set_vcpu_events(s.kvm_vcpu_events.from_buffer_copy(st["events"]))
    vcpu.set_debugregs(s.kvm_debugregs.from_buffer_copy(st["debugregs"]))


def _set_msrs(vcpu, msrs: list[tuple[int, int]]) -> None:
    if not msrs:
        return
    done = vcpu.set_msrs(msrs)
    if done < len(msrs):
        index, value = msrs[done]
        raise SnapshotError(
            f"incompatible host: KVM refuses MSR {index:#x} = {value:#x} on vCPU {vcpu.id}"
        )


def apply(part, snap: Snapshot) -> None:
    """Put the snapshot's state into ``part``: built from it, vCPUs not started."""
    state = snap.state
    try:
        for vcpu, st in zip(part.vcpus, state["vcpus"], strict=True):
            apply_vcpu(vcpu, st)
        vm_state = state["vm"]
        for name in _CHIPS:
            part.vm.set_irqchip(s.kvm_irqchip.from_buffer_copy(vm_state[name]))
        part.vm.set_pit2(s.kvm_pit_state2.from_buffer_copy(vm_state["pit"]))
        for name, dev in part.devices.items():
            if name in state["devices"]:
                dev.restore(state["devices"][name])
        if part.virtio is not None:  # after the interrupt controllers: it may raise one
            part.virtio.restore(state.get("virtio", []))
        part.vm.set_clock(s.kvm_clock_data(clock=vm_state["clock"]["clock"]))
    except KvmError as err:
        raise SnapshotError(f"cannot restore {snap.directory}: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise SnapshotError(f"cannot restore {snap.directory}: malformed state ({err!r})") from None
