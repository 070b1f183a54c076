"""Linux bzImage: the setup header, the 64-bit boot protocol load, payload extraction.

From Documentation/arch/x86/boot.rst (the Linux/x86 boot protocol):
  - the file starts with the real-mode setup code: (setup_sects + 1) sectors
    of 512 bytes (setup_sects 0 means 4); the protected-mode kernel follows;
  - ``struct setup_header`` sits at 0x1f1; "HdrS" at 0x202 and 0xAA55 at
    0x1fe mark it; it ends at 0x202 + the byte at 0x201 (the jump's offset);
  - 64-bit boot protocol: the protected-mode kernel is loaded at an address
    aligned to kernel_alignment (a relocatable kernel), or at pref_address
    (where a non-relocatable one runs anyway), and entered in 64-bit mode at
    load address + 0x200 when xloadflags has XLF_KERNEL_64 (protocol 2.12+);
  - from the load address the kernel needs init_size bytes of memory (2.10+);
  - the compressed vmlinux is payload_length bytes at payload_offset from the
    start of the protected-mode code (2.08+).
Protocol 2.06 or later is required (cmdline_size appears in 2.06).

``python3 -m osvmm.loader.bzimage extract BZIMAGE OUT`` writes the vmlinux;
``python3 -m osvmm.loader.bzimage info BZIMAGE`` prints the setup header.
"""

from __future__ import annotations

import argparse
import bz2
import ctypes
import lzma
import sys
import zlib

from osvmm.arch.x86.layout import HIGH_MEMORY_START, MiB
from osvmm.errors import ImageError, OsvmmError
from osvmm.loader.result import KIND_LINUX64, MAX_IMAGE_SIZE, LoadedImage, read_image
from osvmm.loader.setup_header import (
    BOOT_FLAG,
    HDRS_MAGIC,
    LOADED_HIGH,
    LOADER_TYPE_UNDEFINED,
    SETUP_HEADER_OFFSET,
    XLF_KERNEL_64,
    SetupHeader,
)

SECTOR_SIZE = 512
DEFAULT_SETUP_SECTS = 4  # setup_sects 0 means 4
MIN_PROTOCOL = 0x0206
ENTRY_64_OFFSET = 0x200  # the 64-bit entry, from the protected-mode kernel's start
DEFAULT_LOAD_ADDR = HIGH_MEMORY_START  # a bzImage's code32_start: 0x100000

# Compressed-payload magics (the kernel's arch/x86/boot/compressed Makefile choices).
MAGIC_GZIP = b"\x1f\x8b"
MAGIC_XZ = b"\xfd7zXZ\x00"
MAGIC_ZSTD = b"\x28\xb5\x2f\xfd"
MAGIC_BZIP2 = b"BZh"
MAGIC_LZMA = b"\x5d\x00\x00"
MAGIC_LZ4 = b"\x02\x21\x4c\x18"
MAGIC_LZO = b"\x89LZO"


def parse_setup_header(data: bytes, name: str = "bzImage") -> SetupHeader:
    """The setup header of a bzImage, checked; fields past the header's end are zero."""
    hdr_size = ctypes.sizeof(SetupHeader)
    if len(data) < 0x202 + 4 + 2:
        raise ImageError(f"{name}: too short to be a bzImage ({len(data)} bytes)")
    if int.from_bytes(data[0x202:0x206], "little") != HDRS_MAGIC:
        raise ImageError(f'{name}: not a bzImage (no "HdrS" magic at 0x202)')
    if int.from_bytes(data[0x1FE:0x200], "little") != BOOT_FLAG:
        raise ImageError(f"{name}: not a bzImage (boot_flag at 0x1fe is not 0xAA55)")
    # The header ends at 0x202 + the 8-bit jump offset at 0x201.
    hdr_len = min(0x202 + data[0x201] - SETUP_HEADER_OFFSET, hdr_size)
    if len(data) < SETUP_HEADER_OFFSET + hdr_len:
        raise ImageError(f"{name}: truncated setup header")
    raw = data[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + hdr_len]
    hdr = SetupHeader.from_buffer_copy(raw + bytes(hdr_size - len(raw)))
    if hdr.version < MIN_PROTOCOL:
        raise ImageError(
            f"{name}: boot protocol {hdr.version_str} is too old (2.06 or later required)"
        )
    if not hdr.loadflags & LOADED_HIGH:
        raise ImageError(f"{name}: loadflags lacks LOADED_HIGH (a zImage, not a bzImage)")
    return hdr


def setup_size(hdr: SetupHeader) -> int:
    """Bytes of real-mode setup code before the protected-mode kernel."""
    return ((hdr.setup_sects or DEFAULT_SETUP_SECTS) + 1) * SECTOR_SIZE


def protected_mode_kernel(data: bytes, hdr: SetupHeader, name: str = "bzImage") -> bytes:
    off = setup_size(hdr)
    if off >= len(data):
        raise ImageError(f"{name}: setup code ({off} bytes) fills the whole file")
    kernel = data[off:]
    if hdr.syssize * 16 > len(kernel):
        raise ImageError(
            f"{name}: truncated: syssize says {hdr.syssize * 16} bytes of protected-mode "
            f"kernel, the file has {len(kernel)}"
        )
    return kernel


def choose_load_address(hdr: SetupHeader, name: str = "bzImage") -> int:
    """Where the protected-mode kernel goes.

    pref_address (2.10+) is where a non-relocatable kernel runs and where a
    relocatable one prefers to: loading there spares the decompressor a copy.
    Without it (before 2.10) the kernel is loaded at 0x100000, code32_start's default.
    """
    if hdr.version >= 0x020A and hdr.pref_address:
        addr = hdr.pref_address
        if hdr.relocatable_kernel and hdr.kernel_alignment:
            if addr % hdr.kernel_alignment:
                raise ImageError(
                    f"{name}: pref_address {addr:#x} is not aligned to "
                    f"kernel_alignment {hdr.kernel_alignment:#x}"
                )
        return addr
    return DEFAULT_LOAD_ADDR


def load_bzimage(
    data: bytes, mem, name: str = "bzImage", load_addr: int | None = None
) -> LoadedImage:
    """Load a bzImage's protected-mode kernel for the 64-bit boot protocol.

    ``load_addr``: override the address (a relocatable kernel only; aligned to
    kernel_alignment). The returned setup header is ready for boot_params.hdr
    except for what the VMM fills in: cmd_line_ptr, ramdisk_image/size, vid_mode.
    """
    hdr = parse_setup_header(data, name)
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise ImageError(
            f"{name}: xloadflags lacks XLF_KERNEL_64: no 64-bit entry (protocol "
            f"{hdr.version_str}; 2.12 or later with a 64-bit kernel required)"
        )
    kernel = protected_mode_kernel(data, hdr, name)
    if load_addr is None:
        addr = choose_load_address(hdr, name)
    else:
        addr = load_addr
        if not hdr.relocatable_kernel and addr != choose_load_address(hdr, name):
            raise ImageError(f"{name}: kernel is not relocatable; cannot load at {addr:#x}")
        if hdr.kernel_alignment and addr % hdr.kernel_alignment:
            raise ImageError(
                f"{name}: load address {addr:#x} is not aligned to {hdr.kernel_alignment:#x}"
            )
    if addr < HIGH_MEMORY_START:
        raise ImageError(f"{name}: load address {addr:#x} is below 1 MiB")
    end = addr + len(kernel)
    need_end = max(end, addr + hdr.init_size)
    if not mem.contains(addr, need_end - addr):
        raise ImageError(
            f"{name}: image needs {-(-need_end // MiB)} MiB of guest memory "
            f"but the partition has {mem.size // MiB} MiB"
        )
    mem.write(addr, kernel)

    hdr.type_of_loader = LOADER_TYPE_UNDEFINED
    hdr.code32_start = addr & 0xFFFFFFFF
    return LoadedImage(
        kind=KIND_LINUX64,
        entry=addr + ENTRY_64_OFFSET,
        start=addr,
        end=end,
        name=name,
        setup_header=hdr,
        linux=True,
    )


def payload(data: bytes, name: str = "bzImage") -> bytes:
    """The compressed vmlinux inside a bzImage (protocol 2.08+)."""
    hdr = parse_setup_header(data, name)
    if hdr.version < 0x0208 or not hdr.payload_length:
        raise ImageError(f"{name}: no payload fields (protocol {hdr.version_str}, 2.08+ needed)")
    kernel = protected_mode_kernel(data, hdr, name)
    off, length = hdr.payload_offset, hdr.payload_length
    if off + length > len(kernel):
        raise ImageError(
            f"{name}: payload {off:#x}+{length:#x} lies outside the protected-mode kernel "
            f"({len(kernel):#x} bytes)"
        )
    return kernel[off : off + length]


def decompress(blob: bytes, name: str = "bzImage", limit: int = MAX_IMAGE_SIZE) -> bytes:
    """Decompress a kernel payload by its magic; trailing bytes (the size) are ignored.
    Output beyond ``limit`` bytes is an ImageError (a small payload cannot expand
    without bound)."""
    try:
        if blob.startswith(MAGIC_XZ):
            out = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(blob, limit + 1)
        elif blob.startswith(MAGIC_GZIP):
            out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob, limit + 1)
        elif blob.startswith(MAGIC_BZIP2):
            out = bz2.BZ2Decompressor().decompress(blob, limit + 1)
        elif blob.startswith(MAGIC_LZMA):
            out = lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(blob, limit + 1)
        elif blob.startswith(MAGIC_ZSTD):
            out = _zstd_decompress(blob, name, limit + 1)
        else:
            out = None
    except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError) as e:
        raise ImageError(f"{name}: corrupt compressed payload: {e}") from None
    if out is not None:
        if len(out) > limit:
            raise ImageError(f"{name}: payload decompresses to more than {limit >> 20} MiB")
        return out
    if blob.startswith(MAGIC_LZ4):
        raise ImageError(f"{name}: LZ4-compressed payload is not supported (no stdlib LZ4)")
    if blob.startswith(MAGIC_LZO):
        raise ImageError(f"{name}: LZO-compressed payload is not supported (no stdlib LZO)")
    raise ImageError(f"{name}: unknown payload compression (magic {blob[:6].hex()})")


def _zstd_decompress(blob: bytes, name: str, max_length: int) -> bytes:
    try:  # Python 3.14 brings zstd into the standard library
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        raise ImageError(
            f"{name}: zstd-compressed payload needs Python 3.14's compression.zstd; "
            "extract the vmlinux with the kernel's scripts/extract-vmlinux instead"
        ) from None
    return zstd.ZstdDecompressor().decompress(blob, max_length)


def extract_vmlinux(data: bytes, name: str = "bzImage") -> bytes:
    """The vmlinux ELF compressed inside a bzImage."""
    out = decompress(payload(data, name), name)
    if not out.startswith(b"\x7fELF"):
        raise ImageError(f"{name}: decompressed payload is not an ELF vmlinux")
    return out


def describe(hdr: SetupHeader) -> str:
    """The setup header, one field a line (for ``info``)."""
    lines = [f"protocol {hdr.version_str}"]
    for fname, _ in SetupHeader._fields_:
        lines.append(f"{fname:22} {getattr(hdr, fname):#x}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m osvmm.loader.bzimage")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("extract", help="write the vmlinux ELF inside a bzImage")
    ex.add_argument("bzimage")
    ex.add_argument("out")
    info = sub.add_parser("info", help="print the setup header")
    info.add_argument("bzimage")
    args = ap.parse_args(argv)
    try:
        data = read_image(args.bzimage, "bzImage")
        if args.cmd == "info":
            print(describe(parse_setup_header(data, args.bzimage)))
            return 0
        vmlinux = extract_vmlinux(data, args.bzimage)
        try:
            with open(args.out, "wb") as f:
                f.write(vmlinux)
        except OSError as e:
            raise ImageError(f"{args.out}: cannot write: {e.strerror or e}") from None
    except OsvmmError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
