"""The guest builder: cache, rebuild on change, errors, concurrent builds."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from osvmm.errors import BuildError, ConfigError
from osvmm.guests import build

REPO = Path(__file__).resolve().parents[1]


def pvh_entry(path: Path) -> int | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY value of an ELF64, read independently of osvmm."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # ELF64
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", data, 0x20)[0],
        *struct.unpack_from("<HH", data, 0x36),
    )
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        off, end = p_offset, p_offset + p_filesz
        while off + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, off)
            name = data[off + 12 : off + 12 + namesz]
            desc = off + 12 + (namesz + 3) // 4 * 4
            if ntype == 18 and name == b"Xen\0":
                return int.from_bytes(data[desc : desc + descsz], "little")
            off = desc + (descsz + 3) // 4 * 4
    return None


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OSVMM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One fresh build of every guest, shared by the tests that only read it."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OSVMM_CACHE", str(cache))
        paths = {name: build.guest_path(name) for name in build.GUEST_NAMES}
    return cache, paths


@pytest.fixture
def src_copy(tmp_path, monkeypatch):
    """A private copy of the guest sources that the builder uses."""
    src = tmp_path / "src"
    shutil.copytree(build.SRC_DIR, src)
    monkeypatch.setattr(build, "SRC_DIR", src)
    return src


def test_builds_every_guest_into_the_cache_with_the_right_entry(built):
    cache, paths = built
    assert set(paths) == set(build.GUEST_NAMES)
    assert {"hello", "smp", "compute", "ioloop", "triplefault", "hello64"} <= set(paths)
    for name, path in paths.items():
        assert path.is_file() and path.parent.parent == cache / "guests"
        entry = pvh_entry(path)
        if not build.GUESTS[name].pvh:
            assert entry is None
        else:
            assert entry is not None and 0x100000 <= entry < 0x200000


def test_second_call_is_a_cache_hit(built, monkeypatch):
    cache, paths = built
    monkeypatch.setenv("OSVMM_CACHE", str(cache))
    first = paths["hello"]
    stamp = first.stat().st_mtime_ns

    def no_compiling(*args, **kwargs):
        raise AssertionError("the compiler ran on a cache hit")

    monkeypatch.setattr(build.subprocess, "run", no_compiling)
    assert build.guest_path("hello") == first
    assert build.guest_path("smp").parent == first.parent
    assert first.stat().st_mtime_ns == stamp


def test_changed_source_builds_anew(built, src_copy, monkeypatch):
    monkeypatch.setenv("OSVMM_CACHE", str(built[0]))
    before = build.guest_path("hello")  # same sources as the shared build: a hit
    assert before == built[1]["hello"]
    hello = src_copy / "hello.c"
    hello.write_text(hello.read_text().replace("Hello from", "Hi from"))
    after = build.guest_path("hello")
    assert after.parent != before.parent
    assert b"Hi from" in after.read_bytes() and b"Hi from" not in before.read_bytes()


def test_missing_compiler_is_a_one_line_build_error(cache, tmp_path, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BuildError) as exc:
        build.guest_path("hello")
    assert str(exc.value) == "no C compiler found: install gcc (Debian package build-essential)"
    assert not (cache / "guests").exists() or not any((cache / "guests").iterdir())


def test_compile_error_names_the_first_error(cache, src_copy):
    (src_copy / "hello.c").write_text("int guest_main(void) { return nonsense; }\n")
    with pytest.raises(BuildError) as exc:
        build.guest_path("hello")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("building guest runtime failed: ")
    assert "hello.c" in msg and "nonsense" in msg
    # A failed build leaves nothing behind that a later call could take for a result.
    assert [p.name for p in (cache / "guests").iterdir()] == []


def test_host_program_is_built_once_and_rebuilt_on_change(cache, tmp_path):
    src = tmp_path / "answer.c"
    src.write_text("int main(void) { return 42; }\n")
    prog = build.build_host_program(src, ("-O2",), "tools")
    assert prog.name == "answer" and prog.parent.parent == cache / "tools"
    assert subprocess.run([str(prog)]).returncode == 42
    assert build.build_host_program(src, ("-O2",), "tools") == prog
    src.write_text("int main(void) { return 7; }\n")
    again = build.build_host_program(src, ("-O2",), "tools")
    assert again != prog and subprocess.run([str(again)]).returncode == 7


def test_host_program_errors_are_one_line(cache, tmp_path):
    with pytest.raises(BuildError, match=r"^nope\.c not found at .*nope\.c$"):
        build.build_host_program(tmp_path / "nope.c", (), "tools")
    bad = tmp_path / "bad.c"
    bad.write_text("int main(void) { return nonsense; }\n")
    with pytest.raises(BuildError) as exc:
        build.build_host_program(bad, (), "tools")
    assert "\n" not in str(exc.value) and str(exc.value).startswith("building bad failed: ")
    assert "nonsense" in str(exc.value)


def test_unknown_guest_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown guest 'nope'"):
        build.guest_path("nope")


def test_concurrent_builds_agree(tmp_path):
    env_cache = tmp_path / "cache"
    code = "from osvmm.guests.build import guest_path; print(guest_path('hello'))"
    env = {**os.environ, "OSVMM_CACHE": str(env_cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and Path(outs[0]).is_file()
    assert [p.name for p in (env_cache / "guests").iterdir()] == [Path(outs[0]).parent.name]


def test_module_main_prints_paths(built, capsys, monkeypatch):
    monkeypatch.setenv("OSVMM_CACHE", str(built[0]))
    assert build.main(["hello", "ioloop"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [Path(line).name for line in lines] == ["hello.elf", "ioloop.elf"]
    assert build.main(["bogus"]) == 2
    assert "unknown guest" in capsys.readouterr().err
