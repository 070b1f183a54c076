"""A plan's tap NICs (``nets`` on ``[[partition]]``, plan/config.py): parsed as
``--net`` is, each mistake one line before anything is taken, their slots after
the disks and before the network NICs and the vsock, ``osvmm plan`` listing
them, and the checks of a restore and a migration against them (no KVM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from osvmm.errors import ConfigError, SnapshotError
from osvmm.plan.config import parse_plan
from osvmm.plan.drives import MAX_DEVICES, Net
from osvmm.vmm.tap import default_mac

ROOT = Path(__file__).resolve().parents[1]
P = '[[partition]]\nname = "{name}"\ncpus = "floating"\nmemory = "2M"\nimage = "guests:hello"\n'


def part(name="a", extra=""):
    return P.format(name=name) + extra + "\n"


def test_nets_are_parsed_as_net_options(tmp_path):
    plan = parse_plan(
        part(extra='nets = ["tap=t0", "tap=t1,mac=02:00:00:00:00:07"]') + part("b"), tmp_path
    )
    a, b = plan.partitions
    assert a.nets == (Net("t0"), Net("t1", bytes.fromhex("020000000007")))
    assert b.nets == ()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('nets = ["tap=" ]', "partition 'a': nets: tap=: not an interface name"),
        ('nets = ["tap=a/b"]', "partition 'a': nets: tap=a/b: not an interface name"),
        ('nets = ["tap=' + "x" * 16 + '"]', "not an interface name (1-15 bytes, no '/')"),
        ('nets = ["mac=02:00:00:00:00:01"]', "partition 'a': nets: mac=02:00:00:00:00:01: give"),
        ('nets = ["tap=t0,mac=zz"]', "nets: tap=t0,mac=zz: mac 'zz' is not six hex bytes"),
        ('nets = ["tap=t0,mac=01:00:00:00:00:01"]', "is a multicast address"),
        ('nets = ["tap=t0,mtu=9000"]', "nets: tap=t0,mtu=9000: unknown option 'mtu=9000'"),
        ('nets = "tap=t0"', "partition 'a': nets: expected a list, got 'tap=t0'"),
        ("nets = [1]", "partition 'a': nets: a list of \"tap=NAME[,mac=XX:XX:XX:XX:XX:XX]\""),
        ('nets = ["tap=t0", "tap=t0"]', "nets: tap t0 is this partition's NIC already"),
        (
            'nets = ["tap=' + '", "tap='.join(f"t{i}" for i in range(MAX_DEVICES + 1)) + '"]',
            f"partition 'a': nets: {MAX_DEVICES + 1} NICs, at most {MAX_DEVICES}",
        ),
    ],
)
def test_a_bad_tap_nic_is_one_line(tmp_path, extra, message):
    with pytest.raises(ConfigError) as err:
        parse_plan(part(extra=extra), tmp_path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_tap_named_by_two_partitions_is_refused(tmp_path):
    text = part(extra='nets = ["tap=t0"]') + part("b", 'nets = ["tap=t1", "tap=t0,mac=02:0:0"]')
    with pytest.raises(ConfigError, match="mac '02:0:0'"):  # each NIC checked first
        parse_plan(text, tmp_path)
    text = part(extra='nets = ["tap=t0"]') + part("b", 'nets = ["tap=t1", "tap=t0"]')
    with pytest.raises(ConfigError) as err:
        parse_plan(text, tmp_path)
    assert str(err.value) == (
        "partition 'b': nets: tap t0 is partition 'a''s NIC already (a tap is one NIC's)"
    )


def test_tap_nics_count_against_the_virtio_devices_with_disks_networks_and_vsock(tmp_path):
    drives = ", ".join(f'"d{i}"' for i in range(MAX_DEVICES - 2))
    fits = f'drives = [{drives}]\nnets = ["tap=t0"]\n'
    lan = '[[network]]\nname = "lan"\nmembers = ["a", "b"]\n'
    parse_plan(part(extra=fits) + part("b") + lan, tmp_path)  # 5 + 1 + 1
    with pytest.raises(ConfigError) as err:
        parse_plan(part(extra=fits + 'vsock = "uds=v.sock"') + part("b") + lan, tmp_path)
    assert str(err.value) == (
        f"partition 'a': {MAX_DEVICES - 2} disks, 1 tap NICs, 1 network NICs and 1 vsock, "
        f"at most {MAX_DEVICES} virtio devices in all"
    )


def assignment_of(text: str, tmp_path):
    from osvmm.plan.placement import place
    from osvmm.plan.topology import read_topology

    return place(parse_plan(text, tmp_path), read_topology())


def test_slots_are_disks_then_taps_then_network_nics_then_the_vsock(tmp_path):
    from osvmm.up.partition_config import machine_of, partition_config

    (tmp_path / "d.img").write_bytes(bytes(4096))
    extra = 'drives = ["d.img"]\nnets = ["tap=t0", "tap=t1"]\nvsock = "uds=v.sock"\n'
    lan = '[[network]]\nname = "lan"\nmembers = ["a", "b"]\n'
    assignment = assignment_of(part(extra=extra) + part("b") + lan, tmp_path)
    placement = assignment.partitions[0]
    machine = machine_of(assignment, placement)
    assert machine.virtio_mmio == 5

    class Network:
        def port(self, index):
            return f"port {index}"

    config = partition_config(
        assignment, placement, machine, lambda data: None, networks={"lan": Network()}
    )
    assert [d.path for d in config.drives] == [str(tmp_path / "d.img")]
    assert config.nets == (Net("t0"), Net("t1"))
    assert [port for port, _ in config.switch_nics] == ["port 0"]
    assert config.vsock.uds == str(tmp_path / "v.sock")


def test_osvmm_plan_lists_the_tap_nics_with_their_macs():
    from osvmm.plan.placement import place
    from osvmm.plan.render import render_assignment
    from osvmm.plan.topology import read_topology

    text = part(extra='nets = ["tap=t0", "tap=t1,mac=02:00:00:00:00:07"]') + part("b")
    topology = read_topology(str(ROOT / "tests/fixtures/sysfs/epyc-2s128t"))
    out = render_assignment(place(parse_plan(text, ROOT), topology), topology)
    assert f"\ntap t0: a {default_mac('t0').hex(':')}\ntap t1: a 02:00:00:00:00:07\n" in out


# --- a restore's and a migration's check against the plan's taps ----------------------------


def nic_state(tap: str, mac: bytes) -> dict:
    return {"model": {"kind": "net", "tap": tap, "mac": mac.hex(":"), "network": None}}


class FakeSnapshot:
    def __init__(self, state):
        self.state = state

    def check_machine(self, machine, who):
        pass

    def close(self):
        pass


def check_restore_of(tmp_path, monkeypatch, extra: str, state: dict) -> None:
    from osvmm.up.partition_config import check_restore, machine_of
    from osvmm.vmm import snapshot

    monkeypatch.setattr(snapshot.Snapshot, "read", staticmethod(lambda d: FakeSnapshot(state)))
    assignment = assignment_of(part(extra=extra), tmp_path)
    placement = assignment.partitions[0]
    check_restore(assignment, placement, machine_of(assignment, placement), "snap")


def test_a_snapshot_with_a_tap_nic_restores_under_a_plan_with_one(tmp_path, monkeypatch):
    state = {"virtio": [nic_state("t0", default_mac("t0"))]}
    check_restore_of(tmp_path, monkeypatch, 'nets = ["tap=t0"]', state)
    # Another tap with the snapshot's MAC: the NIC moved, the guest's driver sees no change.
    mac = default_mac("t0").hex(":")
    check_restore_of(tmp_path, monkeypatch, f'nets = ["tap=t9,mac={mac}"]', state)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("", "restore: the snapshot has 1 NICs, 0 given"),
        ('nets = ["tap=t0", "tap=t1"]', "restore: the snapshot has 1 NICs, 2 given"),
        ('nets = ["tap=t9"]', f"give mac={default_mac('t0').hex(':')}"),
    ],
)
def test_a_snapshots_tap_nics_must_be_the_plans(tmp_path, monkeypatch, extra, message):
    state = {"virtio": [nic_state("t0", default_mac("t0"))]}
    with pytest.raises(SnapshotError) as err:
        check_restore_of(tmp_path, monkeypatch, extra, state)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_migrations_tap_nics_must_be_the_plans():
    from osvmm.vmm.device_handover import check_profile

    had = [{"kind": "net", "tap": "t0", "mac": default_mac("t0").hex(":")}]
    check_profile(had, [], [Net("t0")], None, "here")
    check_profile(had, [], [Net("t0")], None, "here", takeover=True)
    check_profile(had, [], [Net("t9", default_mac("t0"))], None, "here")  # another host's tap
    with pytest.raises(SnapshotError, match="here has 0 tap NICs, the migrated one 1"):
        check_profile(had, [], [], None, "here")
    with pytest.raises(SnapshotError) as err:
        check_profile(had, [], [Net("t9")], None, "here")
    assert str(err.value) == (
        f"here: NIC 0 tap=t9: MAC {default_mac('t9').hex(':')}, the migrated one's (tap t0) "
        f"is {had[0]['mac']}: give mac={had[0]['mac']}"
    )
    with pytest.raises(SnapshotError) as err:
        check_profile(had, [], [Net("t9", default_mac("t0"))], None, "here", takeover=True)
    assert str(err.value) == "here: NIC 0: tap t9, the running partition's is t0"
