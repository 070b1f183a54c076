"""scripts/hwvirt-rig without booting anything: argument errors, `check`, the module
load order, the job script, and the host side of a run against a stand-in QEMU
that plays L1's part in the shared directory (docs/testing.md)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "hwvirt-rig"
KVER = "6.1.0-99-amd64"


def load_rig():
    loader = importlib.machinery.SourceFileLoader("hwvirt_rig", str(SCRIPT))
    spec = importlib.util.spec_from_loader("hwvirt_rig", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["hwvirt_rig"] = module
    loader.exec_module(module)
    return module


rig = load_rig()


def run_rig(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else dict(os.environ),
        stdin=subprocess.DEVNULL,
    )


def assert_one_line(r, status: int, *fragments: str, stream: str = "stderr"):
    text = getattr(r, stream)
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = text.splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("hwvirt-rig: ")
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# -- argument errors --------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        ((), "required"),
        (("run",), "no command given"),
        (("run", "--"), "no command given"),
        (("run", "--cpus", "0", "--", "true"), "--cpus"),
        (("run", "--memory", "4X", "--", "true"), "--memory"),
        (("run", "--timeout", "0", "--", "true"), "--timeout"),
        (("run", "--timeout", "soon", "--", "true"), "--timeout"),
        (("run", "--env", "1BAD", "--", "true"), "--env"),
        (("boot",), "invalid choice"),
    ],
)
def test_bad_usage_is_status_2(args, fragment):
    r = run_rig(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert fragment in r.stderr.splitlines()[-1]


# -- a stand-in cache and QEMU ----------------------------------------------

# modules.dep in the order busybox depmod writes it: not load order.
MODULES_DEP = """\
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/drivers/virtio/virtio.ko kernel/net/9p/9pnet.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/arch/x86/kvm/kvm.ko:
kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko
"""


def make_cache(root: Path, modules: bool = True) -> Path:
    cache = root / "cache"
    kdir = cache / "kernel" / "6.1.0-99"
    kdir.mkdir(parents=True)
    (kdir / f"vmlinux-{KVER}").write_bytes(b"\x7fELF stand-in")
    (cache / "kernel" / "vmlinux").symlink_to(f"6.1.0-99/vmlinux-{KVER}")
    if modules:
        moddir = kdir / "modules" / "lib" / "modules" / KVER
        moddir.mkdir(parents=True)
        (moddir / "modules.dep").write_text(MODULES_DEP)
        (moddir / "modules.builtin").write_text("kernel/fs/overlayfs/overlay.ko\n")
        for line in MODULES_DEP.splitlines():
            ko = moddir / line.split(":")[0]
            ko.parent.mkdir(parents=True, exist_ok=True)
            ko.write_bytes(b"stand-in module " + ko.name.encode())
    return cache


# Plays QEMU and L1: finds the run's share on its command line and answers in it
# as l1-stage2 would, as FAKE_L1 says.
FAKE_QEMU = """\
#!{python}
import os, re, sys, time
share = re.search(r"path=([^,]+),mount_tag=rig", " ".join(sys.argv)).group(1)
mode = os.environ["FAKE_L1"]
if mode == "hang-once":  # the first boot freezes on its way up, the next one runs
    boots = os.environ["FAKE_BOOTS"]
    n = int(open(boots).read()) if os.path.exists(boots) else 0
    with open(boots, "w") as f:
        f.write(str(n + 1))
    mode = "hang" if n == 0 else "status"
def put(name, text):
    with open(f"{{share}}/{{name}}.tmp", "w") as f:
        f.write(text + "\\n")
    os.replace(f"{{share}}/{{name}}.tmp", f"{{share}}/{{name}}")
if mode == "status":
    put("started", "9.5")
    with open(f"{{share}}/stdout", "w") as f:
        f.write("out line\\n")
    with open(f"{{share}}/stderr", "w") as f:
        f.write("err line\\n")
    put("status", "3")
elif mode == "nokvm":
    put("error", "the L1 CPU offers no svm in /proc/cpuinfo")
elif mode == "crash":
    print("qemu-system-x86_64: could not load kernel", file=sys.stderr)
    sys.exit(1)
elif mode == "hang":
    console = re.search(r"-serial file:(\\S+)", " ".join(sys.argv)).group(1)
    with open(console, "w") as f:
        f.write("watchdog: BUG: soft lockup - CPU#0 stuck for 22s!\\n")
    if "FAKE_PIDFILE" in os.environ:
        with open(os.environ["FAKE_PIDFILE"], "w") as f:
            f.write(str(os.getpid()))
    time.sleep(600)
"""


@pytest.fixture
def stand_in(tmp_path):
    """(env, cache): OSVMM_CACHE with a kernel and modules, a stand-in QEMU on PATH."""
    if not Path("/bin/busybox").is_file():
        pytest.skip("no /bin/busybox (Debian package busybox-static)")
    cache = make_cache(tmp_path)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    qemu = bindir / "qemu-system-x86_64"
    qemu.write_text(FAKE_QEMU.format(python=sys.executable))
    qemu.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    env["OSVMM_CACHE"] = str(cache)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env, cache


# -- check ------------------------------------------------------------------


def test_check_without_a_kernel_says_how_to_fetch_it(tmp_path, stand_in):
    env, _ = stand_in
    env["OSVMM_CACHE"] = str(tmp_path / "empty")
    r = run_rig("check", env=env)
    assert_one_line(r, 1, "no L1 kernel", "fetch-debian-kernel --modules", stream="stdout")


def test_check_without_modules(tmp_path, stand_in):
    env, _ = stand_in
    env["OSVMM_CACHE"] = str(make_cache(tmp_path / "nomods", modules=False))
    r = run_rig("check", env=env)
    assert_one_line(r, 1, f"no modules for kernel {KVER}", stream="stdout")


def test_check_without_qemu(tmp_path, stand_in):
    env, _ = stand_in
    env["PATH"] = str(tmp_path / "nothing")
    r = run_rig("check", env=env)
    assert_one_line(r, 1, "qemu-system-x86_64 is not installed", stream="stdout")


def test_check_ready(stand_in):
    env, cache = stand_in
    r = run_rig("check", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"modules: {cache}/kernel/6.1.0-99/modules/lib/modules/{KVER}" in r.stdout
    assert "(built on the first run)" in r.stdout
    assert r.stdout.splitlines()[-1].startswith("ready")


def test_run_without_a_kernel_is_one_line_status_125(tmp_path, stand_in):
    env, _ = stand_in
    env["OSVMM_CACHE"] = str(tmp_path / "empty")
    assert_one_line(run_rig("run", "--", "true", env=env), 125, "no L1 kernel")


# -- the pieces -------------------------------------------------------------


def test_initramfs_modules_load_dependencies_first(tmp_path):
    moddir = make_cache(tmp_path) / "kernel" / "6.1.0-99" / "modules" / "lib" / "modules" / KVER
    order = [Path(p).stem for p in rig.load_order(moddir, rig.INITRAMFS_MODULES)]
    for module, deps in [
        ("virtio_pci", ["virtio_ring", "virtio", "virtio_pci_modern_dev"]),
        ("9pnet_virtio", ["virtio", "9pnet"]),
        ("9p", ["9pnet", "netfs", "fscache"]),
        ("fscache", ["netfs"]),
    ]:
        for dep in deps:
            assert order.index(dep) < order.index(module), order
    assert len(order) == len(set(order))
    assert "overlay" not in order  # built in here
    with pytest.raises(rig.RigError, match="not in"):
        rig.load_order(moddir, ("nosuchmodule",))


def test_job_script_keeps_words_and_environment(tmp_path):
    argv = ["sh", "-c", 'printf "%s|" "$@" "$X" "$PWD"', "sh", "a b", "it's", "$HOME", "*"]
    script = rig.job_script(argv, str(tmp_path), {"X": "y 'z'\nw"})
    sh = shutil.which("busybox") or "sh"
    args = [sh, "sh"] if sh.endswith("busybox") else [sh]
    r = subprocess.run([*args, "-c", script], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"a b|it's|$HOME|*|y 'z'\nw|{tmp_path}|"


def test_l1_environment_passes_paths_and_marks_the_rig(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/x")
    monkeypatch.setenv("OSVMM_CACHE", "/c")
    monkeypatch.setenv("SECRET_THING", "no")
    monkeypatch.setenv("EXTRA", "yes")
    env = rig.l1_environment(["EXTRA", "SET=1"])
    assert env["PYTHONPATH"] == "/x" and env["OSVMM_CACHE"] == "/c"
    assert env["PATH"] == os.environ["PATH"] and env["HOME"] == os.environ["HOME"]
    assert env["EXTRA"] == "yes" and env["SET"] == "1"
    assert env["OSVMM_RIG"] == "1"
    assert "SECRET_THING" not in env


@pytest.mark.parametrize("name", ["l1-init", "l1-stage2"])
def test_l1_scripts_parse(name):
    sh = shutil.which("busybox")
    if sh is None:
        pytest.skip("no busybox")
    r = subprocess.run([sh, "sh", "-n", str(REPO / "scripts" / "rig" / name)], capture_output=True)
    assert r.returncode == 0, r.stderr


# -- a run against the stand-in QEMU ----------------------------------------


def test_run_streams_output_and_returns_the_command_status(stand_in):
    env, cache = stand_in
    env["FAKE_L1"] = "status"
    r = run_rig("run", "--", "true", env=env)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "out line\n"
    assert r.stderr == "err line\n"
    assert len(list((cache / "rig").glob("l1-initrd-*.cpio"))) == 1


def test_run_reports_missing_kvm_inside_l1(stand_in):
    env, _ = stand_in
    env["FAKE_L1"] = "nokvm"
    assert_one_line(run_rig("run", "--", "true", env=env), 125, "inside L1", "no svm")


def test_run_reports_l1_dying_without_a_status(stand_in):
    env, _ = stand_in
    env["FAKE_L1"] = "crash"
    r = run_rig("run", "--", "true", env=env)
    assert r.returncode == 125
    first = r.stderr.splitlines()[0]
    assert "L1 stopped without a status" in first and "could not load kernel" in first


def test_run_times_out_and_kills_qemu(stand_in):
    env, _ = stand_in
    env["FAKE_L1"] = "hang"
    r = run_rig("run", "--timeout", "1.5", "--", "true", env=env, timeout=30)
    assert r.returncode == 124 and "Traceback" not in r.stderr
    first, *console = r.stderr.splitlines()
    for f in ("hwvirt-rig: timed out after 1.5 s", "before the command started", "QEMU killed"):
        assert f in first, (f, first)
    # Then L1's console, where a hung kernel says why (soft lockups, hung tasks).
    assert console == ["  | watchdog: BUG: soft lockup - CPU#0 stuck for 22s!"], r.stderr


def test_an_l1_frozen_on_its_way_up_is_booted_again(stand_in, tmp_path):
    env, _ = stand_in
    env["FAKE_L1"] = "hang-once"
    env["FAKE_BOOTS"] = str(tmp_path / "boots")
    r = run_rig("run", "--start-timeout", "1", "--", "true", env=env, timeout=60)
    assert r.returncode == 3, r.stderr  # the second boot's command status
    assert (tmp_path / "boots").read_text() == "2"
    assert "L1 did not start the command within 1 s" in r.stderr
    assert "soft lockup" in r.stderr  # the frozen boot's console, shown
    assert r.stdout == "out line\n"


def test_a_run_boots_l1_at_most_three_times(stand_in, tmp_path):
    env, _ = stand_in
    env["FAKE_L1"] = "hang"
    r = run_rig("run", "--start-timeout", "1", "--timeout", "20", "--", "true", env=env, timeout=60)
    assert r.returncode == 124 and "Traceback" not in r.stderr
    assert r.stderr.count("did not start the command within 1 s") == 2  # boots 1 and 2
    assert "timed out after 20 s (before the command started)" in r.stderr  # the third


def test_initramfs_is_rebuilt_when_an_input_changes(stand_in):
    env, cache = stand_in
    env["FAKE_L1"] = "status"
    assert run_rig("run", "--", "true", env=env).returncode == 3
    (first,) = (cache / "rig").glob("l1-initrd-*.cpio")
    ko = next((cache / "kernel").rglob("9p.ko"))
    ko.write_bytes(b"a rebuilt module")
    assert run_rig("run", "--", "true", env=env).returncode == 3
    (second,) = (cache / "rig").glob("l1-initrd-*.cpio")
    assert second != first


def alive(pid: int) -> bool:
    """True while pid runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_for(predicate, seconds: float = 20) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_qemu_does_not_outlive_the_rig(tmp_path, stand_in, sig, status):
    env, _ = stand_in
    env["FAKE_L1"] = "hang"
    env["FAKE_PIDFILE"] = str(tmp_path / "qemu.pid")
    p = subprocess.Popen(
        [sys.executable, str(SCRIPT), "run", "--", "true"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        pidfile = tmp_path / "qemu.pid"
        assert wait_for(lambda: pidfile.exists() and pidfile.read_text() != "")
        qemu = int(pidfile.read_text())
        p.send_signal(sig)
        assert p.wait(20) == status
        assert wait_for(lambda: not alive(qemu)), "QEMU outlived the rig"
    finally:
        p.kill()
        p.communicate()
