"""``osvmm plan PLAN --svg FILE``: the drawing holds every CPU with its owner,
every partition, channel and doorbell (read back as XML); written whole or not
at all; and rendered by headless Chromium it is a picture, not a blank page,
in which every partition's colour shows (decoded from the screenshot's PNG)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from collections import Counter

import pytest

from osvmm.plan.config import load_plan
from osvmm.plan.placement import place
from osvmm.plan.svg import FREE_FILL, colours, render_svg
from osvmm.plan.topology import read_topology
from tests.helpers import REPO, run_osvmm

SVG = "{http://www.w3.org/2000/svg}"
PLAN = REPO / "examples" / "opteron-8node.toml"
SYSFS = REPO / "tests" / "fixtures" / "sysfs" / "opteron-8node"


def drawing(plan=PLAN, sysfs=SYSFS):
    topology = read_topology(str(sysfs))
    assignment = place(load_plan(plan), topology)
    return assignment, topology, ET.fromstring(render_svg(assignment, topology))


def test_every_cpu_is_drawn_in_its_owners_colour():
    assignment, topology, root = drawing()
    owner = {c: p.name for p in assignment.partitions for c in p.cpus}
    colour = colours(assignment)
    cpus = {int(r.get("data-cpu")): r for r in root.iter(SVG + "rect") if r.get("data-cpu")}
    assert sorted(cpus) == sorted(topology.online)
    for cpu, rect in cpus.items():
        name = owner.get(cpu)
        assert rect.get("data-owner") == (name or "")
        assert rect.get("fill") == (colour[name] if name else FREE_FILL)
    assert len(set(colour.values())) == len(colour)  # one colour each


def test_partitions_memory_channels_and_doorbells_are_in_the_drawing():
    assignment, _, root = drawing()
    texts = [t.text for t in root.iter(SVG + "text")]
    for p in assignment.partitions:
        assert p.name in texts
        [bar] = [r for r in root.iter(SVG + "rect") if r.get("data-memory") == p.name]
        assert bar.get("fill") == colours(assignment)[p.name]
    paths = list(root.iter(SVG + "path"))
    for ch in assignment.plan.channels:
        assert any(x.get("data-channel") == ch.name for x in paths), ch.name
        assert any(t and t.startswith(ch.name + " (") for t in texts)
    bells = {x.get("data-doorbell") for x in paths if x.get("data-doorbell")}
    assert bells == {f"{p.name}->{t}" for p in assignment.partitions for t in p.spec.doorbells}


def test_smt_siblings_share_their_cores_frame():
    plan = REPO / "examples" / "two-partitions.toml"
    topology = read_topology(str(REPO / "tests" / "fixtures" / "sysfs" / "epyc-2s128t"))
    _, _, root = drawing(plan, REPO / "tests" / "fixtures" / "sysfs" / "epyc-2s128t")
    rects = {int(r.get("data-cpu")): r for r in root.iter(SVG + "rect") if r.get("data-cpu")}
    for core in topology.cores():
        ys = {rects[c].get("y") for c in core}
        xs = sorted(float(rects[c].get("x")) for c in core)
        assert len(ys) == 1 and all(b - a < 40 for a, b in zip(xs, xs[1:], strict=False))


def test_the_cli_writes_it_whole_or_says_why_not(tmp_path):
    out = tmp_path / "plan.svg"
    r = run_osvmm("plan", str(PLAN), "--host-sysfs", str(SYSFS), "--svg", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"host: ")  # the text as before
    assert ET.parse(out).getroot().tag == SVG + "svg"
    bad = tmp_path / "no" / "such" / "dir" / "plan.svg"
    r = run_osvmm("plan", str(PLAN), "--host-sysfs", str(SYSFS), "--svg", str(bad))
    assert r.returncode == 2
    why = "cannot write: No such file or directory"
    assert r.stderr == f"osvmm: error: --svg {bad}: {why}\n".encode()
    assert os.listdir(tmp_path) == ["plan.svg"]  # nothing half-written left behind


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(width, height, RGB pixels) of an 8-bit RGB or RGBA PNG, decoded with zlib."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, ctype, _, _, interlace = header
    assert depth == 8 and ctype in (2, 6) and interlace == 0, header
    bpp = 4 if ctype == 6 else 3
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        rows.append(line)
        prev = line
    pixels = [tuple(row[x * bpp : x * bpp + 3]) for row in rows for x in range(width)]
    return width, height, pixels


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (setup.sh installs it)")
def test_headless_chromium_draws_it(tmp_path):
    assignment, _, _ = drawing()
    svg = tmp_path / "plan.svg"
    r = run_osvmm("plan", str(PLAN), "--host-sysfs", str(SYSFS), "--svg", str(svg))
    assert r.returncode == 0, r.stderr
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,1100",
            svg.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 1100)
    counts = Counter(pixels)
    white = counts[(255, 255, 255)]
    assert white < 0.9 * len(pixels), "the screenshot is (nearly) blank"
    assert len(counts) > 50  # text, frames, fills: not one flat colour
    for name, hexcolour in colours(assignment).items():
        rgb = tuple(int(hexcolour[i : i + 2], 16) for i in (1, 3, 5))
        assert counts[rgb] > 100, f"{name}'s colour {hexcolour} is not in the picture"
