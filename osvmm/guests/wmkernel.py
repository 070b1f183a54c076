"""What the bundled wmkernel guest (src/wmkernel.c) is written for: its protected
data, the words each domain may write, and the plan table that says so.

The tests (tests/wmkernel.py replays the guest's writes) and the benchmarks
(bench/write_monitor.py) read these; docs/write-monitor.md shows the table.
"""

from __future__ import annotations

from osvmm.writemon.spec import ProtectSpec, parse_protect

WIN_START, WIN_END = 0x3FF000, 0x404000
PROTECTED = ((0x400000, 0x400800), (0x400900, 0x402800))
DRIVER_GRANTS = ((0x400100, 0x400110), (0x401FF8, 0x402008))
KERNEL_GRANTS = ((0x400200, 0x400400), (0x402100, 0x402200))
BOUNDARIES = (
    0x400000, 0x400100, 0x400110, 0x400200, 0x400400, 0x400800, 0x400900, 0x401000,
    0x401FF8, 0x402000, 0x402008, 0x402100, 0x402200, 0x402800, 0x403000,
)  # fmt: skip


def _spans(spans) -> list[str]:
    return [f"{s:#x}..{e:#x}" for s, e in spans]


def protect_table(policy: str = "deny", arm: str = "boot") -> dict:
    """The ``[partition.protect]`` table for wmkernel (symbols from its own ELF)."""
    return {
        "policy": policy,
        "arm": arm,
        "ranges": _spans(PROTECTED),
        "domains": {
            "kernel": ["_text..__driver_start", "__driver_end.._etext"],
            "driver": ["__driver_start..__driver_end"],
        },
        "grants": {"driver": _spans(DRIVER_GRANTS), "kernel": _spans(KERNEL_GRANTS)},
    }


def protect_toml(policy: str = "deny", arm: str = "boot") -> str:
    t = protect_table(policy, arm)
    return f"""
[partition.protect]
policy = "{policy}"
arm = "{arm}"
ranges = {t["ranges"]!r}
domains = {{ kernel = {t["domains"]["kernel"]!r}, driver = {t["domains"]["driver"]!r} }}
grants = {{ driver = {t["grants"]["driver"]!r}, kernel = {t["grants"]["kernel"]!r} }}
""".replace("'", '"')


def protect_spec(policy: str = "deny", arm: str = "boot") -> ProtectSpec:
    return parse_protect(protect_table(policy, arm), "wmkernel")
