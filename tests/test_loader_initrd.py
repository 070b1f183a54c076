"""Initrd placement: highest page-aligned address that fits, clear of the kernel."""

from __future__ import annotations

import pytest

from osvmm.errors import ImageError
from osvmm.loader.initrd import place_initrd

MiB = 1 << 20


def test_top_of_ram_page_aligned():
    assert place_initrd(256 * MiB, 4096, 0x7FFFFFFF, 32 * MiB) == 256 * MiB - 4096
    assert place_initrd(256 * MiB, 5000, 0x7FFFFFFF, 32 * MiB) == 256 * MiB - 8192


def test_initrd_addr_max_is_inclusive():
    # The last byte may sit at initrd_addr_max itself.
    addr = place_initrd(4096 * MiB, 4096, 0x7FFFFFFF, 32 * MiB)
    assert addr == 0x80000000 - 4096
    assert addr + 4096 - 1 == 0x7FFFFFFF


def test_capped_below_mmio_hole():
    assert place_initrd(8192 * MiB, 4096, 0xFFFFFFFF, 32 * MiB) == 0xC0000000 - 4096


def test_exact_fit_against_kernel_end():
    # 1 MiB of room between a page-aligned kernel end and the top.
    assert place_initrd(34 * MiB, MiB, 0x7FFFFFFF, 33 * MiB) == 33 * MiB
    # A kernel end inside a page rounds up to the next page.
    with pytest.raises(ImageError, match="does not fit"):
        place_initrd(34 * MiB, MiB, 0x7FFFFFFF, 33 * MiB + 1)


def test_too_big():
    with pytest.raises(ImageError, match=r"initrd of 64\.0 MiB does not fit .* \(32\.0 MiB free\)"):
        place_initrd(64 * MiB, 64 * MiB, 0x7FFFFFFF, 32 * MiB)
    with pytest.raises(ImageError, match="0.0 MiB free"):
        place_initrd(16 * MiB, 4096, 0x7FFFFFFF, 32 * MiB)


def test_empty_initrd():
    with pytest.raises(ImageError, match="empty"):
        place_initrd(64 * MiB, 0, 0x7FFFFFFF, 32 * MiB)
