"""Golden bytes: the tables of one fixed plan must not change by accident.

The plan: 256 MiB, two vCPUs with APIC IDs 0 and 1, two NUMA nodes (see
tests/golden_gen.py). After an intended change, regenerate with

    python3 -m tests.golden_gen tests/golden

and review the difference (``iasl -d`` of old and new tables) before committing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.golden_gen import golden_files

GOLDEN_DIR = Path(__file__).parent / "golden"
FILES = golden_files()


def test_every_golden_file_is_generated():
    on_disk = {p.name for p in GOLDEN_DIR.glob("*.bin")}
    assert on_disk == set(FILES)
    assert {"mptable.bin", "zero_page.bin", "acpi-rsdp.bin", "acpi-dsdt.bin"} <= on_disk
    assert {"acpi-srat.bin", "acpi-slit.bin"} <= on_disk  # the plan has two nodes


@pytest.mark.parametrize("name", sorted(FILES))
def test_matches_golden(name):
    expected = (GOLDEN_DIR / name).read_bytes()
    actual = FILES[name]
    if actual != expected:
        first = next(
            (i for i, (a, b) in enumerate(zip(actual, expected, strict=False)) if a != b),
            min(len(actual), len(expected)),
        )
        pytest.fail(
            f"{name} differs from tests/golden/{name} at byte {first:#x} "
            f"(lengths {len(actual)} vs {len(expected)}); if intended, run "
            "`python3 -m tests.golden_gen tests/golden`"
        )
