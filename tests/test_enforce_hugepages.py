"""Huge pages where they pay: with ``hugepages = "auto"`` (a plan's default) a large
partition's RAM is advised for transparent huge pages and gets them, a small
partition's is not (each 2 MiB it touched would become a whole huge page).
Read back from /proc/self/smaps (needs /dev/kvm and THP in madvise or always mode)."""

from __future__ import annotations

import os

import pytest

from osvmm.arch.x86.layout import HUGEPAGE_MIN_RANGE, MiB
from osvmm.guests.build import guest_path
from osvmm.machine import Machine
from osvmm.vmm.enforce import mapping_flags, thp_mode
from osvmm.vmm.partition import Partition, PartitionConfig

pytestmark = pytest.mark.kvm


@pytest.fixture(autouse=True)
def needs_thp():
    if thp_mode() == "never":
        pytest.skip("THP is disabled on this host (transparent_hugepage: never)")


def built(memory: int, hugepages) -> Partition:
    cfg = PartitionConfig(
        Machine.build(memory, 1), image=str(guest_path("hello")), hugepages=hugepages
    )
    return Partition(cfg).build()


def test_auto_advises_a_large_partition_and_it_gets_huge_pages():
    part = built(2 * HUGEPAGE_MIN_RANGE, None)
    try:
        region = part.memory.regions[0]
        for off in range(32 * MiB, 64 * MiB, 2 * MiB):  # touch whole 2 MiB ranges
            part.write_guest(off, b"\1" * (2 * MiB))
        flags = mapping_flags(os.getpid(), region.host_addr)
        assert "hg" in flags["vmflags"]
        # Anonymous memory where only it gets huge pages here, else a memfd's.
        assert flags["anon_huge_kb"] + flags.get("shmem_huge_kb", 0) >= 2048, flags
    finally:
        part.close()


def test_auto_leaves_a_small_partition_in_4k_pages():
    part = built(16 * MiB, None)
    try:
        region = part.memory.regions[0]
        part.write_guest(4 * MiB, b"\1" * 4096)
        flags = mapping_flags(os.getpid(), region.host_addr)
        assert "hg" not in flags["vmflags"]
        assert flags["rss_kb"] < 2048  # the 2 MiB range holding that page was not filled
    finally:
        part.close()


def test_true_advises_even_a_small_partition():
    part = built(16 * MiB, True)
    try:
        flags = mapping_flags(os.getpid(), part.memory.regions[0].host_addr)
        assert "hg" in flags["vmflags"]
    finally:
        part.close()
