"""The kernel command-line builder: what it builds and what it rejects on insert."""

from __future__ import annotations

import pytest

from osvmm.errors import ConfigError
from osvmm.loader.cmdline import Cmdline
from osvmm.loader.vmlinux import default_setup_header


def test_builds_nul_terminated_line():
    c = Cmdline(100)
    c.insert("console", "ttyS0").insert_flag("noxsave").insert_str(" panic=-1  quiet ")
    c.insert("root", "PARTUUID=1234-5").insert("msg", '"hello world"')
    c.insert_multiple("isolcpus", ["1", "2", "3"])
    want = 'console=ttyS0 noxsave panic=-1  quiet root=PARTUUID=1234-5 msg="hello world"'
    want += " isolcpus=1,2,3"
    assert str(c) == want
    assert c.as_bytes() == want.encode() + b"\0"
    assert len(c) == len(want)


def test_empty_line_is_just_nul():
    assert Cmdline(1).as_bytes() == b"\0"
    assert Cmdline(10).insert_str("   ").as_bytes() == b"\0"


def test_capacity_counts_the_nul():
    c = Cmdline(8)
    c.insert("a", "12345")  # "a=12345" + NUL = 8 bytes
    with pytest.raises(ConfigError, match="too long: 10 bytes with its NUL, the kernel takes 8"):
        c.insert_flag("b")
    assert c.as_bytes() == b"a=12345\0"  # a rejected insert changes nothing


def test_capacity_from_setup_header():
    hdr = default_setup_header(0x1000000, 0x2000000)
    assert Cmdline.for_setup_header(hdr).capacity == 2048
    assert Cmdline.for_setup_header(hdr, limit=512).capacity == 512


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("", "x", "empty key"),
        ("a b", "x", "key 'a b' has a space"),
        ("a=b", "x", "has '='"),
        ('a"', "x", "has a quote"),
        ("k\x01", "x", "non-printable"),
        ("k", "a b", "space outside quotes"),
        ("k", '"a b', "unbalanced quote"),
        ("k", "caf\u00e9", "non-printable"),
        ("k", "a\tb", "non-printable"),
        ("k", "a\nb", "non-printable"),
    ],
)
def test_insert_rejects(key, value, match):
    with pytest.raises(ConfigError, match=match) as e:
        Cmdline(100).insert(key, value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, match",
    [
        ("a\0b", "non-printable"),
        ('a="b c', "unbalanced quote"),
        ("=x", "bad key"),
        ('"k"=v', "bad key"),
    ],
)
def test_insert_str_rejects(text, match):
    with pytest.raises(ConfigError, match=match):
        Cmdline(100).insert_str(text)


def test_flag_and_multiple_rejects():
    with pytest.raises(ConfigError, match="has a space"):
        Cmdline(100).insert_flag("a b")
    with pytest.raises(ConfigError, match="no values"):
        Cmdline(100).insert_multiple("k", [])
    with pytest.raises(ConfigError, match="has a ','"):
        Cmdline(100).insert_multiple("k", ["a,b"])
    with pytest.raises(ConfigError, match="no room"):
        Cmdline(0)
