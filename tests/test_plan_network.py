"""A plan's ``[[network]]`` (plan/config.py): parsed members, MACs derived from
(network, partition), and each mistake one line."""

from __future__ import annotations

import pytest

from osvmm.errors import ConfigError
from osvmm.plan.config import network_mac, parse_plan
from osvmm.plan.drives import MAX_DEVICES

P = '[[partition]]\nname = "{name}"\ncpus = 1\nmemory = "2M"\nimage = "g"\n{extra}\n'


def part(name="a", extra=""):
    return P.format(name=name, extra=extra)


def net(name="lan", members='["a", "b"]', extra=""):
    return f'[[network]]\nname = "{name}"\nmembers = {members}\n{extra}\n'


def test_network_members_and_macs(tmp_path):
    plan = parse_plan(
        part("a") + part("b") + part("c") + net() + net("back", '["c", "a"]'), tmp_path
    )
    lan, back = plan.networks
    assert lan.name == "lan" and lan.members == ("a", "b")
    assert back.members == ("c", "a")
    assert plan.networks_of("a") == [lan, back] and plan.networks_of("b") == [lan]
    macs = {n.mac(m) for n in plan.networks for m in n.members}
    assert len(macs) == 4
    for mac in macs:
        assert len(mac) == 6 and mac[0] & 0x03 == 0x02  # locally administered, unicast
    assert lan.mac("a") == network_mac("lan", "a")  # the same from one run to the next
    assert network_mac("lan", "a") != network_mac("back", "a")


def test_no_networks(tmp_path):
    assert parse_plan(part(), tmp_path).networks == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            part() + part("b") + net(members='["a", "c"]'),
            "network 'lan': members: no partition is named 'c'",
        ),
        (
            part() + part("b") + net(members='["a", "a"]'),
            "network 'lan': members: a partition is listed twice",
        ),
        (part() + net(members='["a"]'), "network 'lan': members: 1 listed, a network joins 2"),
        (part() + net(members="[]"), "network 'lan': members: 0 listed"),
        (part() + net(members='"a"'), "network 'lan': members: expected a list"),
        (part() + part("b") + net() + net(), "network 'lan': name: duplicate network name"),
        (part() + part("b") + net(extra="mtu = 9000"), "network 'lan': unknown key 'mtu'"),
        (part() + part("b") + '[[network]]\nmembers = ["a", "b"]\n', "network #1: name: missing"),
        (part() + '[network]\nname = "x"\n', "network: must be an array of tables"),
        (
            part(extra="drives = [" + ", ".join(f'"d{i}"' for i in range(MAX_DEVICES)) + "]")
            + part("b")
            + net(),
            f"partition 'a': {MAX_DEVICES} disks, 0 tap NICs, 1 network NICs and 0 vsock, "
            f"at most {MAX_DEVICES}",
        ),
    ],
)
def test_network_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        parse_plan(text, tmp_path)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_plan_output_lists_networks_and_macs():
    from pathlib import Path

    from osvmm.plan.placement import place
    from osvmm.plan.render import render_assignment
    from osvmm.plan.topology import read_topology

    root = Path(__file__).resolve().parents[1]
    text = "".join(
        f'[[partition]]\nname = "{n}"\ncpus = "floating"\nvcpus = 1\n'
        f'memory = "2M"\nimage = "guests:hello"\n'
        for n in ("a", "b")
    )
    plan = parse_plan(text + net(), root)
    topology = read_topology(str(root / "tests/fixtures/sysfs/epyc-2s128t"))
    out = render_assignment(place(plan, topology), topology)
    mac_a, mac_b = (network_mac("lan", m).hex(":") for m in "ab")
    assert f"network lan: a {mac_a}, b {mac_b}\n" in out
