"""Enforcement: make the host give a partition what its plan assigned.

Each function does one thing to the host and raises an OsvmmError, or returns
a short note of what it did, for ``Partition.enforcement``:

- ``pin_thread(cpus)``: the calling thread may run only on ``cpus``
  (sched_setaffinity). A vCPU thread of a partition with dedicated CPUs is
  pinned to its one CPU; a floating vCPU to the pool of CPUs nobody owns.
- ``bind_memory(addr, size, node)``: mbind(2) MPOL_BIND to one NUMA node,
  with MPOL_MF_MOVE for pages already there. Always MPOL_BIND, also on a
  one-node host (where it cannot fail for memory that exists): a partition's
  memory is its own node's or nothing; falling back to MPOL_PREFERRED would
  hide a wrong plan. Only a kernel built without NUMA (ENOSYS) skips it,
  with a note.
- ``advise_huge(mem, ...)``: madvise(MADV_HUGEPAGE) when the host's THP mode
  is ``madvise`` or ``always`` (under ``always`` it is implied but harmless);
  under ``never`` nothing, with a note. Shared memory (a memfd, what guest RAM
  is by default) has a THP mode of its own (``shmem_thp_mode``);
  ``ram_backing(want_huge)`` picks anonymous memory where only it gets huge
  pages.
- ``prefault(mem)``: MADV_POPULATE_WRITE (Linux 5.14+), else one write per page.
- ``lock(addr, size)``: mlock(2), so the memory is never swapped out.
- ``disable_exits(vm)``: KVM_CAP_X86_DISABLE_EXITS with HLT|PAUSE, before
  any vCPU exists; a halted or spinning guest then keeps its dedicated core
  instead of exiting to KVM. Only for dedicated cores: on shared ones a guest
  spinning in PAUSE or idling in HLT would keep the CPU from the others.

What was applied is checked from /proc by the tests (``thread_affinity``,
``mapping_flags``), not from these notes.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os

from osvmm.arch.x86.layout import PAGE_SIZE
from osvmm.errors import ConfigError, EnforceError
from osvmm.kvm.ioctls import KVM_X86_DISABLE_EXITS_HLT, KVM_X86_DISABLE_EXITS_PAUSE

SYS_mbind = 237  # x86_64
MPOL_PREFERRED = 1
MPOL_BIND = 2
MPOL_MF_MOVE = 1 << 1
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23
PR_SET_NAME = 15

THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
THP_SHMEM_ENABLED = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
SHMEM_THP_OFF = ("never", "deny")  # shmem_enabled modes under which no memfd gets huge pages

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong)


# -- CPUs ------------------------------------------------------------------------------------


def pin_thread(cpus: set[int] | frozenset[int] | tuple[int, ...]) -> None:
    """Allow the calling thread to run only on ``cpus``."""
    try:
        os.sched_setaffinity(0, set(cpus))
    except OSError as e:
        raise EnforceError(f"cannot pin a vCPU thread to CPUs {sorted(cpus)}: {e.strerror}") from e


def name_thread(name: str) -> None:
    """Set the calling thread's name (its /proc/<pid>/task/<tid>/comm, 15 bytes)."""
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0)


def thread_name(partition: str, vcpu: int) -> str:
    """The comm of a vCPU thread: ``<partition>/<n>``, the name cut to fit 15 bytes."""
    suffix = f"/{vcpu}"
    return partition[: 15 - len(suffix)] + suffix


def thread_affinity(pid: int, tid: int) -> list[int]:
    """The CPUs a thread may run on, from /proc/<pid>/task/<tid>/status (Cpus_allowed_list)."""
    from osvmm.plan.config import parse_cpu_list

    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return parse_cpu_list(line.split(":", 1)[1])
    raise EnforceError(f"no Cpus_allowed_list for thread {tid} of process {pid}")


# -- memory ----------------------------------------------------------------------------------


def bind_memory(addr: int, size: int, node: int) -> str:
    """mbind(addr, size, MPOL_BIND, {node}, MPOL_MF_MOVE); returns a note."""
    nbits = max(64, node + 1)
    mask = (ctypes.c_ulong * ((nbits + 63) // 64))()
    mask[node // 64] = 1 << (node % 64)
    ret = _libc.syscall(
        ctypes.c_long(SYS_mbind),
        ctypes.c_void_p(addr),
        ctypes.c_ulong(size),
        ctypes.c_int(MPOL_BIND),
        mask,
        ctypes.c_ulong(nbits + 1),  # maxnode: the kernel reads maxnode - 1 bits
        ctypes.c_uint(MPOL_MF_MOVE),
    )
    if ret == 0:
        return f"memory bound to node {node}"
    err = ctypes.get_errno()
    if err == _errno.ENOSYS:
        return "memory policy not set: this kernel has no NUMA support"
    if err == _errno.EINVAL:
        raise ConfigError(f"node: NUMA node {node} cannot hold memory on this host (mbind EINVAL)")
    raise EnforceError(f"mbind to node {node} failed: {os.strerror(err)}")


def thp_mode(path: str = THP_ENABLED) -> str:
    """The host's THP mode: ``always``, ``madvise`` or ``never`` (``never`` if unknown)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return "never"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "never"


def shmem_thp_mode(path: str = THP_SHMEM_ENABLED) -> str:
    """The host's THP mode for shared memory (memfd, tmpfs): ``always``,
    ``within_size``, ``advise``, ``never``, ``deny`` or ``force`` (``never`` if unknown)."""
    return thp_mode(path)


def ram_backing(want_huge: bool) -> str:
    """What backs a RAM region (vmm/memory.py): a memfd, which another process can
    map, unless huge pages are wanted and this host gives them to anonymous memory
    only (shmem_enabled ``never`` or ``deny``, THP ``madvise`` or ``always``)."""
    if want_huge and shmem_thp_mode() in SHMEM_THP_OFF and thp_mode() != "never":
        return "anonymous"
    return "memfd"


def advise_huge(mem: mmap.mmap, mode: str | None = None, shared: bool = False) -> str:
    """madvise(MADV_HUGEPAGE) when THP is ``madvise`` or ``always``; returns a note.
    ``shared``: ``mem`` is a memfd mapping, under the shared-memory THP mode."""
    if mode is None:
        mode = shmem_thp_mode() if shared else thp_mode()
    what = "shmem THP" if shared else "THP"
    if mode in SHMEM_THP_OFF:
        return f"4K pages: transparent huge pages are disabled on this host ({what} {mode})"
    try:
        mem.madvise(MADV_HUGEPAGE)
    except OSError as e:
        return f"4K pages: madvise(MADV_HUGEPAGE) failed: {e.strerror}"
    return f"transparent huge pages ({what} {mode})"


def prefault(mem: mmap.mmap) -> str:
    """Populate every page of ``mem`` writable now; returns a note."""
    try:
        mem.madvise(MADV_POPULATE_WRITE)
        return "prefaulted (MADV_POPULATE_WRITE)"
    except OSError:
        pass
    view = memoryview(mem)
    for off in range(0, len(mem), PAGE_SIZE):
        view[off] = view[off]  # a write fault per page; the content is unchanged
    view.release()
    return "prefaulted (one write per page)"


def lock(addr: int, size: int) -> str:
    """mlock(2) the range; returns a note. EPERM/ENOMEM is an EnforceError (RLIMIT_MEMLOCK)."""
    if _libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(size)) != 0:
        err = ctypes.get_errno()
        raise EnforceError(
            f"mlock of {size >> 10} KiB of guest memory failed: {os.strerror(err)} "
            "(raise RLIMIT_MEMLOCK: ulimit -l)"
        )
    return "locked (mlock)"


def mapping_flags(pid: int, addr: int) -> dict[str, object]:
    """What /proc says about the mapping of ``pid`` that holds ``addr`` (adjacent
    mappings alike in every flag are one VMA to the kernel): ``start``, ``end``,
    ``policy`` (numa_maps, e.g. ``bind:0``), ``vmflags`` (smaps VmFlags: ``hg`` =
    MADV_HUGEPAGE, ``lo`` = locked), ``rss_kb``, ``anon_huge_kb``, ``shmem_huge_kb``
    (huge pages of a memfd mapping), ``locked_kb``."""
    out: dict[str, object] = {}
    with open(f"/proc/{pid}/smaps") as f:
        inside = False
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                if inside:
                    break
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
                if inside:
                    out.update(start=lo, end=hi)
                continue
            if not inside:
                continue
            name, _, value = line.partition(":")
            if name == "VmFlags":
                out["vmflags"] = value.split()
            elif name == "Rss":
                out["rss_kb"] = int(value.split()[0])
            elif name == "AnonHugePages":
                out["anon_huge_kb"] = int(value.split()[0])
            elif name == "ShmemPmdMapped":
                out["shmem_huge_kb"] = int(value.split()[0])
            elif name == "Locked":
                out["locked_kb"] = int(value.split()[0])
    if not out:
        raise EnforceError(f"process {pid} has no mapping at {addr:#x}")
    key = f"{out['start']:x}"
    with open(f"/proc/{pid}/numa_maps") as f:
        for line in f:
            words = line.split()
            if words and words[0] == key:
                out["policy"] = words[1]
                break
    return out


# -- KVM -------------------------------------------------------------------------------------


def disable_exits(vm) -> str:
    """Disable HLT and PAUSE exits on ``vm`` (before its vCPUs are created)."""
    wanted = KVM_X86_DISABLE_EXITS_HLT | KVM_X86_DISABLE_EXITS_PAUSE
    offered = vm.disable_exits(wanted)
    if offered & wanted != wanted:
        return f"HLT/PAUSE exits kept: KVM offers only {offered:#x}"
    return "HLT and PAUSE exits disabled"
