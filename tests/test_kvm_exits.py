"""decode_exit over synthetic kvm_run images, and StatsReader over a synthetic stats file.

The images are filled through the ctypes mirror (structs.kvm_run, checked
against <linux/kvm.h> by test_kvm_structs.py), so these tests check the
decoder's struct formats against the mirror, field by field.
"""

from __future__ import annotations

import ctypes
import os
import struct

import pytest

from osvmm.kvm import exits
from osvmm.kvm import structs as s
from osvmm.kvm.stats import StatDesc, StatsReader, exit_counts

PAGE = 4096


def run_image(reason: int) -> tuple[bytearray, s.kvm_run]:
    """A two-page kvm_run mapping (KVM puts port-I/O data in the second page)."""
    buf = bytearray(2 * PAGE)
    run = s.kvm_run.from_buffer(buf)
    run.exit_reason = reason
    return buf, run


def io_exit(direction: int, size: int, port: int, count: int, data_offset: int) -> bytearray:
    buf, run = run_image(s.KVM_EXIT_IO)
    io = run.exit.io
    io.direction, io.size, io.port = direction, size, port
    io.count, io.data_offset = count, data_offset
    return buf


def test_io_out_single_byte():
    buf = io_exit(s.KVM_EXIT_IO_OUT, 1, 0x3F8, 1, PAGE)
    buf[PAGE] = ord("A")
    buf[PAGE + 1] = ord("Z")  # beyond size * count: not part of the exit
    assert exits.decode_exit(buf) == exits.IoOut(0x3F8, 1, b"A")


def test_io_out_rep_outs_carries_size_times_count_bytes():
    buf = io_exit(s.KVM_EXIT_IO_OUT, 2, 0x510, 3, 0x1100)
    buf[0x1100:0x1108] = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    ev = exits.decode_exit(buf)
    assert isinstance(ev, exits.IoOut)
    assert (ev.port, ev.size, bytes(ev.data)) == (0x510, 2, b"\x01\x02\x03\x04\x05\x06")


def test_io_in_reports_where_the_vmm_writes():
    buf = io_exit(s.KVM_EXIT_IO_IN, 4, 0xCFC, 2, PAGE)
    assert exits.decode_exit(buf) == exits.IoIn(0xCFC, 4, 2, PAGE)


def test_mmio_write_keeps_len_bytes():
    buf, run = run_image(s.KVM_EXIT_MMIO)
    m = run.exit.mmio
    m.phys_addr, m.len, m.is_write = 0xD000_0010, 4, 1
    m.data[:] = [0xEF, 0xBE, 0xAD, 0xDE, 0x11, 0x22, 0x33, 0x44]
    assert exits.decode_exit(buf) == exits.MmioWrite(0xD000_0010, b"\xef\xbe\xad\xde")


def test_mmio_read():
    buf, run = run_image(s.KVM_EXIT_MMIO)
    m = run.exit.mmio
    m.phys_addr, m.len, m.is_write = 0xFED0_0000, 8, 0
    assert exits.decode_exit(buf) == exits.MmioRead(0xFED0_0000, 8)


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (s.KVM_EXIT_SHUTDOWN, exits.Shutdown()),
        (s.KVM_EXIT_HLT, exits.Hlt()),
        (s.KVM_EXIT_INTR, exits.Interrupted()),
        (s.KVM_EXIT_DIRTY_RING_FULL, exits.DirtyRingFull()),
    ],
)
def test_exits_without_payload(reason, expected):
    buf, _ = run_image(reason)
    ev = exits.decode_exit(buf)
    assert type(ev) is type(expected)


def test_fail_entry():
    buf, run = run_image(s.KVM_EXIT_FAIL_ENTRY)
    run.exit.fail_entry.hardware_entry_failure_reason = 0x8000_0021
    run.exit.fail_entry.cpu = 3
    assert exits.decode_exit(buf) == exits.FailEntry(0x8000_0021, 3)


def emulation_failure(insn: bytes, extra: list[int] = ()) -> bytearray:
    """KVM_INTERNAL_ERROR_EMULATION as the kernel fills it (prepare_emulation_failure_exit):
    internal.data[0] = flags, then the 16-byte union {u8 insn_size; u8 insn_bytes[15]}
    (data[1..2]), then debug words. Offsets as in <linux/kvm.h> (test_kvm_structs checks them).
    """
    buf, run = run_image(s.KVM_EXIT_INTERNAL_ERROR)
    internal = run.exit.internal
    internal.suberror = s.KVM_INTERNAL_ERROR_EMULATION
    internal.ndata = 3 + len(extra)
    internal.data[0] = 1  # KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    union = (bytes([len(insn)]) + insn + b"\x90" * 15)[:16]
    off = s.kvm_run.exit.offset + 16
    buf[off : off + 16] = union
    for i, word in enumerate(extra):
        internal.data[3 + i] = word
    return buf


def test_internal_error_emulation_failure_instruction_bytes():
    # lock cmpxchg16b [rsi]: the instruction this host's emulator lacks.
    insn = bytes.fromhex("f0480fc70e")
    ev = exits.decode_exit(emulation_failure(insn, extra=[0x1234, 0x5678]))
    assert isinstance(ev, exits.InternalError)
    assert ev.suberror == s.KVM_INTERNAL_ERROR_EMULATION
    assert len(ev.data) == 5
    assert ev.instruction_bytes() == insn
    assert ev.describe() == "emulation failure, instruction bytes f0 48 0f c7 0e"


def test_internal_error_fifteen_byte_instruction():
    insn = bytes(range(0x41, 0x41 + 15))
    ev = exits.decode_exit(emulation_failure(insn))
    assert ev.instruction_bytes() == insn


def test_internal_error_without_instruction_bytes_flag():
    buf = emulation_failure(b"\xcc")
    s.kvm_run.from_buffer(buf).exit.internal.data[0] = 0
    ev = exits.decode_exit(buf)
    assert ev.instruction_bytes() is None
    assert ev.describe() == "emulation failure"


def test_internal_error_other_suberror_and_ndata_bound():
    buf, run = run_image(s.KVM_EXIT_INTERNAL_ERROR)
    run.exit.internal.suberror = s.KVM_INTERNAL_ERROR_DELIVERY_EV
    run.exit.internal.ndata = 99  # never read past the 16 words of the union
    for i in range(16):
        run.exit.internal.data[i] = i
    ev = exits.decode_exit(buf)
    assert ev.data == tuple(range(16))
    assert ev.instruction_bytes() is None
    assert ev.describe() == "exit during event delivery"
    assert exits.InternalError(77, ()).describe() == "internal error 77"


def test_system_event():
    buf, run = run_image(s.KVM_EXIT_SYSTEM_EVENT)
    se = run.exit.system_event
    se.type, se.ndata = s.KVM_SYSTEM_EVENT_RESET, 2
    se.data[0], se.data[1], se.data[2] = 7, 8, 9
    assert exits.decode_exit(buf) == exits.SystemEvent(s.KVM_SYSTEM_EVENT_RESET, (7, 8))


def test_unhandled_exit_has_its_name():
    buf, _ = run_image(s.KVM_EXIT_X86_RDMSR)
    ev = exits.decode_exit(buf)
    assert ev == exits.Unhandled(s.KVM_EXIT_X86_RDMSR)
    assert ev.name == "x86_rdmsr"
    assert exits.Unhandled(250).name == "250"


def test_reason_argument_overrides_the_image():
    buf, run = run_image(s.KVM_EXIT_HLT)
    run.exit.fail_entry.hardware_entry_failure_reason = 5
    assert exits.decode_exit(buf, s.KVM_EXIT_FAIL_ENTRY) == exits.FailEntry(5, 0)


# -- binary statistics -------------------------------------------------------------------

NAME_SIZE = 48


def stats_file(path, stats: list[tuple[str, int, list[int]]]) -> None:
    """Write a KVM binary-stats file: header, id, descriptors (+ names), data."""
    hdr_size = ctypes.sizeof(s.kvm_stats_header)
    desc_size = ctypes.sizeof(s.kvm_stats_desc) + NAME_SIZE
    id_offset = hdr_size
    desc_offset = id_offset + NAME_SIZE
    data_offset = desc_offset + desc_size * len(stats) + 8  # a gap the reader must honour
    descs, data = b"", b""
    for name, flags, values in stats:
        d = s.kvm_stats_desc(flags=flags, exponent=0, size=len(values), offset=len(data))
        descs += bytes(d) + name.encode().ljust(NAME_SIZE, b"\0")
        data += struct.pack(f"<{len(values)}Q", *values)
    hdr = s.kvm_stats_header(
        flags=0,
        name_size=NAME_SIZE,
        num_desc=len(stats),
        id_offset=id_offset,
        desc_offset=desc_offset,
        data_offset=data_offset,
    )
    blob = bytes(hdr) + b"kvm-1234/vcpu-0".ljust(NAME_SIZE, b"\0") + descs
    blob += b"\xee" * (data_offset - len(blob)) + data
    path.write_bytes(blob)


def test_stats_reader(tmp_path):
    path = tmp_path / "stats"
    stats_file(
        path,
        [
            ("exits", s.KVM_STATS_TYPE_CUMULATIVE, [1000]),
            ("io_exits", s.KVM_STATS_TYPE_CUMULATIVE, [600]),
            ("halt_poll_hist", s.KVM_STATS_TYPE_LOG_HIST | 0x10, [1, 2, 3]),
            ("insn_emulation", s.KVM_STATS_TYPE_CUMULATIVE, [42]),
            ("guest_mode", s.KVM_STATS_TYPE_INSTANT, [1]),
        ],
    )
    reader = StatsReader(os.open(path, os.O_RDONLY))
    try:
        assert reader.descs[0] == StatDesc("exits", s.KVM_STATS_TYPE_CUMULATIVE, 0, 1)
        assert reader.descs[2] == StatDesc("halt_poll_hist", s.KVM_STATS_TYPE_LOG_HIST, 16, 3)
        values = reader.read()
        assert values == {
            "exits": 1000,
            "io_exits": 600,
            "halt_poll_hist": 6,
            "insn_emulation": 42,
            "guest_mode": 1,
        }
        assert exit_counts(values) == {"exits": 1000, "io_exits": 600, "insn_emulation": 42}
        # Values are read again on each call (the schema only once).
        data_offset = reader.data_offset
        with open(path, "r+b") as f:
            f.seek(data_offset)
            f.write(struct.pack("<Q", 1001))
        assert reader.read()["exits"] == 1001
    finally:
        reader.close()
    assert reader.fd == -1
    reader.close()  # closing twice is harmless


def test_stats_reader_with_no_descriptors(tmp_path):
    path = tmp_path / "stats"
    stats_file(path, [])
    reader = StatsReader(os.open(path, os.O_RDONLY))
    assert reader.read() == {}
    reader.close()


def test_sync_regs_first_and_return_rax_use_the_kvm_run_layout():
    buf, run = run_image(s.KVM_EXIT_IO)
    regs = run.s.regs.regs
    regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi = 1, 2, 3, 4, 5, 6
    regs.rip = 0x1000
    sync = exits.SyncRegs(buf)
    assert sync.first() == (1, 2, 3, 4, 5, 6)
    sync.return_rax((1 << 64) - 22)
    assert regs.rax == (1 << 64) - 22 and regs.rbx == 2 and regs.rip == 0x1000
    assert run.kvm_dirty_regs == s.KVM_SYNC_X86_REGS
    sync.enable()
    assert run.kvm_valid_regs == s.KVM_SYNC_X86_REGS
    sync.disable()
    assert run.kvm_valid_regs == 0 and run.kvm_dirty_regs == 0
