"""Build the C floor VMM, bench/kvm_floor.c, with gcc -O2 (cached like the guests).

    python3 -m bench.floor      # build (or find it cached), print the program's path

The benchmarks and tests/test_guests_floor.py call ``build_floor()``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from osvmm.errors import OsvmmError
from osvmm.guests.build import build_host_program

SOURCE = Path(__file__).resolve().parent / "kvm_floor.c"
CFLAGS = ("-std=gnu11", "-O2", "-Wall", "-Wextra", "-pthread")


def build_floor() -> Path:
    """The kvm_floor program, built from SOURCE on first use."""
    return build_host_program(SOURCE, CFLAGS, "floor")


def main() -> int:
    try:
        print(build_floor())
    except OsvmmError as e:
        print(f"osvmm: {e}", file=sys.stderr)
        return e.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
