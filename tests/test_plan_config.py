"""The plan file: sizes, CPU lists, keys, defaults, and every parse-time error."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from osvmm.errors import ConfigError
from osvmm.plan.config import (
    format_cpu_list,
    format_size,
    load_plan,
    parse_cpu_list,
    parse_plan,
    parse_size,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64M", 64 << 20),
        ("1G", 1 << 30),
        ("65536K", 64 << 20),
        ("4096", 4096),
        (8192, 8192),
        ("1.5G", 3 << 29),
        ("512m", 512 << 20),
        ("64MiB", 64 << 20),
        ("2 M", 2 << 20),
    ],
)
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("0", "more than 0"),
        (0, "more than 0"),
        ("-1", "not a size"),
        (-4096, "more than 0"),
        ("12X", "not a size"),
        ("", "not a size"),
        ("1.3K", "whole number of bytes"),
        ("100", "not a multiple of 4K"),
        ("6K", "not a multiple of 4K"),
        (True, "expected a size"),
        (1.5, "expected a size"),
    ],
)
def test_parse_size_rejects(text, fragment):
    with pytest.raises(ConfigError, match=fragment) as exc:
        parse_size(text, "--memory")
    assert str(exc.value).startswith("--memory: ")
    assert "\n" not in str(exc.value)


def test_format_size_round_trips():
    for n in (4096, 64 << 20, 1 << 30, 3 << 29, 5 << 40, 12 << 10):
        assert parse_size(format_size(n)) == n
    assert format_size(3 << 29) == "1536M"


def test_cpu_lists():
    assert parse_cpu_list("0-3,8") == [0, 1, 2, 3, 8]
    assert parse_cpu_list("8,0-1\n") == [0, 1, 8]
    assert parse_cpu_list("") == []
    assert format_cpu_list([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    for bad, fragment in (("3-1", "backwards"), ("1,1", "twice"), ("a", "not a CPU")):
        with pytest.raises(ConfigError, match=fragment):
            parse_cpu_list(bad)


FULL = """
[vmm]
control_socket = "run/osvmm.sock"
log_dir = "./logs"

[[partition]]
name = "web"
cpus = "2-3,6"
memory = "512M"
node = 0
kernel = "vmlinux"
initrd = "initrd.cpio"
cmdline = "console=ttyS0"
restart = "restart"
restart_limit = 7
restart_backoff_ms = 250
hugepages = false
prefault = true
privileged = true
doorbells = ["db"]

[[partition]]
name = "db"
cpus = 4
memory = "1G"
image = "guest.elf"

[[partition]]
name = "tools"
cpus = "floating"
vcpus = 3
memory = 16777216
image = "guests:hello"

[[channel]]
name = "ring0"
size = "64K"
members = { web = "rw", db = "ro" }
"""


def test_full_plan(tmp_path):
    plan = parse_plan(FULL, tmp_path)
    assert plan.vmm.control_socket == str(tmp_path / "run/osvmm.sock")
    assert plan.vmm.log_dir == str(tmp_path / "logs")
    web, db, tools = plan.partitions
    assert web.cpus == (2, 3, 6) and web.cpu_mode == "pinned" and web.vcpus == 3
    assert web.memory == 512 << 20 and web.node == 0
    assert web.boot == "kernel"
    assert web.kernel == str(tmp_path / "vmlinux")
    assert web.initrd == str(tmp_path / "initrd.cpio")
    assert web.cmdline == "console=ttyS0"
    assert (web.restart, web.restart_limit, web.restart_backoff_ms) == ("restart", 7, 250)
    assert (web.hugepages, web.prefault, web.privileged) == (False, True, True)
    assert web.doorbells == ("db",)
    assert db.cpu_mode == "count" and db.cpu_count == 4 and db.vcpus == 4 and db.cpus is None
    assert db.image == str(tmp_path / "guest.elf") and db.bundled_guest is None
    # defaults
    assert (db.restart, db.restart_limit, db.restart_backoff_ms) == ("stop", 5, 500)
    assert (db.hugepages, db.prefault, db.privileged, db.doorbells) == (None, False, False, ())
    assert db.node is None and db.kernel is None and db.initrd is None
    assert tools.floating and tools.cpu_mode == "floating" and tools.vcpus == 3
    assert tools.image == "guests:hello" and tools.bundled_guest == "hello"
    (ring,) = plan.channels
    assert ring.size == 64 << 10 and ring.members == (("web", "rw"), ("db", "ro"))
    assert ring.mode("db") == "ro" and ring.mode("tools") is None
    assert [c.name for c in plan.channels_of("web")] == ["ring0"]
    assert plan.partition("db") is db


def test_cpus_as_list_and_floating_default_vcpus(tmp_path):
    plan = parse_plan(
        """
        [[partition]]
        name = "a"
        cpus = [6, 2, 3]
        memory = "2M"
        image = "x"
        [[partition]]
        name = "b"
        cpus = "floating"
        memory = "2M"
        image = "x"
        """,
        tmp_path,
    )
    assert plan.partitions[0].cpus == (2, 3, 6)
    assert plan.partitions[1].vcpus == 1


def test_vmm_defaults(tmp_path, monkeypatch):
    text = '[[partition]]\nname = "a"\ncpus = 1\nmemory = "2M"\nimage = "x"\n'
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    plan = parse_plan(text, tmp_path)
    assert plan.vmm.control_socket == "/run/osvmm/osvmm.sock"  # root: whatever the environment
    assert plan.vmm.log_dir is None
    assert plan.vmm.console_log_max == 64 << 20
    # another user: a directory of the socket's own, in a place only that user can write
    monkeypatch.setattr(os, "geteuid", lambda: 7)
    assert parse_plan(text, tmp_path).vmm.control_socket == "/run/user/7/osvmm/osvmm.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative")
    assert parse_plan(text, tmp_path).vmm.control_socket == "/tmp/osvmm-7/osvmm.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert parse_plan(text, tmp_path).vmm.control_socket == "/tmp/osvmm-7/osvmm.sock"


@pytest.mark.parametrize(
    "value, expected",
    [("16M", 16 << 20), (8192, 8192), ("4K", 4096)],
)
def test_console_log_max(tmp_path, value, expected):
    toml = f'"{value}"' if isinstance(value, str) else str(value)
    text = f'[vmm]\nconsole_log_max = {toml}\n[[partition]]\nname = "a"\ncpus = 1\nmemory = "2M"\n'
    assert parse_plan(text + 'image = "x"\n', tmp_path).vmm.console_log_max == expected


@pytest.mark.parametrize(
    "value, error",
    [
        ('"1K"', "vmm: console_log_max: 1K is less than 4K"),
        ('"lots"', "vmm: console_log_max: 'lots' is not a size"),
        ("-5", "vmm: console_log_max: -5 must be more than 0 bytes"),
        ("true", "vmm: console_log_max: expected a size"),
    ],
)
def test_console_log_max_errors(tmp_path, value, error):
    text = f'[vmm]\nconsole_log_max = {value}\n[[partition]]\nname = "a"\ncpus = 1\nmemory = "2M"\n'
    with pytest.raises(ConfigError, match="^" + re.escape(error)):
        parse_plan(text + 'image = "x"\n', tmp_path)


def test_load_plan_resolves_against_file_dir(tmp_path):
    sub = tmp_path / "plans"
    sub.mkdir()
    (sub / "p.toml").write_text('[[partition]]\nname="a"\ncpus=1\nmemory="2M"\nkernel="k"\n')
    plan = load_plan(sub / "p.toml")
    assert plan.partitions[0].kernel == str(sub / "k")
    assert plan.base_dir == str(sub)


def test_load_plan_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_plan(tmp_path / "absent.toml")
    (tmp_path / "bad.toml").write_text("[[partition]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_plan(tmp_path / "bad.toml")


def test_examples_parse():
    for name in ("two-partitions.toml", "opteron-8node.toml"):
        plan = load_plan(REPO / "examples" / name)
        assert plan.partitions


P = '[[partition]]\nname = "{name}"\ncpus = {cpus}\nmemory = "{memory}"\nimage = "g"\n{extra}\n'


def part(name="a", cpus="1", memory="2M", extra=""):
    return P.format(name=name, cpus=cpus, memory=memory, extra=extra)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "partition: the plan has no [[partition]]"),
        ('[partition]\nname = "a"\n', "partition: must be an array of tables"),
        ("vmm = 3\n" + part(), "vmm: must be a table"),
        ("foo = 1\n" + part(), "plan: unknown key 'foo'"),
        (
            '[vmm]\nlog_dirs = "x"\n' + part(),
            "vmm: unknown key 'log_dirs' (did you mean 'log_dir'?)",
        ),
        ("[vmm]\nlog_dir = 3\n" + part(), "vmm: log_dir: expected a string, got 3"),
        (part(extra='append = "x"'), "partition 'a': unknown key 'append'"),
        (part() + part(), "partition 'a': name: duplicate partition name"),
        (part(name="Web"), "partition #1: name: 'Web' is not 1-32 characters"),
        (part(name="a" * 33), "partition #1: name: "),
        ('[[partition]]\ncpus = 1\nmemory = "2M"\nimage = "g"\n', "partition #1: name: missing"),
        ('[[partition]]\nname = "a"\nmemory = "2M"\nimage = "g"\n', "partition 'a': cpus: missing"),
        (part(cpus='"3-1"'), "partition 'a': cpus: range '3-1'"),
        (part(cpus='"x"'), "partition 'a': cpus: 'x' in 'x' is not a CPU"),
        (part(cpus='""'), "partition 'a': cpus: the CPU list is empty"),
        (part(cpus="0"), "partition 'a': cpus: a count of 0"),
        (part(cpus="true"), "partition 'a': cpus: expected a CPU list"),
        (part(cpus="[1, 1]"), "partition 'a': cpus: [1, 1] has a negative or repeated CPU"),
        (part(cpus='["1"]'), "partition 'a': cpus: a list must hold CPU numbers"),
        (part(extra="vcpus = 2"), "partition 'a': vcpus: only with cpus = \"floating\""),
        (part(cpus='"floating"', extra="vcpus = 0"), "partition 'a': vcpus: 0 is not between"),
        (part(cpus='"floating"', extra="vcpus = 256"), "partition 'a': vcpus: 256"),
        ('[[partition]]\nname = "a"\ncpus = 1\nimage = "g"\n', "partition 'a': memory: missing"),
        (part(memory="12X"), "partition 'a': memory: '12X' is not a size"),
        (part(memory="1M"), "partition 'a': memory: 1M is below the 2M minimum"),
        (part(memory="2049K"), "partition 'a': memory: '2049K' is not a multiple of 4K"),
        (part(extra="node = -1"), "partition 'a': node: -1 is negative"),
        (part(extra='node = "0"'), "partition 'a': node: expected an integer"),
        ('[[partition]]\nname = "a"\ncpus = 1\nmemory = "2M"\n', "partition 'a': image: nothing"),
        (part(extra='kernel = "k"'), "partition 'a': image: set image or kernel, not both"),
        (part(extra='initrd = "i"'), "partition 'a': initrd: only with kernel"),
        (part(extra='image2 = "i"'), "partition 'a': unknown key 'image2' (did you mean 'image'?)"),
        (part(extra='restart = "always"'), "partition 'a': restart: 'always' is not"),
        (part(extra="restart_limit = -1"), "partition 'a': restart_limit: -1 is negative"),
        (part(extra="hugepages = 1"), "partition 'a': hugepages: 1 is not true, false or \"auto\""),
        (part(extra='doorbells = "b"'), "partition 'a': doorbells: expected a list"),
        (part(extra='doorbells = ["b"]'), "partition 'a': doorbells: no partition is named 'b'"),
        (part(extra='doorbells = ["a"]'), "partition 'a': doorbells: a partition does not ring"),
        (
            part(extra='doorbells = ["b", "b"]') + part("b"),
            "partition 'a': doorbells: a partition is listed twice",
        ),
        (part(extra='image = "guests:"').replace('image = "g"\n', ""), "names no bundled guest"),
        (
            part() + '[[channel]]\nname = "c"\nmembers = { a = "rw" }\n',
            "channel 'c': size: missing",
        ),
        (
            part() + '[[channel]]\nname = "c"\nsize = "65M"\nmembers = { a = "rw" }\n',
            "channel 'c': size: 65M is over the 64M maximum",
        ),
        (
            part() + '[[channel]]\nname = "c"\nsize = "1000"\nmembers = { a = "rw" }\n',
            "channel 'c': size: '1000' is not a multiple of 4K",
        ),
        (
            part() + '[[channel]]\nname = "c"\nsize = "4K"\nmembers = { b = "rw" }\n',
            "channel 'c': members: no partition is named 'b'",
        ),
        (
            part() + '[[channel]]\nname = "c"\nsize = "4K"\nmembers = { a = "wr" }\n',
            "channel 'c': members: a = 'wr' is not 'rw' or 'ro'",
        ),
        (
            part() + '[[channel]]\nname = "c"\nsize = "4K"\nmembers = {}\n',
            "channel 'c': members: expected a table",
        ),
        (
            part() + '[[channel]]\nname = "c"\nsize = "4K"\nmembers = { a = "rw" }\nmode = 1\n',
            "channel 'c': unknown key 'mode'",
        ),
        (
            part() + ('[[channel]]\nname = "c"\nsize = "4K"\nmembers = { a = "rw" }\n' * 2),
            "channel 'c': name: duplicate channel name",
        ),
        (
            part()
            + "".join(
                f'[[channel]]\nname = "c{i}"\nsize = "64M"\nmembers = {{ a = "rw" }}\n'
                for i in range(5)
            ),
            "channel: 320M of channels do not fit the 256M channel window",
        ),
    ],
)
def test_parse_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        parse_plan(text, tmp_path)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_a_fragment_may_name_running_partitions_and_be_channels_only(tmp_path):
    """``osvmm create``: channels and doorbells may name what runs (``outside``);
    a fragment of channels alone is one; a plan is not."""
    chan = '[[channel]]\nname = "c"\nsize = "4K"\nmembers = { web = "rw", db = "ro" }\n'
    frag = parse_plan(chan, tmp_path, outside=frozenset({"web", "db"}))
    assert frag.partitions == () and frag.channels[0].members == (("web", "rw"), ("db", "ro"))
    with pytest.raises(ConfigError, match="members: no partition is named 'db'"):
        parse_plan(chan, tmp_path, outside=frozenset({"web"}))
    with pytest.raises(ConfigError, match=r"the plan has no \[\[partition\]\]"):
        parse_plan(chan, tmp_path)
    with pytest.raises(
        ConfigError, match=r"the fragment has no \[\[partition\]\], \[\[channel\]\] or \[\[doorbell"
    ):
        parse_plan("", tmp_path, outside=frozenset({"web"}))
    part = '[[partition]]\nname = "x"\ncpus = "floating"\nmemory = "4M"\nimage = "guests:hello"\n'
    frag = parse_plan(part + 'doorbells = ["web"]\n', tmp_path, outside=frozenset({"web"}))
    assert frag.partitions[0].doorbells == ("web",)
    with pytest.raises(ConfigError, match="doorbells: no partition is named 'web'"):
        parse_plan(part + 'doorbells = ["web"]\n', tmp_path)


def test_doorbell_tables_are_a_fragments_only(tmp_path):
    """``[[doorbell]]``: a running partition (``from``) may ring ``to`` from now on."""
    grant = '[[doorbell]]\nfrom = "web"\nto = ["db", "x"]\n'
    part = '[[partition]]\nname = "x"\ncpus = "floating"\nmemory = "4M"\nimage = "guests:hello"\n'
    frag = parse_plan(grant + part, tmp_path, outside=frozenset({"web", "db"}))
    assert frag.grants == (("web", "db"), ("web", "x"))
    assert parse_plan(grant.replace(', "x"', ""), tmp_path, outside=frozenset({"web", "db"}))
    with pytest.raises(ConfigError, match="plan: unknown key 'doorbell'"):
        parse_plan(part + grant, tmp_path)
    for text, outside, error in [
        (grant, {"web", "db"}, "to: no partition is named 'x'"),
        (grant + part, {"db"}, "from: no partition is named 'web'"),
        ('[[doorbell]]\nfrom = "x"\nto = ["web"]\n' + part, {"web"}, "give its doorbells in"),
        ('[[doorbell]]\nfrom = "web"\nto = ["web"]\n', {"web"}, "does not ring its own"),
        ('[[doorbell]]\nfrom = "web"\nto = ["db", "db"]\n', {"web", "db"}, "web may ring db twice"),
        ('[[doorbell]]\nfrom = "web"\nto = "db"\n', {"web", "db"}, "to: expected a list"),
        ('[[doorbell]]\nfrom = "web"\nto = ["db"]\nat = 1\n', {"web", "db"}, "unknown key 'at'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(error)):
            parse_plan(text, tmp_path, outside=frozenset(outside))
