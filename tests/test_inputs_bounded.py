"""Every input is bounded by its kind and size before it is read.

A FIFO, a device or a directory named as an image, initrd, plan, busybox or
host topology file is refused by name, at once (no hang, no endless read);
a file over its cap is refused from its size, before a byte of it is read;
and a small input cannot make osvmm expand, nest or loop without bound.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from osvmm.errors import ConfigError, ImageError, OsvmmError
from osvmm.files import format_bytes, input_problem, read_input
from osvmm.loader.result import MAX_IMAGE_SIZE, read_image
from osvmm.plan.config import load_plan, parse_cpu_list, parse_plan, parse_size
from tests.helpers import run_osvmm
from tests.test_cli_errors import assert_one_line_error


@contextlib.contextmanager
def within(seconds: float):
    """Fail (instead of hanging the suite) when the block takes longer than ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.monotonic() - start < seconds


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


# -- kind -------------------------------------------------------------------------------------


def test_fifo_image_initrd_and_plan_are_refused_at_once(fifo):
    with within(2), pytest.raises(ImageError, match=r"is a FIFO \(named pipe\), not a regular"):
        read_image(fifo, "image")
    with within(2), pytest.raises(ImageError, match=r"initrd .*pipe: is a FIFO"):
        read_image(fifo, "initrd")
    with within(2), pytest.raises(ConfigError, match=r"plan file .*pipe.*: is a FIFO"):
        load_plan(fifo)


def test_device_plan_is_refused_without_reading():
    with within(2), pytest.raises(ConfigError, match="is a character device, not a regular"):
        load_plan("/dev/zero")
    with within(2), pytest.raises(ImageError, match="is a character device"):
        read_image("/dev/zero")


def test_cli_fifo_and_device_are_one_line_errors(tmp_path, fifo, monkeypatch):
    monkeypatch.setenv("OSVMM_KVM", "/nonexistent/kvm")
    assert_one_line_error(run_osvmm("run", str(fifo), timeout=20), "is a FIFO")
    assert_one_line_error(run_osvmm("plan", "/dev/zero", timeout=20), "character device")


def test_busybox_and_topology_fifos_are_refused(tmp_path, fifo):
    from osvmm.boot.initramfs import read_busybox
    from osvmm.plan.topology import read_topology

    with within(2), pytest.raises(ImageError, match="busybox .*is a FIFO"):
        read_busybox(fifo)
    cpu = tmp_path / "sys" / "devices" / "system" / "cpu"
    (cpu / "cpu0").mkdir(parents=True)
    os.mkfifo(cpu / "online")
    with within(2), pytest.raises(ConfigError, match="host topology: .*online: is a FIFO"):
        read_topology(str(tmp_path / "sys"))


def test_input_problem_names_the_kind(tmp_path, fifo):
    (tmp_path / "f").write_bytes(b"x")
    assert input_problem(tmp_path / "f") is None
    assert input_problem(tmp_path / "nope") == "no such file"
    assert input_problem(tmp_path) == "is a directory, not a file"
    assert input_problem(fifo) == "is a FIFO (named pipe), not a regular file"
    assert input_problem("/dev/null") == "is a character device, not a regular file"


def test_plan_warns_with_what_is_wrong_not_does_not_exist(tmp_path, fifo):
    from osvmm.plan.command import cmd_plan

    (tmp_path / "dir").mkdir()
    plan = tmp_path / "p.toml"
    plan.write_text(
        '[[partition]]\nname = "a"\ncpus = "floating"\nmemory = "16M"\nimage = "dir"\n'
        '[[partition]]\nname = "b"\ncpus = "floating"\nmemory = "16M"\nkernel = "pipe"\n'
        '[[partition]]\nname = "c"\ncpus = "floating"\nmemory = "16M"\nimage = "gone"\n'
    )

    class Args:
        file = str(plan)
        host_sysfs = "tests/fixtures/sysfs/small-2cpu"

    import io

    out = io.StringIO()
    cmd_plan(Args, out)
    text = out.getvalue()
    assert f"partition 'a': image: {tmp_path}/dir is a directory, not a file" in text
    assert f"partition 'b': kernel: {fifo} is a FIFO (named pipe), not a regular file" in text
    assert f"partition 'c': image: {tmp_path}/gone does not exist (yet)" in text


# -- size -------------------------------------------------------------------------------------


def test_huge_initrd_is_refused_from_its_size(tmp_path, monkeypatch):
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # sparse: 3 GiB long, nothing on disk
    reads = []
    monkeypatch.setattr("osvmm.files.os.read", lambda fd, n: reads.append(n) or b"")
    with within(2), pytest.raises(ImageError, match="3 GiB is larger than the 1 GiB"):
        read_image(big, "initrd")
    assert reads == []  # not a byte read


def test_file_without_a_size_is_read_up_to_the_cap_only(tmp_path):
    # procfs files report st_size 0; they are read up to the cap and one byte more.
    assert read_input("/proc/self/status", "status", 1 << 20, ConfigError).startswith(b"Name:")
    with pytest.raises(ConfigError, match="larger than the 16 bytes"):
        read_input("/proc/self/status", "status", 16, ConfigError)


def test_oversized_plan_is_refused(tmp_path):
    plan = tmp_path / "big.toml"
    plan.write_bytes(b"#" * ((1 << 20) + 1))
    with pytest.raises(ConfigError, match="larger than the 1 MiB"):
        load_plan(plan)


def test_format_bytes():
    assert format_bytes(MAX_IMAGE_SIZE) == "1 GiB"
    assert format_bytes(3 << 30) == "3 GiB"
    assert format_bytes(1536 << 20) == "1.5 GiB"
    assert format_bytes(100) == "100 bytes"


# -- expansion, digits, nesting ------------------------------------------------------------

PART = '[[partition]]\nname = "a"\ncpus = {cpus}\nmemory = {memory}\nimage = "x"\n'


def plan_error(text: str) -> str:
    with within(2), pytest.raises(ConfigError) as exc:
        parse_plan(text, "/tmp")
    message = str(exc.value)
    assert "\n" not in message and len(message) < 300, message
    return message


def test_a_huge_cpu_range_is_refused_before_it_is_expanded():
    m = plan_error(PART.format(cpus='"0-99999999999"', memory='"16M"'))
    assert "partition 'a': cpus:" in m and "CPU numbers go up to 8191" in m
    m = plan_error(PART.format(cpus='"0-8191"', memory='"16M"'))
    assert "names more than 254 CPUs" in m
    with within(2), pytest.raises(ConfigError, match="CPU numbers go up to"):
        parse_cpu_list("0-" + "9" * 5000, "cpu/online")
    assert parse_cpu_list("0-8191", "cpu/online") == list(range(8192))


@pytest.mark.parametrize(
    "memory",
    ['"' + "1" * 5000 + '"', "1" * 5000, '"1.' + "1" * 5000 + 'K"', '"' + "9" * 41 + '"'],
    ids=["string", "toml-integer", "decimal", "41-digits"],
)
def test_sizes_with_thousands_of_digits_are_config_errors(memory):
    m = plan_error(PART.format(cpus='"floating"', memory=memory))
    assert "memory" in m or "too many digits" in m


def test_parse_size_text_is_bounded():
    with pytest.raises(ConfigError, match="is not a size"):
        parse_size("1" * 100_000, "--memory")


@pytest.mark.parametrize("depth", [200, 1000, 100_000])
def test_deeply_nested_toml_is_a_config_error(depth):
    m = plan_error("a = " + "[" * depth + "]" * depth)
    assert "nested too deeply" in m or "unknown key" in m


def test_long_values_are_cut_short_in_messages():
    m = plan_error(PART.format(cpus="[" + "1, " * 50_000 + "1]", memory='"16M"'))
    assert "repeated CPU" in m
    m = plan_error(PART.format(cpus='"floating"', memory='"' + "x" * 10_000 + '"'))
    assert "is not a size" in m


def test_every_plan_error_is_an_osvmm_error():
    for text in ("a = [[[[", "\0", "x = 1e999999", "[[partition]]\nname = 1\n"):
        with pytest.raises(OsvmmError):
            parse_plan(text, "/tmp")


def test_restart_backoff_is_bounded():
    # The supervisor waits restart_backoff_ms (doubled each time); 10**13 ms is past what a
    # condition variable's timeout can hold (OverflowError on the supervisor's thread).
    extra = "restart_backoff_ms = 10000000000000\n"
    m = plan_error(PART.format(cpus='"floating"', memory='"16M"') + extra)
    assert m == "partition 'a': restart_backoff_ms: 10000000000000 is over 86400000 (one day)"
    parse_plan(
        PART.format(cpus='"floating"', memory='"16M"') + "restart_backoff_ms = 86400000\n", "/"
    )


def test_an_empty_or_unsized_file_is_read_in_small_pieces(tmp_path, monkeypatch):
    # os.read(fd, n) allocates n bytes first: an empty file (st_size 0, like procfs) must
    # not be read with n = the 1 GiB cap (found by tests/test_fuzz_inputs.py).
    import osvmm.files

    sizes = []
    real = os.read
    monkeypatch.setattr(osvmm.files.os, "read", lambda fd, n: sizes.append(n) or real(fd, n))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ImageError, match="file is empty"):
        read_image(tmp_path / "empty")
    assert sizes and max(sizes) <= 1 << 16


def test_topology_numbers_with_thousands_of_digits_are_not_read(tmp_path):
    from osvmm.plan.topology import read_topology

    cpu = tmp_path / "sys" / "devices" / "system" / "cpu"
    (cpu / "cpu0").mkdir(parents=True)
    (cpu / ("cpu" + "9" * 200)).mkdir()
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text("MemTotal: " + "9" * 5000 + " kB\n")
    with within(2):
        topo = read_topology(str(tmp_path / "sys"))
    assert sorted(topo.cpus) == [0]


def test_a_cpu_list_in_toml_list_form_is_bounded_too():
    m = plan_error(PART.format(cpus="[1, 99999999999]", memory='"16M"'))
    assert m == "partition 'a': cpus: CPU numbers go up to 8191"
