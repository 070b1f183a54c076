"""Symbols of a kernel or bare-metal image, for the write monitor's named ranges.

Three sources, tried in this order by ``read_symbols``:

  - the ELF symbol table (SHT_SYMTAB): names, values and sizes; an unstripped
    vmlinux (Debian's linux-image-*-dbg) and the bundled guests have one;
  - kallsyms, the compressed table a Linux kernel built with CONFIG_KALLSYMS
    carries in its own .rodata: found in a stripped vmlinux (Debian's stock
    one) or in the vmlinux inside a bzImage, and decoded as kernel/kallsyms.c
    reads it (names and addresses; no sizes);
  - a System.map (``nm -n`` output: ``ADDRESS TYPE NAME`` per line), given
    instead of an image.

Symbols are virtual addresses. ``Symbols.to_phys`` translates one to
guest-physical through the image's PT_LOAD segments (p_vaddr -> p_paddr), as
the VMM loads a vmlinux at p_paddr; a System.map alone has no segments, and
the x86-64 kernel mapping is used: ``vaddr - 0xffffffff80000000``
(__START_KERNEL_map, a kernel loaded where it was linked: no KASLR).

kallsyms layout (scripts/kallsyms.c, base-relative, Linux 4.6 and later):
``kallsyms_offsets`` (s32 per symbol), ``kallsyms_relative_base`` (u64),
``kallsyms_num_syms`` (u32), ``kallsyms_names`` (per symbol: a length byte,
two when its top bit is set, then token bytes), ..., ``kallsyms_token_table``
(256 NUL-terminated strings), ``kallsyms_token_index`` (256 u16 offsets), each
table 8-byte aligned. Token c of a character used in symbols is that
character itself, so the table holds "0\\0" "1\\0" ... "9\\0" at tokens 48-57:
that run finds the token table, the index after it confirms it, and the
relative base (a load segment's start) followed by a plausible count and
names that decode to the token table's doorstep finds the rest. An offset
below 0 is ``relative_base - 1 - offset``; at or above 0 an absolute address
(per-CPU symbols) when the table has negative offsets, else relative to the base.
"""

from __future__ import annotations

import ctypes
import re
import struct
from dataclasses import dataclass, field

from osvmm.errors import ImageError
from osvmm.loader.bzimage import extract_vmlinux
from osvmm.loader.elf import Elf64_Shdr, parse_elf
from osvmm.loader.result import read_image

START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # x86-64 __START_KERNEL_map
SHT_SYMTAB = 2
# Elf64_Sym: st_name, st_info, st_other, st_shndx, st_value, st_size
_SYM = struct.Struct("<IBBHQQ")
STT_SECTION, STT_FILE = 3, 4
_DIGIT_TOKENS = b"".join(bytes([c]) + b"\0" for c in b"0123456789")
_KALLSYMS_TYPES = frozenset(b"AaBbDdGgNnRrSsTtUuVvWw?-")
_MAP_LINE = re.compile(r"([0-9a-fA-F]+)\s+(\S)\s+(\S+)")


@dataclass
class Symbols:
    """Names to virtual addresses (and sizes where the source has them), and the
    load segments (vaddr, paddr, memsz) that translate them to guest-physical."""

    source: str
    addresses: dict[str, int]
    sizes: dict[str, int] = field(default_factory=dict)
    segments: tuple[tuple[int, int, int], ...] = ()

    def address(self, name: str) -> int:
        try:
            return self.addresses[name]
        except KeyError:
            raise ImageError(f"{self.source}: no symbol {name!r}") from None

    def size(self, name: str) -> int | None:
        return self.sizes.get(name)

    def to_phys(self, vaddr: int) -> int:
        """The guest-physical address of ``vaddr``: through the load segment at or
        before it (an address in the padding after a segment, such as an aligned
        end symbol, belongs to that segment), up to the end of the last one."""
        if not self.segments:
            return vaddr - START_KERNEL_MAP if vaddr >= START_KERNEL_MAP else vaddr
        before = [(v, p) for v, p, _ in self.segments if v <= vaddr]
        if not before or vaddr > max(v + size for v, _, size in self.segments):
            raise ImageError(f"{self.source}: address {vaddr:#x} lies outside the load segments")
        v, p = max(before)
        return p + vaddr - v


# -- the ELF symbol table -------------------------------------------------------------------


def elf_symtab(data: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """Names -> values and sizes from an ELF64's SHT_SYMTAB (empty when stripped)."""
    if len(data) < 64 or data[4] != 2:
        return {}, {}
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    shsz = ctypes.sizeof(Elf64_Shdr)
    if not shoff or shentsize != shsz or shoff + shnum * shsz > len(data):
        return {}, {}
    shdrs = [Elf64_Shdr.from_buffer_copy(data, shoff + i * shsz) for i in range(shnum)]
    addresses: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for sh in shdrs:
        if sh.sh_type != SHT_SYMTAB or sh.sh_link >= len(shdrs):
            continue
        strtab = shdrs[sh.sh_link]
        strings = data[strtab.sh_offset : strtab.sh_offset + strtab.sh_size]
        end = min(sh.sh_offset + sh.sh_size, len(data))
        for off in range(sh.sh_offset, end - _SYM.size + 1, _SYM.size):
            st_name, st_info, _, shndx, value, size = _SYM.unpack_from(data, off)
            if st_info & 0xF in (STT_SECTION, STT_FILE) or shndx == 0 or not st_name:
                continue
            name = strings[st_name : strings.find(b"\0", st_name)].decode("latin-1")
            if name and name not in addresses:
                addresses[name] = value
                if size:
                    sizes[name] = size
    return addresses, sizes


# -- kallsyms ------------------------------------------------------------------------------


def _tokens(data: bytes, start: int) -> tuple[list[bytes], int] | None:
    """The 256 tokens from ``start`` and the offset after them, or None."""
    tokens, pos = [], start
    for _ in range(256):
        end = data.find(b"\0", pos)
        if end <= pos:
            return None
        tokens.append(data[pos:end])
        pos = end + 1
    return tokens, pos


def _token_table(data: bytes) -> tuple[int, list[bytes]]:
    """(offset, tokens) of kallsyms_token_table, confirmed by kallsyms_token_index."""
    for m in re.finditer(re.escape(_DIGIT_TOKENS), data):
        pos = m.start()
        for _ in range(ord("0")):  # back over tokens 0..47
            if pos < 2 or data[pos - 1] != 0:
                break
            prev = data.rfind(b"\0", 0, pos - 1)
            if prev == pos - 2:
                break
            pos = prev + 1
        else:
            found = _tokens(data, pos)
            if found is None:
                continue
            tokens, end = found
            offsets, o = [], 0
            for t in tokens:
                offsets.append(o)
                o += len(t) + 1
            index_at = -(-end // 8) * 8
            if (
                index_at + 512 <= len(data)
                and list(struct.unpack_from("<256H", data, index_at)) == offsets
            ):
                return pos, tokens
    raise ImageError("no kallsyms token table (a kernel without CONFIG_KALLSYMS?)")


def _names(data: bytes, start: int, count: int, tokens: list[bytes], limit: int):
    """``count`` decoded names from ``start`` (each with its type letter first), or
    None when they do not decode as kallsyms names before ``limit``."""
    names, pos = [], start
    for _ in range(count):
        if pos >= limit:
            return None
        length = data[pos]
        pos += 1
        if length & 0x80:  # a "big" symbol: two length bytes (Linux 6.1+)
            length = (length & 0x7F) | data[pos] << 7
            pos += 1
        if not length or pos + length > limit:
            return None
        name = b"".join(tokens[b] for b in data[pos : pos + length])
        if not name or name[0] not in _KALLSYMS_TYPES:
            return None
        names.append(name)
        pos += length
    return names


def kallsyms(data: bytes, bases: tuple[int, ...]) -> dict[str, int]:
    """Names -> addresses from the kallsyms tables embedded in a kernel image;
    ``bases``: candidate relative bases (the start addresses of its load segments)."""
    table_at, tokens = _token_table(data)
    for base in bases:
        needle = struct.pack("<Q", base)
        pos = data.find(needle, 0, table_at)
        while pos >= 0:
            if pos % 8 == 0 and pos + 16 <= table_at:
                count = struct.unpack_from("<I", data, pos + 8)[0]
                if 0 < count < 1 << 24 and pos >= 4 * count:
                    names = _names(data, pos + 16, count, tokens, table_at)
                    if names is not None:
                        offsets_at = pos - -(-4 * count // 8) * 8
                        offsets = struct.unpack_from(f"<{count}i", data, offsets_at)
                        absolute_percpu = any(o < 0 for o in offsets)
                        out: dict[str, int] = {}
                        for name, off in zip(names, offsets, strict=True):
                            if off < 0:
                                addr = base - 1 - off
                            else:
                                addr = off if absolute_percpu else base + off
                            out.setdefault(name[1:].decode("latin-1"), addr)
                        return out
            pos = data.find(needle, pos + 1, table_at)
    raise ImageError("kallsyms tables not found (relative base and names)")


# -- System.map ------------------------------------------------------------------------------


def parse_system_map(text: str, source: str = "System.map") -> dict[str, int]:
    """Names -> addresses of ``nm`` output (``ADDRESS TYPE NAME``, the first of a name wins)."""
    out: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _MAP_LINE.match(line.strip())
        if m is None:
            raise ImageError(f"{source}:{n}: not 'ADDRESS TYPE NAME': {line.strip()[:60]!r}")
        out.setdefault(m.group(3), int(m.group(1), 16))
    if not out:
        raise ImageError(f"{source}: no symbols")
    return out


# -- one entry point --------------------------------------------------------------------------


def elf_symbols(data: bytes, source: str) -> Symbols:
    """Symbols of an ELF image: its symbol table, else its kallsyms."""
    elf = parse_elf(data, source)
    segments = tuple((p.p_vaddr, p.p_paddr, p.p_memsz) for p in elf.loads)
    addresses, sizes = elf_symtab(data)
    if not addresses:
        bases = tuple(sorted({v for v, _, _ in segments if v >= START_KERNEL_MAP}))
        try:
            addresses = kallsyms(data, bases)
        except ImageError as err:
            raise ImageError(f"{source}: no symbol table, and {err}") from None
    return Symbols(source, addresses, sizes, segments)


def read_symbols(path: str) -> Symbols:
    """The symbols of ``path``: an ELF image (vmlinux, a bundled guest), a bzImage
    (its vmlinux), or a System.map."""
    data = read_image(path, "symbols")
    if data.startswith(b"\x7fELF"):
        return elf_symbols(data, path)
    if len(data) > 0x206 and data[0x202:0x206] == b"HdrS":
        return elf_symbols(extract_vmlinux(data, path), path)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ImageError(f"symbols {path}: not an ELF image, a bzImage or a System.map") from None
    return Symbols(path, parse_system_map(text, path))
