"""Guest image loaders (ELF/PVH, vmlinux, bzImage) and the kernel command-line builder.

Each loader is one function from image bytes and guest memory to a
``LoadedImage`` (kind, entry, extent, and the Linux setup header when there is one).
"""

import importlib

# Each name is imported from its module when first used (PEP 562): importing one
# loader (``osvmm.loader.elf``) does not import the others (start-up time).
_HOMES = {
    "extract_vmlinux": "bzimage",
    "load_bzimage": "bzimage",
    "parse_setup_header": "bzimage",
    "Cmdline": "cmdline",
    "load_elf": "elf",
    "load_vmlinux": "elf",
    "place_initrd": "initrd",
    "KIND_ELF64": "result",
    "KIND_LINUX64": "result",
    "KIND_PVH": "result",
    "LoadedImage": "result",
    "read_image": "result",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


__all__ = [
    "KIND_ELF64",
    "KIND_LINUX64",
    "KIND_PVH",
    "Cmdline",
    "LoadedImage",
    "extract_vmlinux",
    "load_bzimage",
    "load_elf",
    "load_vmlinux",
    "parse_setup_header",
    "place_initrd",
    "read_image",
]
