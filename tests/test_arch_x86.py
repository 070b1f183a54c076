"""x86 CPU setup builders: boot GDT, identity page tables, entry register state, CPUID.

The GDT is compared with golden bytes written by hand from the Intel SDM
(tests/golden/arch/boot_gdt.bin); the page tables are decoded by a walker
written here from the SDM's 4-level paging rules, not by osvmm code.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from osvmm.arch.x86 import cpuid, gdt, layout, paging, regs
from osvmm.kvm.structs import kvm_cpuid_entry2, kvm_regs, kvm_sregs

GOLDEN = Path(__file__).parent / "golden" / "arch"

# -- GDT ------------------------------------------------------------------------------


def test_boot_gdt_matches_golden_bytes():
    entries = gdt.boot_gdt()
    assert entries[layout.BOOT_CS >> 3] == 0x00AF9B000000FFFF
    assert entries[layout.BOOT_DS >> 3] == 0x00CF93000000FFFF
    assert entries[layout.BOOT_TSS >> 3] == 0x000F8B000000FFFF
    assert gdt.gdt_bytes(entries) == (GOLDEN / "boot_gdt.bin").read_bytes()


def _encode(seg: dict[str, int]) -> int:
    """The descriptor for kvm_segment fields (SDM vol. 3, figure 3-8), written independently."""
    limit = seg["limit"] >> 12 if seg["g"] else seg["limit"]
    assert limit <= 0xFFFFF
    access = seg["type"] | seg["s"] << 4 | seg["dpl"] << 5 | seg["present"] << 7  # byte 5
    flags = seg["avl"] | seg["l"] << 1 | seg["db"] << 2 | seg["g"] << 3  # bits 52-55
    base = seg["base"]
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | access << 40
        | (limit >> 16) << 48
        | flags << 52
        | (base >> 24) << 56
    )


def test_segment_from_entry_of_the_boot_gdt():
    cs = gdt.segment_from_entry(0x00AF9B000000FFFF, 0x10)
    assert cs == {
        "base": 0,
        "limit": 0xFFFFFFFF,
        "selector": 0x10,
        "type": 0xB,
        "present": 1,
        "dpl": 0,
        "db": 0,
        "s": 1,
        "l": 1,
        "g": 1,
        "avl": 0,
        "unusable": 0,
    }
    ds = gdt.segment_from_entry(0x00CF93000000FFFF, 0x18)
    assert (ds["type"], ds["db"], ds["l"], ds["s"], ds["limit"]) == (3, 1, 0, 1, 0xFFFFFFFF)
    tr = gdt.segment_from_entry(0x000F8B000000FFFF, 0x20)
    assert (tr["type"], tr["s"], tr["g"], tr["limit"], tr["present"]) == (0xB, 0, 0, 0xFFFFF, 1)


def test_segment_from_entry_round_trips_every_descriptor_bit():
    rng = random.Random(1)
    samples = [rng.getrandbits(64) for _ in range(2000)] + [0, (1 << 64) - 1]
    for entry in samples:
        seg = gdt.segment_from_entry(entry, 0x28)
        assert seg["selector"] == 0x28
        assert _encode(seg) == entry, hex(entry)


def test_gdt_entry_packs_base_and_limit():
    entry = gdt.gdt_entry(gdt.DATA_FLAGS_ACCESS, 0x12345678, 0xABCDE)
    seg = gdt.segment_from_entry(entry, 0)
    assert seg["base"] == 0x12345678
    assert seg["limit"] == (0xABCDE << 12) | 0xFFF
    assert _encode(seg) == entry


# -- page tables ------------------------------------------------------------------------

P, RW, US, PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7
ADDR_MASK = ((1 << 52) - 1) & ~0xFFF


class PhysMem:
    """Guest-physical memory made of the (address, bytes) pieces the builder returns."""

    def __init__(self, pieces):
        self.pieces = sorted(pieces)
        for (a, da), (b, _) in zip(self.pieces, self.pieces[1:], strict=False):
            assert a + len(da) <= b, "page-table pieces overlap"

    def u64(self, addr: int) -> int:
        for base, data in self.pieces:
            if base <= addr and addr + 8 <= base + len(data):
                return struct.unpack_from("<Q", data, addr - base)[0]
        raise AssertionError(f"the walk read {addr:#x}, outside the tables")


def walk(mem: PhysMem, cr3: int, va: int) -> int | None:
    """4-level paging translation of ``va`` (SDM vol. 3, 4.5); None if not present."""
    table = cr3 & ADDR_MASK
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        entry = mem.u64(table + 8 * ((va >> shift) & 0x1FF))
        if not entry & P:
            return None
        if level in (3, 2) and entry & PS:
            page = entry & ADDR_MASK & ~((1 << shift) - 1)
            return page | (va & ((1 << shift) - 1))
        table = entry & ADDR_MASK
    return table | (va & 0xFFF)


@pytest.fixture(scope="module")
def tables():
    return paging.identity_page_tables()


def test_page_tables_live_where_the_layout_says(tables):
    addrs = [(a, len(d)) for a, d in tables]
    assert addrs == [
        (layout.PML4_ADDR, 4096),
        (layout.PDPT_ADDR, 4096),
        (layout.PD_ADDR, 4 * 4096),
    ]
    assert layout.PD_ADDR + 4 * 4096 <= layout.CMDLINE_ADDR
    assert layout.BOOT_STACK_POINTER < layout.PML4_ADDR


@pytest.mark.parametrize(
    "va", [0, 0x1000, 0x200000, 0x1234567, 0xBFFF_FFFF, 0xC000_0000, 0xFEE0_0000, 0xFFFF_FFFF]
)
def test_identity_map_below_4_gib(tables, va):
    assert walk(PhysMem(tables), layout.PML4_ADDR, va) == va


@pytest.mark.parametrize(
    "va", [0x1_0000_0000, 0x1_4000_0000, 0x80_0000_0000, 0xFFFF_8000_0000_0000]
)
def test_nothing_above_4_gib_is_mapped(tables, va):
    assert walk(PhysMem(tables), layout.PML4_ADDR, va) is None


def test_page_table_entries_carry_only_present_write_and_ps(tables):
    (_, pml4), (_, pdpt), (_, pds) = tables
    for name, data, flags in (
        ("pml4", pml4, P | RW),
        ("pdpt", pdpt, P | RW),
        ("pd", pds, P | RW | PS),
    ):
        entries = struct.unpack(f"<{len(data) // 8}Q", data)
        present = [e for e in entries if e]
        assert present, name
        for e in present:
            assert e & 0xFFF == flags, f"{name} entry {e:#x}"
            assert not e >> 52, f"{name} entry {e:#x} sets NX or high bits"
    assert len([e for e in struct.unpack("<512Q", pml4) if e]) == 1
    assert len([e for e in struct.unpack("<512Q", pdpt) if e]) == 4


# -- entry register state -------------------------------------------------------------------


def applied(state: regs.EntryState) -> tuple[kvm_sregs, kvm_regs]:
    sregs, r = kvm_sregs(), kvm_regs()
    # Values a vCPU starts with that the entry state must replace.
    sregs.cs.selector, sregs.cs.base, sregs.cs.limit = 0xF000, 0xFFFF0000, 0xFFFF
    r.rax = 0x1234
    regs.apply_entry_state(state, sregs, r)
    return sregs, r


def test_pvh_entry_state():
    sregs, r = applied(regs.pvh_entry(0x100_2000, layout.PVH_START_INFO_ADDR))
    assert sregs.cr0 & regs.CR0_PE
    assert not sregs.cr0 & regs.CR0_PG
    assert sregs.cr4 & regs.CR4_PAE == 0
    assert sregs.efer == 0
    cs = sregs.cs
    assert (cs.db, cs.l, cs.s, cs.type, cs.present) == (1, 0, 1, 0xB, 1)
    assert (cs.base, cs.limit, cs.g) == (0, 0xFFFFFFFF, 1)
    for name in ("ds", "es", "ss", "fs", "gs"):
        seg = getattr(sregs, name)
        assert (seg.type, seg.db, seg.s, seg.base, seg.limit) == (3, 1, 1, 0, 0xFFFFFFFF), name
    assert (sregs.tr.type, sregs.tr.s, sregs.tr.present) == (0xB, 0, 1)
    assert r.rip == 0x100_2000
    assert r.rbx == layout.PVH_START_INFO_ADDR
    assert r.rflags == 2  # reserved bit 1 only: IF clear
    assert r.rax == 0x1234  # registers the state does not name are left alone


def test_long64_entry_state():
    sregs, r = applied(regs.long64_entry(0x100_0000, rbx=0x6000, rsi=0x7000))
    assert sregs.efer & (regs.EFER_LME | regs.EFER_LMA) == regs.EFER_LME | regs.EFER_LMA
    assert sregs.cr4 & regs.CR4_PAE
    assert sregs.cr0 & (regs.CR0_PG | regs.CR0_PE) == regs.CR0_PG | regs.CR0_PE
    assert sregs.cr3 == layout.PML4_ADDR
    cs = sregs.cs
    assert (cs.l, cs.db, cs.selector, cs.type, cs.present, cs.dpl) == (1, 0, 0x10, 0xB, 1, 0)
    for name in ("ds", "es", "ss"):
        seg = getattr(sregs, name)
        assert (seg.selector, seg.type, seg.l) == (layout.BOOT_DS, 3, 0), name
    assert sregs.tr.selector == layout.BOOT_TSS
    assert (sregs.gdt.base, sregs.gdt.limit) == (layout.GDT_ADDR, 5 * 8 - 1)
    assert (sregs.idt.base, sregs.idt.limit) == (layout.IDT_ADDR, 0)
    assert r.rsp == 0x8FF0
    assert (r.rip, r.rbx, r.rsi, r.rflags) == (0x100_0000, 0x6000, 0x7000, 2)


def test_long64_segments_agree_with_the_gdt_the_guest_sees():
    """The hidden segment state KVM is given must be what reloading a selector gives."""
    sregs, _ = applied(regs.long64_entry(0x100_0000))
    golden = (GOLDEN / "boot_gdt.bin").read_bytes()
    for name in ("cs", "ds", "ss", "tr"):
        seg = getattr(sregs, name)
        entry = struct.unpack_from("<Q", golden, seg.selector)[0]
        fields = {k: getattr(seg, k) for k in gdt.segment_from_entry(0, 0)}
        assert _encode(fields) == entry, name


# -- CPUID --------------------------------------------------------------------------------


def entry(function, index=0, eax=0, ebx=0, ecx=0, edx=0, flags=0) -> kvm_cpuid_entry2:
    return kvm_cpuid_entry2(function, index, flags, eax, ebx, ecx, edx)


def supported() -> list[kvm_cpuid_entry2]:
    return [
        entry(0, eax=0x1F, ebx=0x756E6547),
        entry(1, eax=0x806C1, ebx=0x0010_0800 | 0xFF00_0000, ecx=0x7FFA_3203, edx=0x078B_FBFF),
        entry(7, ebx=0x29C6FBF, ecx=0x40405F4E),
        entry(0xB, 0, eax=1, ebx=2, ecx=0x100, edx=0xAA, flags=1),
        entry(0xB, 1, eax=4, ebx=8, ecx=0x201, edx=0xAA, flags=1),
        entry(0x1F, 0, eax=1, ebx=2, ecx=0x100, edx=0xAA, flags=1),
        entry(0x8000_0001, ecx=0x121, edx=0x2C10_0800),
    ]


def entry_dict(e: kvm_cpuid_entry2) -> dict[str, int]:
    return {name: getattr(e, name) for name, _ in kvm_cpuid_entry2._fields_ if name != "padding"}


def as_dicts(entries):
    return [entry_dict(e) for e in entries]


def test_vcpu_cpuid_apic_id_and_count():
    src = supported()
    before = as_dicts(src)
    out = cpuid.vcpu_cpuid(src, apic_id=5, nr_vcpus=6)
    assert as_dicts(src) == before, "the supported list must not be modified"
    by = {(e.function, e.index): e for e in out}
    leaf1 = by[(1, 0)]
    assert leaf1.ebx >> 24 == 5
    assert (leaf1.ebx >> 16) & 0xFF == 6
    assert leaf1.ebx & 0xFFFF == 0x0800  # brand index / CLFLUSH size kept
    assert leaf1.edx & (1 << 28)  # HTT
    assert leaf1.ecx & (1 << 31)  # hypervisor
    assert by[(0xB, 0)].edx == 5 and by[(0xB, 1)].edx == 5 and by[(0x1F, 0)].edx == 5
    assert by[(0xB, 1)].ecx == 0x201  # level type kept
    for key in ((0, 0), (7, 0), (0x8000_0001, 0)):
        assert entry_dict(by[key]) == entry_dict(
            next(e for e in src if (e.function, e.index) == key)
        )


def test_vcpu_cpuid_masks_clear_only_the_named_bits():
    plain = as_dicts(cpuid.vcpu_cpuid(supported(), 1, 2))
    for name, (leaf, reg, bit) in cpuid.FEATURES.items():
        masked = as_dicts(cpuid.vcpu_cpuid(supported(), 1, 2, mask=(name,)))
        for p, m in zip(plain, masked, strict=True):
            if p["function"] == leaf and p["index"] == 0:
                assert p[reg] & (1 << bit), f"{name}: the test input lacks the bit"
                assert m[reg] == p[reg] & ~(1 << bit), name
                assert {k: v for k, v in m.items() if k != reg} == {
                    k: v for k, v in p.items() if k != reg
                }
            else:
                assert m == p, name


def test_vcpu_cpuid_several_masks():
    out = cpuid.vcpu_cpuid(supported(), 0, 1, mask=("cx16", "xsave", "osxsave"))
    leaf1 = next(e for e in out if e.function == 1)
    assert not leaf1.ecx & ((1 << 13) | (1 << 26) | (1 << 27))
    assert leaf1.ecx & (1 << 21)  # x2apic untouched


def test_unknown_mask_name_is_rejected():
    with pytest.raises(KeyError):
        cpuid.vcpu_cpuid(supported(), 0, 1, mask=("no-such-feature",))
