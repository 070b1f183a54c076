"""Files the VMM writes on the host: private directories, logs that follow no
symbolic link and are created 0600, log rotation, write failures counted and
reported, lock files, the ps lines of what was lost (no /dev/kvm)."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import stat
import time

import pytest

from osvmm.errors import ConfigError
from osvmm.up.consoles import ConsoleClient, ConsoleHub, LogFile, Spool
from osvmm.up.hostfiles import open_private, private_dir
from osvmm.up.locks import Held, LockFile, holder

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def test_a_directory_is_created_0700_and_files_0600(tmp_path):
    d = tmp_path / "logs" / "deeper"
    fd = private_dir(str(d), "log_dir")
    try:
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        f = open_private(fd, "x.log", "log_dir")
        os.close(f)
        assert stat.S_IMODE(os.stat(d / "x.log").st_mode) == 0o600
        (d / "old.log").write_text("")
        os.chmod(d / "old.log", 0o666)  # as an older osvmm left it: narrowed
        os.close(open_private(fd, "old.log", "log_dir"))
        assert stat.S_IMODE(os.stat(d / "old.log").st_mode) == 0o600
        (d / "group.log").write_text("")
        os.chmod(d / "group.log", 0o640)  # at most 0640 is left alone
        os.close(open_private(fd, "group.log", "log_dir"))
        assert stat.S_IMODE(os.stat(d / "group.log").st_mode) == 0o640
    finally:
        os.close(fd)


def test_a_log_never_follows_a_symbolic_link(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep\n")
    d = tmp_path / "logs"
    d.mkdir(mode=0o700)
    (d / "web.console.log").symlink_to(target)
    fd = private_dir(str(d), "log_dir")
    try:
        with pytest.raises(ConfigError, match="^log_dir: cannot open web.console.log: a symbolic"):
            LogFile(fd, "web.console.log", str(d / "web.console.log"), 1 << 20)
        os.link(target, d / "hard.log")
        with pytest.raises(ConfigError, match="^log_dir: hard.log has 2 hard links: not written"):
            open_private(fd, "hard.log", "log_dir")
        os.mkfifo(d / "fifo.log")
        with pytest.raises(ConfigError, match="^log_dir: cannot open fifo.log"):
            open_private(fd, "fifo.log", "log_dir")
    finally:
        os.close(fd)
    assert target.read_text() == "keep\n"


def test_a_directory_others_can_write_is_refused(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(
        ConfigError, match=r"^log_dir: .*/shared is writable by other users \(mode 0777\)"
    ):
        private_dir(str(d), "log_dir")
    os.chmod(d, 0o1777)  # sticky or not: another user could plant names in it first
    with pytest.raises(ConfigError, match="is writable by other users"):
        private_dir(str(d), "control_socket")


@as_root
def test_a_directory_or_link_of_another_user_is_refused(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"^log_dir: .*/theirs belongs to uid {NOBODY}"):
        private_dir(str(d), "log_dir")
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(mine)
    os.chown(link, NOBODY, NOBODY, follow_symlinks=False)
    with pytest.raises(ConfigError, match=f"is a symbolic link of uid {NOBODY}: not followed"):
        private_dir(str(link / "logs"), "log_dir")
    fd = private_dir(str(mine), "log_dir")
    try:
        (mine / "planted.log").write_text("")
        os.chown(mine / "planted.log", NOBODY, NOBODY)
        with pytest.raises(ConfigError, match=f"planted.log belongs to uid {NOBODY}"):
            open_private(fd, "planted.log", "log_dir")
    finally:
        os.close(fd)


def test_a_log_rotates_at_its_cap(tmp_path):
    fd = private_dir(str(tmp_path / "logs"), "log_dir")
    try:
        log = LogFile(fd, "a.log", str(tmp_path / "logs" / "a.log"), 4096)
        for i in range(100):
            log.write(b"%03d " % i + b"x" * 95 + b"\n")  # 10000 bytes
        log.close()
    finally:
        os.close(fd)
    cur = (tmp_path / "logs" / "a.log").read_bytes()
    old = (tmp_path / "logs" / "a.log.1").read_bytes()
    assert len(cur) <= 4096 and len(old) == 4096
    assert (old + cur).endswith(b"099 " + b"x" * 95 + b"\n")
    assert sorted(os.listdir(tmp_path / "logs")) == ["a.log", "a.log.1"]


def test_a_failing_sink_loses_bytes_counted_and_says_so_once():
    reports, fail = [], [True]

    def write(data: bytes) -> None:
        if fail[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    spool = Spool("disk", write, 1 << 20, reports.append)
    for _ in range(3):
        spool.put(b"12345")
        spool.flush()
    assert (spool.lost, spool.error) == (15, "No space left on device")
    assert reports == ["disk: cannot write (No space left on device): output is being lost"]
    fail[0] = False
    spool.put(b"ok")
    spool.flush()
    assert spool.error == "" and reports[-1] == "disk: written again (15 bytes lost)"
    spool.close()


def test_a_slow_sink_never_blocks_the_writer():
    gate = []

    def stuck(data: bytes) -> None:
        while not gate:
            time.sleep(0.01)

    spool = Spool("stuck", stuck, 4096)
    hub_start = time.monotonic()
    for _ in range(100_000):
        spool.put(b"x")
    assert time.monotonic() - hub_start < 5
    assert spool.dropped >= 100_000 - 2 * 4096  # one batch taken by the writer, one waiting
    gate.append(1)
    spool.close()


def test_console_log_of_a_hub_is_written_by_its_own_thread(tmp_path):
    fd = private_dir(str(tmp_path / "logs"), "log_dir")
    log = LogFile(fd, "a.console.log", str(tmp_path / "logs" / "a.console.log"), 1 << 20)
    hub = ConsoleHub("a", log, None)
    for b in b"hello\n":
        hub.write(bytes([b]))
    hub.note("ended: test")
    hub.flush()
    assert (tmp_path / "logs" / "a.console.log").read_bytes() == b"hello\n[osvmm: ended: test]\n"
    assert hub.losses() == {"log": 0, "log_error": "", "clients": 0}
    hub.close()
    os.close(fd)


def _direct_client() -> tuple[ConsoleClient, socket.socket, socket.socket]:
    """A console client writing straight into one end of a socket pair whose buffer
    is small, as the control server sets it up (a socket with a timeout)."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.settimeout(0.25)
    client = ConsoleClient()
    client.direct = lambda data: os.write(ours.fileno(), data)
    return client, ours, theirs


def test_console_bytes_that_find_nothing_waiting_go_straight_to_the_socket():
    client, ours, theirs = _direct_client()
    assert client.push(b"hello") == 0
    assert theirs.recv(100) == b"hello"
    assert client.take(0.01) == b""  # nothing was left for the drain thread
    ours.close()
    theirs.close()


def test_a_console_socket_that_is_full_never_blocks_and_keeps_the_order():
    client, ours, theirs = _direct_client()
    sent = bytearray()
    start = time.monotonic()
    for i in range(2000):  # far beyond what the socket holds: nobody reads it
        chunk = b"%05d" % i
        client.push(chunk)
        sent += chunk
    assert time.monotonic() - start < 2  # the writer (a vCPU) was never held up
    waiting = client.take(0.01)
    assert waiting  # what the socket did not take waits for the drain thread
    # While those are held, later bytes queue behind them, never overtake them.
    client.push(b"LAST!")
    assert client.take(0.01) == b"LAST!"
    received = bytearray()
    theirs.setblocking(False)
    while True:
        try:
            received += theirs.recv(65536)
        except BlockingIOError:
            break
    assert bytes(received) + waiting == bytes(sent)
    client.taken()
    assert client.push(b"more") == 0 and theirs.recv(100) == b"more"
    ours.close()
    theirs.close()


def test_a_console_socket_that_failed_hands_its_bytes_to_the_drain_thread():
    client, ours, theirs = _direct_client()
    theirs.close()
    client.push(b"lost?")  # EPIPE: not raised to the vCPU, kept for the drain thread
    assert client.direct is None and client.take(0.01) == b"lost?"
    ours.close()


def test_a_lock_is_held_by_one_process_and_dies_with_it(tmp_path):
    fd = private_dir(str(tmp_path), "run directory")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            LockFile.acquire(fd, "x.lock", "run directory")
            os.write(w, b"1")
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        assert os.read(r, 1) == b"1"
        with pytest.raises(Held) as held:
            LockFile.acquire(fd, "x.lock", "run directory")
        assert held.value.pid == pid and holder(str(tmp_path / "x.lock")) == pid
        os.kill(pid, signal.SIGSTOP)  # stalled: still held
        with pytest.raises(Held):
            LockFile.acquire(fd, "x.lock", "run directory")
        os.kill(pid, signal.SIGKILL)  # dead however it died: free
        os.waitpid(pid, 0)
        assert holder(str(tmp_path / "x.lock")) is None
        lock = LockFile.acquire(fd, "x.lock", "run directory")
        assert holder(str(tmp_path / "x.lock")) == os.getpid()
        lock.release()
        assert not (tmp_path / "x.lock").exists()
    finally:
        os.close(fd)
        os.close(r)
        os.close(w)


def test_an_echo_nobody_reads_drops_lines_counted_and_never_blocks():
    from osvmm.up.consoles import ECHO_SPOOL, LineEcho, fd_sink

    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ: full after a few lines
    reports = []
    spool = Spool("stdout", fd_sink(w), ECHO_SPOOL, reports.append)
    hub = ConsoleHub("a", None, LineEcho(spool))
    line = b"a line of console output\n"
    t = time.monotonic()
    for _ in range(2 * ECHO_SPOOL // len(line)):
        hub.write(line)
    assert time.monotonic() - t < 10
    assert hub._echo.dropped("a") > 0 and spool.dropped == hub._echo.dropped("a")
    assert reports == ["stdout: the reader is slow: output is being dropped (see osvmm ps)"]
    os.close(r)  # the reader goes away: the writer fails, counts, and says so
    spool.close(timeout=5)
    os.close(w)


def test_a_line_without_newline_is_bounded_and_cheap():
    from osvmm.up.consoles import MAX_ECHO_LINE, LineEcho

    out = []
    spool = Spool("stdout", out.append, 1 << 30)
    echo = LineEcho(spool)
    t = time.monotonic()
    for _ in range(100_000):  # one byte per guest exit, no newline ever
        echo("a", b"x")
        echo("b", b"y\n")
    assert time.monotonic() - t < 20  # was quadratic: minutes, and slowed "b" alike
    assert len(echo._partial["a"].buf) < MAX_ECHO_LINE
    spool.flush()
    text = b"".join(out)
    assert text.count(b"a | " + b"x" * MAX_ECHO_LINE + b"\n") == 100_000 // MAX_ECHO_LINE
    assert text.count(b"b | y\n") == 100_000
    spool.close()


def test_ps_says_which_outputs_lost_bytes():
    from osvmm.up.tables import format_ps

    row = {
        "name": "counter",
        "state": "running",
        "cpus": "1",
        "pool": "0",
        "vcpus": 1,
        "node": 0,
        "memory": 8 << 20,
        "boots": 1,
        "restarts": 0,
        "uptime_s": 1.0,
        "reason": "",
    }
    quiet = dict(row, name="hello", console_lost={"stdout": 0, "log": 0, "clients": 0})
    lost = dict(row, console_lost={"stdout": 120, "log": 4096, "log_error": "No space left"})
    text = format_ps(
        [lost, quiet], {"stderr": {"missing": 7, "error": "Broken pipe"}, "osvmm.log": {}}
    )
    assert text.splitlines()[3:] == [
        "counter: console bytes lost: stdout 120, log 4096, log error: No space left",
        "osvmm: stderr: 7 bytes lost (Broken pipe)",
    ]


def test_a_bug_behind_a_lifecycle_hypercall_is_logged_not_a_dead_thread(tmp_path):
    from types import SimpleNamespace

    from osvmm.hypercall.abi import ControlOp
    from osvmm.plan.config import parse_plan
    from osvmm.plan.placement import place
    from osvmm.plan.topology import read_topology
    from osvmm.up.hypercalls import serve_supervisor
    from osvmm.up.partition_config import machine_of

    plan = parse_plan(
        f'[vmm]\ncontrol_socket = "{tmp_path}/s"\n[[partition]]\nname = "a"\n'
        'cpus = "floating"\nmemory = "4M"\nimage = "guests:hello"\n',
        tmp_path,
    )
    assignment = place(plan, read_topology())
    logged = []

    def broken(name, wait=True):
        raise KeyError(name)

    sup = SimpleNamespace(
        plan=plan,
        partitions={
            "a": SimpleNamespace(
                name="a", index=0, machine=machine_of(assignment, assignment.partitions[0])
            )
        },
        stop=broken,
        start=broken,
        restart=broken,
        log=logged.append,
        on_build=[],
        on_ready=[],
        on_end=[],
    )
    live = serve_supervisor(sup)
    try:
        live.lifecycle(0, ControlOp.STOP)  # what the hc-lifecycle thread runs
    finally:
        live.close()
    assert logged[0] == "a: internal error in the VMM (hypercall STOP on a): KeyError: 'a'"
    assert logged[1].startswith("Traceback")
