"""render_assignment and the ``osvmm plan`` subcommand."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from osvmm.errors import ConfigError
from osvmm.plan.command import add_plan_parser, cmd_plan
from osvmm.plan.config import load_plan, parse_plan
from osvmm.plan.placement import place
from osvmm.plan.render import human_size, render_assignment
from osvmm.plan.topology import read_topology

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "sysfs"
EXAMPLES = HERE.parent / "examples"

SMALL_GOLDEN = (
    "host: 2 CPUs online (0-1; 2 cores, 1 package), 1 NUMA node, 4.8G memory, THP madvise\n"
    "cores: SMT threads joined by '/', owners after ':', '.' = free (floating pool)\n"
    "\n"
    "node 0: CPUs 0-1, memory 4.8G\n"
    "  cpus    0:. 1:.\n"
    "  memory  ping 16M, pong 16M, free 4.8G\n"
    "\n"
    "partition  cpus      vcpus  node  memory  boot               restart              grants\n"
    "ping       floating  1      0     16M     image guests:ping  stop                 "
    "doorbells pong; channels link rw\n"
    "pong       floating  1      0     16M     image guests:pong  restart (3x, 200ms)  "
    "doorbells ping; channels link rw\n"
    "\n"
    "channel link: 64K, ping rw, pong rw\n"
)


def test_small_example_golden():
    topo = read_topology(str(FIXTURES / "small-2cpu"))
    text = render_assignment(place(load_plan(EXAMPLES / "two-partitions.toml"), topo), topo)
    assert text == SMALL_GOLDEN


def test_opteron_example_rendering():
    topo = read_topology(str(FIXTURES / "opteron-8node"))
    text = render_assignment(place(load_plan(EXAMPLES / "opteron-8node.toml"), topo), topo)
    lines = text.splitlines()
    assert lines[0].startswith("host: 32 CPUs online (0-31; 32 cores, 4 packages), 8 NUMA")
    assert sum(1 for line in lines if line.startswith("node ")) == 8
    assert "node 0: CPUs 0-3, memory 7.8G" in lines
    assert "  cpus    0:ctl    1:ctl    2:ctl    3:ctl" in lines
    assert "  cpus    16:.     17:.     18:.     19:." in lines
    assert "  memory  ctl 2G, free 5.8G" in lines
    assert "  memory  probe 64M, free 7.9G" in lines  # node 4
    db = next(line for line in lines if line.startswith("db "))
    assert db.split()[:6] == ["db", "12-15", "(placed)", "4", "3", "7G"]
    ctl = next(line for line in lines if line.startswith("ctl "))
    assert "kernel /boot/vmlinux-osv + initrd /boot/initrd-osv.cpio" in ctl
    assert ctl.endswith("privileged; doorbells web,db")
    assert "channel requests: 1M, web rw, db ro, cache ro" in lines
    assert lines[-1].startswith("warning: partition 'web': node: memory on node 1, CPUs on nodes")


def test_epyc_rendering_shows_cores_and_split_siblings():
    topo = read_topology(str(FIXTURES / "epyc-2s128t"))
    plan = parse_plan(
        """
        [[partition]]
        name = "web"
        cpus = "0-1"
        memory = "16G"
        kernel = "k/vmlinux"
        [[partition]]
        name = "aux"
        cpus = "64"
        memory = "2G"
        image = "g.elf"
        [[partition]]
        name = "db"
        cpus = 6
        node = 1
        memory = "64G"
        image = "guests:hello"
        """,
        "/plans",
    )
    text = render_assignment(place(plan, topo), topo)
    lines = text.splitlines()
    assert "node 0: CPUs 0-31,64-95, memory 256G, 2M hugepages 1000/1024 free" in lines
    cells = " ".join(lines).split()
    assert "0/64:web,aux" in cells and "1/65:web,." in cells and "2/66:." in cells
    assert "32/96:db" in cells and "35/99:." in cells
    assert all(len(line) <= 100 for line in lines if line.startswith(" "))
    web = next(line for line in lines if line.startswith("web "))
    assert "kernel k/vmlinux" in web  # shown relative to the plan's directory
    assert "image g.elf" in text
    assert "  memory  web 16G, aux 2G, free 238G" in lines
    assert lines[-1].startswith("warning: cpus: SMT siblings of one core belong to different")


def test_human_size():
    assert human_size(8 << 30) == "8G"
    assert human_size(512 << 20) == "512M"
    assert human_size(7936 << 20) == "7.8G"
    assert human_size(5073100 * 1024) == "4.8G"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="osvmm")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_plan_subcommand():
    args = parse_args(
        [
            "plan",
            str(EXAMPLES / "two-partitions.toml"),
            "--host-sysfs",
            str(FIXTURES / "small-2cpu"),
        ]
    )
    assert args.func is cmd_plan
    out = io.StringIO()
    assert args.func(args, out) == 0
    assert out.getvalue() == SMALL_GOLDEN
    assert parse_args(["plan", "x.toml"]).host_sysfs == "/sys"


def test_plan_subcommand_warns_of_missing_files():
    args = parse_args(
        [
            "plan",
            str(EXAMPLES / "opteron-8node.toml"),
            "--host-sysfs",
            str(FIXTURES / "opteron-8node"),
        ]
    )
    out = io.StringIO()
    assert cmd_plan(args, out) == 0
    if not Path("/boot/vmlinux-osv").exists():
        assert (
            "warning: partition 'ctl': kernel: /boot/vmlinux-osv does not exist (yet)"
            in out.getvalue()
        )
    assert "guests:hello does not exist" not in out.getvalue()


def test_plan_subcommand_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[partition]]\nname = "a"\ncpus = "0-2"\nmemory = "2M"\nimage = "g"\n')
    args = parse_args(["plan", str(bad), "--host-sysfs", str(FIXTURES / "small-2cpu")])
    with pytest.raises(ConfigError) as exc:
        cmd_plan(args, io.StringIO())
    assert str(exc.value) == "partition 'a': cpus: CPU 2 does not exist on this host (online: 0-1)"
    assert exc.value.exit_status == 2
    args = parse_args(
        ["plan", str(EXAMPLES / "two-partitions.toml"), "--host-sysfs", str(tmp_path)]
    )
    with pytest.raises(ConfigError, match="host topology: no CPUs under"):
        cmd_plan(args, io.StringIO())


def test_docs_show_the_real_output():
    """docs/config.md shows what render_assignment prints for both examples."""
    doc = (HERE.parent / "docs" / "config.md").read_text()
    for plan_name, tree in (("opteron-8node", "opteron-8node"), ("two-partitions", "small-2cpu")):
        topo = read_topology(str(FIXTURES / tree))
        text = render_assignment(place(load_plan(EXAMPLES / f"{plan_name}.toml"), topo), topo)
        assert text in doc, plan_name
