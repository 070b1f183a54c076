"""Host-wide claims of a VMM process, as lock files the kernel releases when the
process dies, however it dies (``flock``).

- ``LockFile.acquire(dir_fd, name)``: an exclusive lock held until ``release``
  or the process ends; another process finds it held and reads the holder's
  pid in the file. ``osvmm up`` holds one beside its control socket
  (``PATH.lock``): a second VMM on the same socket is refused while the first
  lives, however stalled it is, and a dead one's socket is taken over.
- ``reserve_cpus(cpus)``: one lock per dedicated host CPU, ``cpu<N>.lock`` in
  ``<run dir>/cpus``; ``others_cpus()`` the CPUs other VMMs hold, which a
  floating partition (and ``osvmm run``) keeps off.

The run directory is the default control socket's (``/run/osvmm`` for root,
``$XDG_RUNTIME_DIR/osvmm`` or ``/tmp/osvmm-<uid>`` for another user), only its
owner can write it (osvmm/up/hostfiles.py). docs/security.md says what this
does and does not guard.
"""

from __future__ import annotations

import errno
import fcntl
import os

from osvmm.errors import ConfigError, EnforceError
from osvmm.up.hostfiles import open_private, private_dir


def run_dir() -> str:
    from osvmm.plan.paths import default_control_socket

    return os.path.dirname(default_control_socket())


class Held(Exception):
    """The lock is another live process's; ``pid`` is what it wrote (0 if unread)."""

    def __init__(self, pid: int):
        self.pid = pid
        super().__init__(pid)


def _read_pid(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode("ascii", "replace").strip() or 0)
    except (OSError, ValueError):
        return 0


class LockFile:
    """An flock'ed file named ``name`` in the directory ``dir_fd``, holding our pid."""

    def __init__(self, dir_fd: int, name: str, fd: int):
        self.dir_fd = dir_fd
        self.name = name
        self.fd: int | None = fd

    @classmethod
    def acquire(cls, dir_fd: int, name: str, what: str) -> LockFile:
        """The lock, or Held(pid of the holder). The file may be removed by a holder
        releasing it between our open and our lock: then it is opened again."""
        while True:
            fd = open_private(dir_fd, name, what, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                pid = _read_pid(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise Held(pid) from None
                raise ConfigError(f"{what}: cannot lock {name}: {e.strerror}") from None
            try:
                same = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = None
            if same != os.fstat(fd).st_ino:  # released and removed meanwhile: again
                os.close(fd)
                continue
            try:  # the pid is for people; the lock is what counts (a full disk keeps it)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass
            return cls(dir_fd, name, fd)

    def release(self) -> None:
        """Remove the file (while still holding it), then let go."""
        if self.fd is None:
            return
        try:
            os.unlink(self.name, dir_fd=self.dir_fd)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def holder(path: str) -> int | None:
    """The pid holding the lock file ``path`` (0 if it wrote none), or None when no
    live process holds it. Opens nothing for writing and creates nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError:
        return _read_pid(fd)
    finally:
        os.close(fd)


# -- dedicated CPUs ---------------------------------------------------------------------------


def cpus_dir() -> str:
    return os.path.join(run_dir(), "cpus")


class CpuReservation:
    """The dedicated CPUs of this VMM, held until ``release`` or its end."""

    def __init__(self, dir_fd: int, locks: list[LockFile]):
        self._dir_fd = dir_fd
        self._locks = locks
        self.cpus = tuple(int(lock.name[3:-5]) for lock in locks)

    def release_cpus(self, cpus) -> None:
        """Release the locks of ``cpus`` only (a partition destroyed at run time)."""
        gone = set(cpus)
        for lock in self._locks:
            if int(lock.name[3:-5]) in gone:
                lock.release()
        self._locks = [lock for lock in self._locks if int(lock.name[3:-5]) not in gone]
        self.cpus = tuple(c for c in self.cpus if c not in gone)

    def release(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks = []
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


def reserve_cpus(cpus, who: str = "") -> CpuReservation:
    """Hold every CPU of ``cpus`` for this process, or none: EnforceError naming the
    first CPU another VMM holds, and its pid."""
    dir_fd = private_dir(cpus_dir(), "run directory")
    taken: list[LockFile] = []
    try:
        for cpu in sorted(set(cpus)):
            try:
                taken.append(LockFile.acquire(dir_fd, f"cpu{cpu}.lock", "run directory"))
            except Held as held:
                pid = f"pid {held.pid}" if held.pid else "a process"
                raise EnforceError(
                    f"{who}CPU {cpu} is dedicated to another VMM ({pid}, {cpus_dir()})"
                ) from None
    except BaseException:
        for lock in taken:
            lock.release()
        os.close(dir_fd)
        raise
    return CpuReservation(dir_fd, taken)


def others_cpus(mine=()) -> dict[int, int]:
    """CPU -> pid of the VMM that holds it, for the CPUs other live VMMs dedicate."""
    d = cpus_dir()
    try:
        names = os.listdir(d)
    except OSError:
        return {}
    held = {}
    for name in names:
        if not (name.startswith("cpu") and name.endswith(".lock") and name[3:-5].isdigit()):
            continue
        cpu = int(name[3:-5])
        if cpu in mine:
            continue
        pid = holder(os.path.join(d, name))
        if pid is not None and pid != os.getpid():
            held[cpu] = pid
    return held


def free_cpus(candidates, what: str) -> tuple[int, ...]:
    """``candidates`` less the CPUs other VMMs dedicate; EnforceError if none is left."""
    held = others_cpus()
    free = tuple(c for c in candidates if c not in held)
    if not free:
        from osvmm.plan.config import format_cpu_list  # the plan's parser: off `osvmm run`'s path

        taken = ", ".join(f"CPU {c}: pid {held[c]}" for c in sorted(held) if c in candidates)
        raise EnforceError(
            f"{what}: every CPU ({format_cpu_list(list(candidates))}) is dedicated to "
            f"another VMM ({taken})"
        )
    return free
