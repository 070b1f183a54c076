"""The Linux x86 boot protocol's ``struct setup_header``.

A field-for-field mirror of ``struct setup_header`` in Linux
arch/x86/include/uapi/asm/bootparam.h (Documentation/arch/x86/boot.rst).
In a bzImage it sits at file offset 0x1f1; in ``struct boot_params`` (the
zero page) at offset 0x1f1 too, so the VMM copies it verbatim.
"""

from __future__ import annotations

import ctypes

SETUP_HEADER_OFFSET = 0x1F1

# "HdrS" read as a little-endian u32 at 0x202.
HDRS_MAGIC = 0x53726448
BOOT_FLAG = 0xAA55

# loadflags
LOADED_HIGH = 1 << 0  # protected-mode code loads at 0x100000
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7

# xloadflags
XLF_KERNEL_64 = 1 << 0  # has the 64-bit entry at load address + 0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4
XLF_5LEVEL = 1 << 5
XLF_5LEVEL_ENABLED = 1 << 6

# type_of_loader: 0xff means "undefined / not registered"
LOADER_TYPE_UNDEFINED = 0xFF


class SetupHeader(ctypes.LittleEndianStructure):
    """struct setup_header (packed); offsets in the comments are from the zero page."""

    _pack_ = 1
    _fields_ = [
        ("setup_sects", ctypes.c_uint8),  # 0x1f1
        ("root_flags", ctypes.c_uint16),  # 0x1f2
        ("syssize", ctypes.c_uint32),  # 0x1f4
        ("ram_size", ctypes.c_uint16),  # 0x1f8
        ("vid_mode", ctypes.c_uint16),  # 0x1fa
        ("root_dev", ctypes.c_uint16),  # 0x1fc
        ("boot_flag", ctypes.c_uint16),  # 0x1fe
        ("jump", ctypes.c_uint16),  # 0x200
        ("header", ctypes.c_uint32),  # 0x202
        ("version", ctypes.c_uint16),  # 0x206
        ("realmode_swtch", ctypes.c_uint32),  # 0x208
        ("start_sys_seg", ctypes.c_uint16),  # 0x20c
        ("kernel_version", ctypes.c_uint16),  # 0x20e
        ("type_of_loader", ctypes.c_uint8),  # 0x210
        ("loadflags", ctypes.c_uint8),  # 0x211
        ("setup_move_size", ctypes.c_uint16),  # 0x212
        ("code32_start", ctypes.c_uint32),  # 0x214
        ("ramdisk_image", ctypes.c_uint32),  # 0x218
        ("ramdisk_size", ctypes.c_uint32),  # 0x21c
        ("bootsect_kludge", ctypes.c_uint32),  # 0x220
        ("heap_end_ptr", ctypes.c_uint16),  # 0x224
        ("ext_loader_ver", ctypes.c_uint8),  # 0x226
        ("ext_loader_type", ctypes.c_uint8),  # 0x227
        ("cmd_line_ptr", ctypes.c_uint32),  # 0x228
        ("initrd_addr_max", ctypes.c_uint32),  # 0x22c
        ("kernel_alignment", ctypes.c_uint32),  # 0x230
        ("relocatable_kernel", ctypes.c_uint8),  # 0x234
        ("min_alignment", ctypes.c_uint8),  # 0x235
        ("xloadflags", ctypes.c_uint16),  # 0x236
        ("cmdline_size", ctypes.c_uint32),  # 0x238
        ("hardware_subarch", ctypes.c_uint32),  # 0x23c
        ("hardware_subarch_data", ctypes.c_uint64),  # 0x240
        ("payload_offset", ctypes.c_uint32),  # 0x248
        ("payload_length", ctypes.c_uint32),  # 0x24c
        ("setup_data", ctypes.c_uint64),  # 0x250
        ("pref_address", ctypes.c_uint64),  # 0x258
        ("init_size", ctypes.c_uint32),  # 0x260
        ("handover_offset", ctypes.c_uint32),  # 0x264
        ("kernel_info_offset", ctypes.c_uint32),  # 0x268
    ]

    @property
    def version_str(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    def to_bytes(self) -> bytes:
        return bytes(self)


assert ctypes.sizeof(SetupHeader) == 0x26C - SETUP_HEADER_OFFSET == 123
assert SetupHeader.header.offset == 0x202 - SETUP_HEADER_OFFSET
assert SetupHeader.cmdline_size.offset == 0x238 - SETUP_HEADER_OFFSET
assert SetupHeader.pref_address.offset == 0x258 - SETUP_HEADER_OFFSET
assert SetupHeader.kernel_info_offset.offset == 0x268 - SETUP_HEADER_OFFSET
