"""The partition plan: a TOML file parsed into frozen dataclasses.

``load_plan(path)`` / ``parse_plan(text, base_dir)`` check everything that can
be checked without the host: key names (unknown keys are errors at every
level), types, names, sizes, what each partition boots, and the references
between partitions and channels. What needs the host (CPUs that exist, memory
that fits a node) is checked by ``placement.place``. docs/config.md documents
every key.

Every error is a ConfigError with a one-line message that names the key, such
as ``partition 'web': memory: '12X' is not a size (use K, M or G: '512M')``.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osvmm.arch.x86.layout import CHANNEL_WINDOW_SIZE, MIN_MEMORY
from osvmm.errors import ConfigError
from osvmm.files import read_input
from osvmm.guests import bundled_name
from osvmm.hypercall.abi import MAX_CHANNELS, MAX_PARTITIONS
from osvmm.machine import MAX_VCPUS
from osvmm.plan.drives import (
    DEFAULT_CID,
    MAX_DEVICES,
    MAX_DRIVES,
    Drive,
    Net,
    Vsock,
    check_vsock,
    parse_drive,
    parse_net,
    parse_vsock,
)
from osvmm.plan.paths import default_control_socket  # noqa: F401 - re-exported
from osvmm.plan.sizes import MAX_SIZE_TEXT, format_size, parse_size  # noqa: F401 - re-exported
from osvmm.plan.sizes import clip as _clip
from osvmm.plan.sizes import show_value as _show
from osvmm.writemon.spec import ProtectSpec, parse_protect

NAME_RE = re.compile(r"[a-z0-9_-]{1,32}")
CHANNEL_MAX_SIZE = 64 << 20
CHANNEL_MODES = ("rw", "ro")
RESTART_POLICIES = ("stop", "restart")
MAX_PLAN_SIZE = 1 << 20  # a plan file larger than 1 MiB is not one
# Linux numbers CPUs below NR_CPUS, at most 8192 (CONFIG_NR_CPUS_RANGE_END, MAXSMP).
MAX_CPU_ID = 8191
MAX_CPU_LIST = MAX_CPU_ID + 1
MAX_RESTART_BACKOFF_MS = 86_400_000  # a day: a wait the host's clock can express


VMM_KEYS = ("control_socket", "log_dir", "console_log_max")
DEFAULT_LOG_MAX = 64 << 20  # console_log_max: a log rotates past this size
MIN_LOG_MAX = 4 << 10
PARTITION_KEYS = (
    "name",
    "cpus",
    "vcpus",
    "memory",
    "node",
    "image",
    "kernel",
    "initrd",
    "cmdline",
    "restart",
    "restart_limit",
    "restart_backoff_ms",
    "hugepages",
    "prefault",
    "privileged",
    "doorbells",
    "protect",
    "restore",
    "drives",
    "nets",
    "vsock",
)
VSOCK_KEYS = ("uds", "cid")
CHANNEL_KEYS = ("name", "size", "members")
NETWORK_KEYS = ("name", "members")
TOP_KEYS = ("vmm", "partition", "channel", "network")
DOORBELL_KEYS = ("from", "to")
FRAGMENT_KEYS = (*TOP_KEYS, "doorbell")  # [[doorbell]]: a running partition's new grants
MAX_NETWORKS = MAX_DEVICES  # more than a member could hold NICs for


# --- shared value parsers (sizes: osvmm/plan/sizes.py) -------------------------------------


def parse_cpu_list(text: str, what: str = "cpus", limit: int = MAX_CPU_LIST) -> list[int]:
    """CPU numbers from a Linux CPU list such as ``"0-3,8"`` (sysfs cpulist format).

    Returns them sorted. An empty string is an empty list; a number listed
    twice, a reversed range, a CPU number above MAX_CPU_ID, more than ``limit``
    CPUs in all (counted before a range is expanded) or anything else is a
    ConfigError.
    """
    text = text.strip()
    if not text:
        return []
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise ConfigError(
                f"{what}: {_clip(part)!r} in {_clip(text)!r} is not a CPU or range like '2-5'"
            )
        if any(g is not None and len(g) > len(str(MAX_CPU_ID)) for g in m.groups()):
            raise ConfigError(f"{what}: {_clip(part)!r}: CPU numbers go up to {MAX_CPU_ID}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ConfigError(f"{what}: range {_clip(part)!r} in {_clip(text)!r} runs backwards")
        if hi > MAX_CPU_ID:
            raise ConfigError(f"{what}: {part!r}: CPU numbers go up to {MAX_CPU_ID}")
        if len(cpus) + hi - lo + 1 > limit:
            raise ConfigError(f"{what}: {_clip(text)!r} names more than {limit} CPUs")
        for cpu in range(lo, hi + 1):
            if cpu in cpus:
                raise ConfigError(f"{what}: CPU {cpu} is listed twice in {_clip(text)!r}")
            cpus.add(cpu)
    return sorted(cpus)


def format_cpu_list(cpus: list[int] | tuple[int, ...] | set[int]) -> str:
    """The compact Linux spelling of a set of CPUs: [0,1,2,3,8] -> '0-3,8'."""
    out: list[str] = []
    ordered = sorted(cpus)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


# --- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmmSpec:
    """The ``[vmm]`` table: settings of the VMM process itself."""

    control_socket: str
    log_dir: str | None = None  # None: consoles are not logged to files
    console_log_max: int = DEFAULT_LOG_MAX  # each log rotates past this many bytes


@dataclass(frozen=True)
class PartitionSpec:
    """One ``[[partition]]`` as written (CPU numbers not yet checked against the host).

    Exactly one of the three CPU forms holds: ``cpus`` (dedicated host CPUs,
    sorted), ``cpu_count`` (dedicated CPUs for the planner to choose), or
    ``floating`` (no dedicated CPU). Paths are absolute; ``image`` may also be
    ``"guests:NAME"``, a bundled guest resolved by the VMM.
    """

    name: str
    memory: int
    cpus: tuple[int, ...] | None = None
    cpu_count: int | None = None
    floating: bool = False
    vcpus: int = 1
    node: int | None = None
    image: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    restart: str = "stop"
    restart_limit: int = 5
    restart_backoff_ms: int = 500
    hugepages: bool | None = None  # None: "auto", huge pages for ranges that gain from them
    prefault: bool = False
    privileged: bool = False
    doorbells: tuple[str, ...] = ()
    protect: ProtectSpec | None = None  # [partition.protect]: the write monitor
    restore: str | None = None  # a snapshot directory its first boot resumes (docs/snapshots.md)
    drives: tuple[Drive, ...] = ()  # disks: raw images as virtio-blk (docs/devices.md)
    nets: tuple[Net, ...] = ()  # NICs on host taps as virtio-net (docs/devices.md)
    vsock: Vsock | None = None  # a virtio-vsock device and its Unix socket (docs/devices.md)

    @property
    def cpu_mode(self) -> str:
        """``"pinned"`` (a CPU list), ``"count"`` (placed by the planner) or ``"floating"``."""
        if self.floating:
            return "floating"
        return "count" if self.cpus is None else "pinned"

    @property
    def boot(self) -> str:
        """``"image"`` (bare-metal PVH/ELF64) or ``"kernel"`` (Linux)."""
        return "image" if self.image is not None else "kernel"

    @property
    def bundled_guest(self) -> str | None:
        """NAME when ``image = "guests:NAME"``, else None."""
        if self.image is not None:
            return bundled_name(self.image)
        return None


@dataclass(frozen=True)
class ChannelSpec:
    """One ``[[channel]]``: shared memory mapped into its members' guests."""

    name: str
    size: int
    members: tuple[tuple[str, str], ...]  # (partition, "rw" | "ro"), in plan order

    def mode(self, partition: str) -> str | None:
        """``"rw"``, ``"ro"`` or None when ``partition`` is not a member."""
        for name, mode in self.members:
            if name == partition:
                return mode
        return None


def network_mac(network: str, partition: str) -> bytes:
    """The MAC of ``partition``'s NIC on ``network``: locally administered and
    unicast (0x02 first), 6e ("n") then four bytes of a SHA-256 of both names,
    the same from one run to the next and distinct from --net's 02:6f:73."""
    digest = hashlib.sha256(f"{network}\0{partition}".encode()).digest()
    return bytes([0x02, 0x6E]) + digest[:4]


@dataclass(frozen=True)
class NetworkSpec:
    """One ``[[network]]``: a switch inside the VMM, a NIC on it per member."""

    name: str
    members: tuple[str, ...]  # partitions, in plan order: the switch's ports

    def mac(self, partition: str) -> bytes:
        return network_mac(self.name, partition)


@dataclass(frozen=True)
class Plan:
    """A whole plan file."""

    vmm: VmmSpec
    partitions: tuple[PartitionSpec, ...]
    channels: tuple[ChannelSpec, ...] = ()
    base_dir: str = "."
    source: str = "<plan>"
    networks: tuple[NetworkSpec, ...] = ()
    # A fragment's [[doorbell]] grants: (running partition, partition it may ring).
    grants: tuple[tuple[str, str], ...] = ()

    def partition(self, name: str) -> PartitionSpec:
        for p in self.partitions:
            if p.name == name:
                return p
        raise KeyError(name)

    def channels_of(self, partition: str) -> list[ChannelSpec]:
        """The channels ``partition`` is a member of, in plan order."""
        return [c for c in self.channels if c.mode(partition) is not None]

    def networks_of(self, partition: str) -> list[NetworkSpec]:
        """The networks ``partition`` has a NIC on, in plan order."""
        return [n for n in self.networks if partition in n.members]


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and check a plan file; relative paths in it resolve against its directory."""
    p = Path(path)
    data = read_input(p, f"plan file {str(p)!r}", MAX_PLAN_SIZE, ConfigError)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"plan file {str(p)!r}: not UTF-8 text") from None
    return parse_plan(text, p.resolve().parent, source=str(p))


def parse_plan(
    text: str,
    base_dir: str | os.PathLike[str],
    source: str = "<plan>",
    outside: frozenset[str] | None = None,
) -> Plan:
    """Parse and check plan text; ``base_dir`` anchors relative paths. ``outside``:
    the text is a fragment (``osvmm create``) for a VMM where these partitions run:
    its channels and doorbells may name them, and it may have no ``[[partition]]``
    when it has a ``[[channel]]``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    except ValueError:  # int() of a number over Python's 4300-digit limit
        raise ConfigError(f"{source}: not valid TOML: a number has too many digits") from None
    except RecursionError:  # arrays or inline tables nested hundreds deep
        raise ConfigError(f"{source}: not valid TOML: arrays or tables nested too deeply") from None
    base = Path(base_dir).resolve()
    _check_keys(doc, TOP_KEYS if outside is None else FRAGMENT_KEYS, "plan")

    vmm_doc = doc.get("vmm", {})
    if not isinstance(vmm_doc, dict):
        raise ConfigError("vmm: must be a table ([vmm])")
    vmm = _parse_vmm(vmm_doc, base)

    part_docs = _table_array(doc, "partition")
    more = outside is not None and (_table_array(doc, "channel") or _table_array(doc, "doorbell"))
    if not part_docs and not more:
        what = "[[partition]]" if outside is None else "[[partition]], [[channel]] or [[doorbell]]"
        raise ConfigError(
            f"partition: the {'plan' if outside is None else 'fragment'} has no {what}"
        )
    if len(part_docs) > MAX_PARTITIONS:
        raise ConfigError(
            f"partition: {len(part_docs)} partitions, at most {MAX_PARTITIONS} "
            "(the hypercall ABI numbers them in a 64-bit doorbell mask)"
        )
    partitions: list[PartitionSpec] = []
    seen: set[str] = set()
    for i, pd in enumerate(part_docs):
        spec = _parse_partition(pd, i, base)
        if spec.name in seen:
            raise ConfigError(f"partition {spec.name!r}: name: duplicate partition name")
        seen.add(spec.name)
        partitions.append(spec)
    _check_shared_drives(partitions)
    _check_shared_taps(partitions)

    channels: list[ChannelSpec] = []
    seen_ch: set[str] = set()
    chan_docs = _table_array(doc, "channel")
    if len(chan_docs) > MAX_CHANNELS:
        raise ConfigError(
            f"channel: {len(chan_docs)} channels, at most {MAX_CHANNELS} "
            "(PARTITION_INFO describes them in one 4 KiB page)"
        )
    known = seen | (outside or frozenset())  # what channels and doorbells may name
    for i, cd in enumerate(chan_docs):
        ch = _parse_channel(cd, i, known)
        if ch.name in seen_ch:
            raise ConfigError(f"channel {ch.name!r}: name: duplicate channel name")
        seen_ch.add(ch.name)
        channels.append(ch)

    networks: list[NetworkSpec] = []
    net_docs = _table_array(doc, "network")
    if len(net_docs) > MAX_NETWORKS:
        raise ConfigError(f"network: {len(net_docs)} networks, at most {MAX_NETWORKS}")
    for i, nd in enumerate(net_docs):
        net = _parse_network(nd, i, seen)
        if any(n.name == net.name for n in networks):
            raise ConfigError(f"network {net.name!r}: name: duplicate network name")
        networks.append(net)
    sockets: dict[str, str] = {}
    for spec in partitions:
        nics = sum(spec.name in n.members for n in networks)
        vsocks = int(spec.vsock is not None)
        if len(spec.drives) + len(spec.nets) + nics + vsocks > MAX_DEVICES:
            raise ConfigError(
                f"partition {spec.name!r}: {len(spec.drives)} disks, {len(spec.nets)} tap "
                f"NICs, {nics} network NICs and {vsocks} vsock, at most {MAX_DEVICES} "
                "virtio devices in all"
            )
        if spec.vsock is not None:
            other = sockets.setdefault(spec.vsock.uds, spec.name)
            if other != spec.name:
                raise ConfigError(
                    f"partition {spec.name!r}: vsock: {spec.vsock.uds} is the vsock "
                    f"socket of partition {other!r} already"
                )

    privileged = [p.name for p in partitions if p.privileged]
    if len(privileged) > 1:
        raise ConfigError(
            f"partition {privileged[1]!r}: privileged: {privileged[0]!r} is privileged "
            "already (at most one partition is)"
        )
    total = sum(c.size for c in channels)
    if total > CHANNEL_WINDOW_SIZE:
        raise ConfigError(
            f"channel: {format_size(total)} of channels do not fit the "
            f"{format_size(CHANNEL_WINDOW_SIZE)} channel window (each channel has its own "
            "slot in it, the same in every member)"
        )
    for spec in partitions:
        where = f"partition {spec.name!r}: doorbells"
        for target in spec.doorbells:
            if target not in known:
                raise ConfigError(f"{where}: no partition is named {_show(target)}")
            if target == spec.name:
                raise ConfigError(f"{where}: a partition does not ring its own doorbell")
    grants = _parse_grants(doc, seen, outside) if outside is not None else ()
    return Plan(vmm, tuple(partitions), tuple(channels), str(base), source, tuple(networks), grants)


def _parse_grants(
    doc: dict[str, Any], seen: set[str], outside: frozenset[str]
) -> tuple[tuple[str, str], ...]:
    """A fragment's ``[[doorbell]]`` tables: ``from`` a running partition, ``to`` the
    partitions it may ring from now on; (from, to) pairs in order."""
    pairs: list[tuple[str, str]] = []
    for i, table in enumerate(_table_array(doc, "doorbell")):
        where = f"doorbell #{i + 1}"
        _check_keys(table, DOORBELL_KEYS, where)
        ringer = table.get("from")
        if not isinstance(ringer, str):
            raise ConfigError(f'{where}: from: expected a partition name such as "web"')
        if ringer in seen:
            raise ConfigError(
                f"{where}: from: {ringer!r} is made by this fragment: give its doorbells "
                "in its [[partition]] table"
            )
        if ringer not in outside:
            raise ConfigError(f"{where}: from: no partition is named {_show(ringer)}")
        targets = table.get("to")
        if (
            not isinstance(targets, list)
            or not targets
            or not all(isinstance(t, str) for t in targets)
        ):
            raise ConfigError(f'{where}: to: expected a list of partition names such as ["db"]')
        for target in targets:
            if target not in seen and target not in outside:
                raise ConfigError(f"{where}: to: no partition is named {_show(target)}")
            if target == ringer:
                raise ConfigError(f"{where}: to: a partition does not ring its own doorbell")
            if (ringer, target) in pairs:
                raise ConfigError(f"{where}: to: {ringer} may ring {target} twice")
            pairs.append((ringer, target))
    return tuple(pairs)


# --- helpers -------------------------------------------------------------------------------


def _check_keys(table: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known: " + ", ".join(known)
            raise ConfigError(f"{where}: unknown key {_show(key)} ({hint})")


def _table_array(doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{key}: must be an array of tables ([[{key}]])")
    return value


def _get(table: dict[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    if key not in table:
        return default
    value = table[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        names = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}
        raise ConfigError(f"{where}: {key}: expected {names[kind]}, got {_show(value)}")
    return value


def _path(value: str, base: Path) -> str:
    return str(base / os.path.expanduser(value))


def _name(table: dict[str, Any], kind: str, index: int) -> str:
    where = f"{kind} #{index + 1}"
    name = _get(table, "name", str, where)
    if name is None:
        raise ConfigError(f"{where}: name: missing")
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: name: {_show(name)} is not 1-32 characters of a-z 0-9 _ -")
    return name


def _parse_vmm(table: dict[str, Any], base: Path) -> VmmSpec:
    _check_keys(table, VMM_KEYS, "vmm")
    sock = _get(table, "control_socket", str, "vmm")
    log_dir = _get(table, "log_dir", str, "vmm")
    for key, value in (("control_socket", sock), ("log_dir", log_dir)):
        if value is not None and not value:
            raise ConfigError(f"vmm: {key}: must not be empty")
    log_max = table.get("console_log_max", DEFAULT_LOG_MAX)
    log_max = parse_size(log_max, "vmm: console_log_max", multiple=1)
    if log_max < MIN_LOG_MAX:
        raise ConfigError(
            f"vmm: console_log_max: {format_size(log_max)} is less than {format_size(MIN_LOG_MAX)}"
        )
    return VmmSpec(
        control_socket=_path(sock, base) if sock else default_control_socket(),
        log_dir=_path(log_dir, base) if log_dir else None,
        console_log_max=log_max,
    )


def _parse_partition(table: dict[str, Any], index: int, base: Path) -> PartitionSpec:
    name = _name(table, "partition", index)
    where = f"partition {name!r}"
    _check_keys(table, PARTITION_KEYS, where)
    fields: dict[str, Any] = {"name": name}

    if "cpus" not in table:
        raise ConfigError(f"{where}: cpus: missing (a CPU list '2-3', a count 2, or 'floating')")
    cpus = table["cpus"]
    vcpus = _get(table, "vcpus", int, where)
    if cpus == "floating":
        fields["floating"] = True
        fields["vcpus"] = 1 if vcpus is None else vcpus
        if not 1 <= fields["vcpus"] <= MAX_VCPUS:
            raise ConfigError(f"{where}: vcpus: {vcpus} is not between 1 and {MAX_VCPUS}")
    else:
        if vcpus is not None:
            raise ConfigError(
                f'{where}: vcpus: only with cpus = "floating" (a partition with dedicated '
                "CPUs has one vCPU per CPU)"
            )
        if isinstance(cpus, int) and not isinstance(cpus, bool):
            if not 1 <= cpus <= MAX_VCPUS:
                raise ConfigError(f"{where}: cpus: a count of {cpus} is not 1-{MAX_VCPUS}")
            fields["cpu_count"] = cpus
            fields["vcpus"] = cpus
        else:
            if isinstance(cpus, str):
                cpu_list = parse_cpu_list(cpus, f"{where}: cpus", limit=MAX_VCPUS)
            elif isinstance(cpus, list):
                if not all(isinstance(c, int) and not isinstance(c, bool) for c in cpus):
                    raise ConfigError(f"{where}: cpus: a list must hold CPU numbers: {_show(cpus)}")
                if any(c > MAX_CPU_ID for c in cpus):
                    raise ConfigError(f"{where}: cpus: CPU numbers go up to {MAX_CPU_ID}")
                if any(c < 0 for c in cpus) or len(set(cpus)) != len(cpus):
                    raise ConfigError(
                        f"{where}: cpus: {_show(cpus)} has a negative or repeated CPU"
                    )
                cpu_list = sorted(cpus)
            else:
                raise ConfigError(
                    f"{where}: cpus: expected a CPU list '2-3,6', a count or 'floating', "
                    f"got {_show(cpus)}"
                )
            if not cpu_list:
                raise ConfigError(f"{where}: cpus: the CPU list is empty")
            if len(cpu_list) > MAX_VCPUS:
                raise ConfigError(f"{where}: cpus: {len(cpu_list)} CPUs, at most {MAX_VCPUS}")
            fields["cpus"] = tuple(cpu_list)
            fields["vcpus"] = len(cpu_list)

    if "memory" not in table:
        raise ConfigError(f'{where}: memory: missing (such as memory = "256M")')
    memory = parse_size(table["memory"], f"{where}: memory")
    if memory < MIN_MEMORY:
        raise ConfigError(f"{where}: memory: {format_size(memory)} is below the 2M minimum")
    fields["memory"] = memory

    node = _get(table, "node", int, where)
    if node is not None and node < 0:
        raise ConfigError(f"{where}: node: {node} is negative")
    fields["node"] = node

    image = _get(table, "image", str, where)
    kernel = _get(table, "kernel", str, where)
    if image is None and kernel is None:
        raise ConfigError(f"{where}: image: nothing to boot (set image or kernel)")
    if image is not None and kernel is not None:
        raise ConfigError(f"{where}: image: set image or kernel, not both")
    for key, value in (("image", image), ("kernel", kernel)):
        if value is not None and not value:
            raise ConfigError(f"{where}: {key}: must not be empty")
    if image is not None:
        if bundled_name(image) is not None:
            if not NAME_RE.fullmatch(bundled_name(image)):
                raise ConfigError(f"{where}: image: {_show(image)} names no bundled guest")
            fields["image"] = image
        else:
            fields["image"] = _path(image, base)
    if kernel is not None:
        fields["kernel"] = _path(kernel, base)
    initrd = _get(table, "initrd", str, where)
    if initrd is not None:
        if kernel is None:
            raise ConfigError(f"{where}: initrd: only with kernel")
        fields["initrd"] = _path(initrd, base)
    fields["cmdline"] = _get(table, "cmdline", str, where)
    restore = _get(table, "restore", str, where)
    if restore is not None:
        if not restore:
            raise ConfigError(f"{where}: restore: must not be empty")
        fields["restore"] = _path(restore, base)
    drives = _get(table, "drives", list, where, [])
    if not all(isinstance(d, str) for d in drives):
        raise ConfigError(f'{where}: drives: a list of "FILE[,ro]" strings: {_show(drives)}')
    if len(drives) > MAX_DRIVES:
        raise ConfigError(f"{where}: drives: {len(drives)} disks, at most {MAX_DRIVES}")
    parsed = [parse_drive(d, f"{where}: drives:") for d in drives]
    fields["drives"] = tuple(Drive(_path(d.path, base), d.readonly) for d in parsed)
    if len({d.path for d in fields["drives"]}) != len(parsed):
        raise ConfigError(f"{where}: drives: an image is listed twice: {_show(drives)}")
    nets = _get(table, "nets", list, where, [])
    if not all(isinstance(n, str) for n in nets):
        raise ConfigError(
            f'{where}: nets: a list of "tap=NAME[,mac=XX:XX:XX:XX:XX:XX]" strings: {_show(nets)}'
        )
    if len(nets) > MAX_DEVICES:
        raise ConfigError(f"{where}: nets: {len(nets)} NICs, at most {MAX_DEVICES}")
    fields["nets"] = tuple(parse_net(n, f"{where}: nets:") for n in nets)
    if "vsock" in table:
        fields["vsock"] = _parse_vsock(table["vsock"], where, base)

    restart = _get(table, "restart", str, where, "stop")
    if restart not in RESTART_POLICIES:
        raise ConfigError(f"{where}: restart: {_show(restart)} is not 'stop' or 'restart'")
    fields["restart"] = restart
    for key, default in (("restart_limit", 5), ("restart_backoff_ms", 500)):
        value = _get(table, key, int, where, default)
        if value < 0:
            raise ConfigError(f"{where}: {key}: {value} is negative")
        if key == "restart_backoff_ms" and value > MAX_RESTART_BACKOFF_MS:
            raise ConfigError(
                f"{where}: {key}: {_show(value)} is over {MAX_RESTART_BACKOFF_MS} (one day)"
            )
        fields[key] = value
    huge = table.get("hugepages", "auto")
    if not isinstance(huge, bool) and huge != "auto":
        raise ConfigError(f'{where}: hugepages: {_show(huge)} is not true, false or "auto"')
    fields["hugepages"] = None if huge == "auto" else huge
    for key, default in (("prefault", False), ("privileged", False)):
        fields[key] = _get(table, key, bool, where, default)

    doorbells = _get(table, "doorbells", list, where, [])
    if not all(isinstance(d, str) for d in doorbells):
        raise ConfigError(f"{where}: doorbells: a list of partition names: {_show(doorbells)}")
    if len(set(doorbells)) != len(doorbells):
        raise ConfigError(f"{where}: doorbells: a partition is listed twice: {_show(doorbells)}")
    fields["doorbells"] = tuple(doorbells)
    if "protect" in table:
        fields["protect"] = parse_protect(table["protect"], where, base)
    return PartitionSpec(**fields)


def _parse_vsock(value: Any, where: str, base: Path) -> Vsock:
    """``vsock = "uds=PATH[,cid=N]"`` or ``vsock = { uds = "PATH", cid = N }``; a
    relative PATH is the plan's directory's."""
    where = f"{where}: vsock"
    if isinstance(value, str):
        vsock = parse_vsock(value, where)
    elif isinstance(value, dict):
        _check_keys(value, VSOCK_KEYS, where)
        uds = value.get("uds")
        if not isinstance(uds, str):
            raise ConfigError(f"{where}: uds: expected a path string, got {_show(uds)}")
        vsock = check_vsock(uds, value.get("cid", DEFAULT_CID), where)
    else:
        raise ConfigError(
            f'{where}: expected "uds=PATH[,cid=N]" or {{ uds = "PATH", cid = N }}, '
            f"got {_show(value)}"
        )
    return check_vsock(_path(vsock.uds, base), vsock.cid, where)


def _check_shared_drives(partitions: list[PartitionSpec]) -> None:
    """An image may be shared only read-only by all (the VMM locks each image too)."""
    users: dict[str, tuple[str, bool]] = {}
    for part in partitions:
        for drive in part.drives:
            other = users.get(drive.path)
            if other is not None and not (other[1] and drive.readonly):
                raise ConfigError(
                    f"partition {part.name!r}: drives: {drive.path} is partition "
                    f"{other[0]!r}'s disk too; an image is shared only read-only (,ro) by all"
                )
            users.setdefault(drive.path, (part.name, drive.readonly))


def _check_shared_taps(partitions: list[PartitionSpec]) -> None:
    """A tap is one NIC's: attaching it a second time fails (EBUSY), so a plan that
    names one twice, in one partition or two, could never run all its NICs."""
    users: dict[str, str] = {}
    for part in partitions:
        for net in part.nets:
            other = users.setdefault(net.tap, part.name)
            if other != part.name or sum(n.tap == net.tap for n in part.nets) > 1:
                whose = "this partition's" if other == part.name else f"partition {other!r}'s"
                raise ConfigError(
                    f"partition {part.name!r}: nets: tap {net.tap} is {whose} NIC already "
                    "(a tap is one NIC's)"
                )


def _parse_channel(table: dict[str, Any], index: int, partitions: set[str]) -> ChannelSpec:
    name = _name(table, "channel", index)
    where = f"channel {name!r}"
    _check_keys(table, CHANNEL_KEYS, where)
    if "size" not in table:
        raise ConfigError(f'{where}: size: missing (such as size = "64K")')
    size = parse_size(table["size"], f"{where}: size")
    if size > CHANNEL_MAX_SIZE:
        raise ConfigError(f"{where}: size: {format_size(size)} is over the 64M maximum")
    members = table.get("members")
    if not isinstance(members, dict) or not members:
        raise ConfigError(f'{where}: members: expected a table such as {{ web = "rw" }}')
    pairs: list[tuple[str, str]] = []
    for member, mode in members.items():
        if member not in partitions:
            raise ConfigError(f"{where}: members: no partition is named {_show(member)}")
        if mode not in CHANNEL_MODES:
            raise ConfigError(f"{where}: members: {member} = {_show(mode)} is not 'rw' or 'ro'")
        pairs.append((member, mode))
    return ChannelSpec(name, size, tuple(pairs))


def _parse_network(table: dict[str, Any], index: int, partitions: set[str]) -> NetworkSpec:
    name = _name(table, "network", index)
    where = f"network {name!r}"
    _check_keys(table, NETWORK_KEYS, where)
    members = table.get("members")
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise ConfigError(f'{where}: members: expected a list such as ["web", "db"]')
    for member in members:
        if member not in partitions:
            raise ConfigError(f"{where}: members: no partition is named {_show(member)}")
    if len(set(members)) != len(members):
        raise ConfigError(f"{where}: members: a partition is listed twice: {_show(members)}")
    if len(members) < 2:
        raise ConfigError(
            f"{where}: members: {len(members)} listed, a network joins 2 partitions or more"
        )
    return NetworkSpec(name, tuple(members))
