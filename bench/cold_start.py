"""Cold start: whole-process wall time and peak RSS of ``osvmm run`` against QEMU.

Both boot the bundled hello guest (PVH ELF, one line from CPL3, debug exit 0)
from its image path, so the guest build cache check of ``guests:hello`` is not
timed. Each run is one whole process: fork+exec to reaped, its peak RSS from
wait4's rusage. The runs alternate osvmm, QEMU, osvmm, ... so drift on this
shared machine falls on both alike.

Python's part is shown apart, measured the same way in the same run:
``python3 -c pass`` (the interpreter alone), ``python3 -c "import osvmm.cli"``
(plus the ``osvmm`` module) and ``python3 -m osvmm.cli run --help`` (plus the
argument parser of ``run``: osvmm imports only the chosen subcommand's module).

Peak RSS: a child spawned straight from this (large) Python process would
report at least this process's own RSS, because Linux carries the old mm's
high-water mark across exec into ru_maxrss (and subprocess uses vfork). So
each command runs under ``peak``, a 30-line C program compiled once into the
osvmm cache: it forks and execs the command, and reports the command's wall
time (CLOCK_MONOTONIC) and wait4 ru_maxrss, as GNU time does.

Bytecode: the child processes run without PYTHONDONTWRITEBYTECODE and one
untimed warm-up run of each command comes first, so the .pyc files exist, as
after ``pip install`` (which compiles them). Goal: within 2x of QEMU.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import REPO, Figure, Sample
from osvmm.guests.build import QEMU_MICROVM

QEMU = list(QEMU_MICROVM)

HELLO_STATUS = 1  # debug exit value 0 -> process status (0 << 1) | 1


def child_env() -> dict:
    """The environment of the timed children: the repo importable, bytecode cached."""
    e = dict(os.environ)
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


PEAK_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/wait.h>
/* peak OUTFILE CMD...: run CMD; write "<wait status> <ru_maxrss KiB> <wall ns>" to OUTFILE */
int main(int argc, char **argv)
{
	struct timespec t0, t1;
	struct rusage ru;
	int status;
	if (argc < 3)
		return 2;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	pid_t pid = fork();
	if (pid == 0) {
		execvp(argv[2], argv + 2);
		_exit(127);
	}
	if (pid < 0 || wait4(pid, &status, 0, &ru) != pid)
		return 2;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	FILE *f = fopen(argv[1], "w");
	if (!f)
		return 2;
	fprintf(f, "%d %ld %lld\n", status, ru.ru_maxrss,
		(long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
	return fclose(f) ? 2 : 0;
}
"""


def build_peak() -> Path:
    """Compile PEAK_C once (cached by its hash); return the program's path."""
    from osvmm.guests.build import cache_root, find_compiler

    cc = find_compiler()
    digest = hashlib.sha256((cc + "\0" + PEAK_C).encode()).hexdigest()[:16]
    prog = cache_root() / "bench" / digest / "peak"
    if not prog.exists():
        prog.parent.mkdir(parents=True, exist_ok=True)
        src = prog.with_suffix(".c")
        src.write_text(PEAK_C)
        tmp = prog.with_suffix(f".tmp{os.getpid()}")
        subprocess.run([cc, "-O2", "-o", str(tmp), str(src)], check=True)
        os.replace(tmp, prog)
    return prog


def run_once(peak: Path, cmd: list[str], expect_status: int = 0) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one whole process, measured by ``peak``."""
    with tempfile.NamedTemporaryFile("r", prefix="osvmm-peak-") as report:
        proc = subprocess.run(
            [str(peak), report.name, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        fields = report.read().split()
    if proc.returncode != 0 or len(fields) != 3:
        raise RuntimeError(f"peak {' '.join(cmd)}: no report (status {proc.returncode})")
    status, rss_kib, wall_ns = (int(x) for x in fields)
    code = os.waitstatus_to_exitcode(status)
    if code != expect_status:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"{' '.join(cmd)} exited {code}, expected {expect_status}: {tail[0]}")
    return wall_ns / 1e9, rss_kib


def commands(image: str) -> dict[str, tuple[list[str], int]]:
    """name -> (command, expected exit status)."""
    py = sys.executable
    cmds = {
        "osvmm": ([py, "-m", "osvmm.cli", "run", image], HELLO_STATUS),
        "python": ([py, "-c", "pass"], 0),
        "import": ([py, "-c", "import osvmm.cli"], 0),
        "parser": ([py, "-m", "osvmm.cli", "run", "--help"], 0),
    }
    if shutil.which(QEMU[0]):
        cmds["qemu"] = ([*QEMU, "-kernel", image], HELLO_STATUS)
    return cmds


def measure(cmds: dict, repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """name -> (wall ms per run, peak RSS MiB per run), runs interleaved."""
    peak = build_peak()
    for cmd, status in cmds.values():  # warm-up: page cache, .pyc files
        run_once(peak, cmd, status)
    out = {name: ([], []) for name in cmds}
    for _ in range(repeats):
        for name, (cmd, status) in cmds.items():
            wall, rss = run_once(peak, cmd, status)
            out[name][0].append(wall * 1e3)
            out[name][1].append(rss / 1024)
    return out


def figures(m: dict) -> list[Figure]:
    """Figures from measure()'s result (QEMU may be absent)."""
    wall = {k: Sample.of(v[0]) for k, v in m.items()}
    rss = {k: Sample.of(v[1]) for k, v in m.items()}
    has_qemu = "qemu" in m
    # Each part is the median of per-round differences (the runs of one round are
    # back to back), which drift on a shared machine disturbs less than medians would.
    w = {k: v[0] for k, v in m.items()}

    def part(a: str, b: str) -> float:
        return statistics.median(x - y for x, y in zip(w[a], w[b], strict=True))

    share = (
        f"of the median {wall['osvmm'].median:.0f} ms: interpreter {wall['python'].median:.0f} ms,"
        f" importing osvmm.cli {part('import', 'python'):.0f} ms, building the `run` parser "
        f"{part('parser', 'import'):.0f} ms, the run itself (importing the VMM, VM, load, "
        f"guest, teardown) {part('osvmm', 'parser'):.0f} ms (medians of per-round differences)"
    )
    cold = Figure(
        "cold start: `osvmm run` hello guest, wall",
        "ms",
        wall["osvmm"],
        "QEMU microvm" if has_qemu else None,
        wall["qemu"] if has_qemu else None,
        goal="<= 2x QEMU",
        notes=share,
    )
    if has_qemu:
        cold.met = cold.ratio <= 2.0
    mem = Figure(
        "cold start: `osvmm run` hello guest, peak RSS",
        "MiB",
        rss["osvmm"],
        "QEMU microvm" if has_qemu else None,
        rss["qemu"] if has_qemu else None,
        notes=f"`python3 -c pass` alone peaks at {rss['python'].median:.1f} MiB",
    )
    figs = [cold, mem]
    for key, label in (
        ("python", "interpreter start-up: `python3 -c pass`"),
        ("import", 'interpreter + `python3 -c "import osvmm.cli"`'),
        ("parser", "interpreter + `osvmm run --help` (its parser built)"),
    ):
        base = wall["qemu"] if has_qemu else None
        figs.append(Figure(label, "ms", wall[key], "QEMU whole run" if has_qemu else None, base))
    return figs


def run(repeats: int = 10) -> list[Figure]:
    from osvmm.guests.build import guest_path

    return figures(measure(commands(str(guest_path("hello"))), repeats))


if __name__ == "__main__":
    for fig in run(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
        print(fig.name, fig.value, fig.baseline, fig.ratio, fig.notes)
