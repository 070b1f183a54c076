"""Smoke tests of bench/: the modules import, figures are derived right from
synthetic measurements, and bench.run writes its JSON and markdown. No
benchmark is run here (figures are not tests)."""

from __future__ import annotations

import importlib
import json
import os
import sys
import types

import pytest

from bench import cold_start, partitions_memory
from bench import run as bench_run
from bench.common import Figure, Sample


@pytest.mark.parametrize("name", sorted(bench_run.BENCHMARKS))
def test_every_registered_benchmark_imports_and_has_run(name):
    module, quick = bench_run.BENCHMARKS[name]
    mod = importlib.import_module(module)
    assert callable(mod.run)
    assert isinstance(quick, dict)


def _fake_figures():
    met = Figure("fast thing", "ms", Sample.of([1.0, 2.0, 3.0]), "QEMU", Sample.of([4.0]), "< 2x")
    met.met = True
    missed = Figure("slow thing", "us", Sample.of([2500.0]), goal="< 1 us", notes="why it missed")
    missed.met = False
    return [met, missed]


def test_run_main_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    fake = types.ModuleType("bench_fake_module")
    calls = []

    def fake_run(**kwargs):
        calls.append(kwargs)
        return _fake_figures()

    fake.run = fake_run
    monkeypatch.setitem(sys.modules, "bench_fake_module", fake)
    monkeypatch.setattr(bench_run, "BENCHMARKS", {"fake": ("bench_fake_module", {"repeats": 1})})

    assert bench_run.main(["--quick", "--out", str(tmp_path)]) == 0
    assert calls == [{"repeats": 1}]

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["machine"] == bench_run.machine()
    names = [f["name"] for f in data["figures"]]
    assert names == ["fast thing", "slow thing"]
    first = data["figures"][0]
    assert first["value"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert first["ratio"] == pytest.approx(0.5)
    assert data["figures"][1]["ratio"] is None

    md = (tmp_path / "results.md").read_text()
    assert md == capsys.readouterr().out.rstrip("\n") + "\n"
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[2] == "| fast thing | 2 ms [1, 3] | QEMU: 4 ms [4, 4] | 0.50x | < 2x (met) |"
    assert rows[3] == "| slow thing | 2,500 us [2,500, 2,500] |  |  | < 1 us (missed) |"
    assert "- slow thing: why it missed" in md


def test_cold_start_figures_split_python_share():
    m = {
        "osvmm": ([150.0, 140.0, 160.0], [19.0, 19.0, 19.0]),
        "python": ([40.0, 40.0, 40.0], [13.0, 13.0, 13.0]),
        "import": ([45.0, 45.0, 45.0], [14.0, 14.0, 14.0]),
        "parser": ([90.0, 90.0, 90.0], [16.0, 16.0, 16.0]),
        "qemu": ([60.0, 60.0, 60.0], [39.0, 39.0, 39.0]),
    }
    figs = cold_start.figures(m)
    wall, rss = figs[0], figs[1]
    assert wall.value.median == 150.0 and wall.ratio == pytest.approx(2.5)
    assert wall.met is False
    assert "interpreter 40 ms" in wall.notes and "the run itself" in wall.notes
    assert "60 ms" in wall.notes  # 150 - 90: what is osvmm's own
    assert rss.ratio == pytest.approx(19 / 39)
    assert [f.value.median for f in figs[2:]] == [40.0, 45.0, 90.0]


def test_cold_start_without_qemu_has_no_verdict():
    m = {k: ([10.0], [1.0]) for k in ("osvmm", "python", "import", "parser")}
    figs = cold_start.figures(m)
    assert figs[0].baseline is None and figs[0].met is None


def test_partitions_memory_per_extra_partition():
    osv = {1: [(16.0, 20.0)], 2: [(16.2, 20.3)], 4: [(16.6, 20.9)], 8: [(17.4, 22.0)]}
    qem = {1: [(35.0, 40.0)], 2: [(52.0, 80.0)], 4: [(86.0, 160.0)], 8: [(154.0, 320.0)]}
    nothp = {1: [(14.0, 18.0)], 8: [(15.4, 19.5)]}
    figs = partitions_memory.figures(osv, qem, nothp)
    assert len(figs) == 6
    assert figs[-1].value.median == pytest.approx(0.2) and figs[-1].met is True
    assert figs[3].value.median == 17.4 and figs[3].baseline.median == 154.0
    extra = figs[-2]
    assert extra.value.median == pytest.approx(0.2)
    assert extra.baseline.median == pytest.approx(17.0)
    assert extra.met is True


def test_partitions_plan_has_n_partitions_and_thp_switch():
    text = partitions_memory.plan_text(3, "/x.elf", "/tmp/s.sock", "/tmp/l", thp=False)
    assert text.count("[[partition]]") == 3 and text.count("hugepages = false") == 3
    assert "hugepages" not in partitions_memory.plan_text(2, "/x.elf", "/s", "/l")


def test_smaps_rollup_reads_this_process():
    roll = partitions_memory.smaps_rollup(os.getpid())
    assert roll["Rss"] > 0 and 0 < roll["Pss"] <= roll["Rss"]


def test_rig_devices_reads_the_tools_lines_and_makes_ratios():
    from bench.rig_devices import figures_of, parse

    guest = "noise\nBENCH iobench seqread 1048576 1 0.5\nBENCH iobench seqwrite 1048576 1 1.0\n"
    guest += "iobench randread 4096 1 1.0\nBENCH iobench randread 409600 100 2.0\n"
    results = {
        "osvmm": parse(guest, prefix="BENCH"),
        "host": parse(
            "iobench seqread 1048576 1 0.25\niobench seqwrite 1048576 1 0.5\n"
            "iobench randread 409600 100 1.0\n"
        ),
    }
    assert results["osvmm"]["randread"] == (409600, 100, 2.0)  # the unprefixed line not taken
    figs = {f.name.split(":")[0]: f for f in figures_of(results)}
    assert figs["sequential read, 1 MiB requests"].value.median == 2.0  # MiB/s
    assert figs["random 4 KiB reads"].value.median == 50.0  # IOPS
    assert all(f.ratio == 0.5 for f in figs.values())


def test_rig_devices_p2p_takes_only_a_whole_transfer():
    from bench.rig_devices import P2P_MIB, p2p_rate

    n = P2P_MIB << 20
    sender = "P2P sent abc\r\nP2P sendtime 10.00 12.00\nP2P tcp 1452 0\n"
    receiver = f"boot noise\nP2P recv {n} abc 20.00 22.00\n"
    rate, secs, tcp = p2p_rate(sender, receiver, "t")
    assert (secs, tcp) == (2.0, "1452 0") and rate == P2P_MIB / 2.0
    for bad in (f"P2P recv {n - 1} abc 20.00 22.00", f"P2P recv {n} abd 20.00 22.00", ""):
        with pytest.raises(RuntimeError, match="no whole transfer"):
            p2p_rate(sender, bad, "t")


def test_rig_devices_only_refuses_an_unknown_part(capsys):
    from bench.rig_devices import main

    with pytest.raises(SystemExit) as e:
        main(["--only", "p2p,bogus"])
    assert e.value.code == 2 and "bogus" in capsys.readouterr().err
