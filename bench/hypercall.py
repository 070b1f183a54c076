"""Hypercalls, doorbells and channels, in one osvmm process (osvmm/hypercall/live.py).

- hypercall round trip: the hcloop guest makes N hypercalls from CPL3
  (CONSOLE_WRITE of 0 bytes: the whole dispatch and every check, no effect);
  baseline: the same guest's N bare port-I/O exits (`outb` to port 0x80), in
  the same VMM, the same run, interleaved with the hypercalls in blocks of 500
  (hcloop port=2), so a busy host slows both alike. Goal: within 1.2x of that
  floor. Such a call changes nothing and takes no lock; beside it, the same with
  PARTITION_INFO (hcloop call=1), whose answer is written into the guest under
  the monitor's lock.
- ping-pong: two partitions, one channel, doorbells both ways; one round is
  a write, a DOORBELL hypercall, the peer's echo and its DOORBELL back.
- streaming: ping pushes M MiB through the channel's ring (rep movsb in, pong
  copies out, no hypercall in the loop); baseline: the host's memcpy of the same
  slot size. Goal: at least 80% of memcpy.
Every figure is timed by the guest's TSC (calibrated against the PIT), so
VMM start-up is not in it.
"""

from __future__ import annotations

import ctypes
import re
import time

from bench.common import Figure, Sample

MiB = 1 << 20


def _run(parts, channels=(), timeout: float = 120) -> dict[str, str]:
    """Run (name, guest, cmdline, doorbells) partitions to their end; their consoles."""
    from osvmm.guests.build import guest_path
    from osvmm.up.group import Member, PartitionGroup

    out: dict[str, list[bytes]] = {name: [] for name, _, _, _ in parts}
    members = [
        Member(n, str(guest_path(g)), c, 64 * MiB, doorbells=tuple(d), console=out[n].append)
        for n, g, c, d in parts
    ]
    group = PartitionGroup(members, channels)
    try:
        group.start()
        for name in group.parts:
            if group.wait(name, timeout) is None:
                raise RuntimeError(f"{name} did not finish in {timeout} s")
    finally:
        group.close()
    return {name: b"".join(chunks).decode(errors="replace") for name, chunks in out.items()}


def _field(text: str, pattern: str) -> float:
    m = re.search(pattern, text)
    if m is None:
        raise RuntimeError(f"no {pattern!r} in {text!r}")
    return float(m.group(1))


def hypercall_vs_floor(n: int, repeats: int, call: int = 0) -> tuple[Sample, Sample]:
    """us per hypercall and per bare exit, from runs of hcloop port=2: the two
    loops interleaved in blocks of 500 in one guest, so both see the same load.
    ``call``: 0 for CONSOLE_WRITE of 0 bytes, 1 for PARTITION_INFO into 64 bytes."""
    hcs, floors = [], []
    want = 0 if call == 0 else 40  # PARTITION_INFO: its header, no channel
    for _ in range(repeats):
        out = _run([("loop", "hcloop", f"iters={n} port=2 call={call}", ())])["loop"]
        if _field(out, r"last result (-?\d+)") != want:
            raise RuntimeError(f"hcloop call={call}: the hypercall failed: {out!r}")
        hcs.append(_field(out, r"hcloop: \d+ calls, (\d+) ns each") / 1000)
        floors.append(_field(out, r"hcloop: \d+ bare exits, (\d+) ns each") / 1000)
    return Sample.of(hcs), Sample.of(floors)


def ping_pong(rounds: int, stream_mib: int, repeats: int, slot_kib: int = 256):
    from osvmm.hypercall.monitor import ChannelConfig

    chan = ChannelConfig("link", 4 * MiB + 4096, {"ping": "rw", "pong": "rw"})
    rtts, rates = [], []
    for _ in range(repeats):
        out = _run(
            [
                ("ping", "ping", f"rounds={rounds} stream={stream_mib} slot={slot_kib}", ("pong",)),
                ("pong", "pong", "", ("ping",)),
            ],
            [chan],
        )
        rtts.append(_field(out["ping"], r"ns_per_round=(\d+)") / 1000)
        rates.append(_field(out["ping"], r"MBps=(\d+)"))
        if _field(out["ping"], r"bad=(\d+)"):
            raise RuntimeError("the stream arrived damaged")
    return Sample.of(rtts), Sample.of(rates)


def host_memcpy(slot_kib: int, total_mib: int, repeats: int) -> Sample:
    """MB/s of the host's memcpy (libc, through ctypes.memmove) in slot-size copies."""
    size = slot_kib << 10
    src = (ctypes.c_char * size)()
    dst = (ctypes.c_char * size)()
    ctypes.memset(src, 7, size)
    count = max(1, (total_mib * MiB) // size)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(count):
            ctypes.memmove(dst, src, size)
        rates.append(count * size / (time.perf_counter() - t0) / 1e6)
    return Sample.of(rates)


def run(n: int = 20000, rounds: int = 1000, stream_mib: int = 256, repeats: int = 3):
    hc, floor = hypercall_vs_floor(n, repeats)
    info, info_floor = hypercall_vs_floor(n, repeats, call=1)
    rtt, stream = ping_pong(rounds, stream_mib, repeats)
    memcpy = host_memcpy(256, stream_mib, repeats)
    round_trip = Figure(
        "hypercall round trip (CONSOLE_WRITE 0 bytes, CPL3)",
        "us",
        hc,
        "bare port-I/O exit (outb 0x80), same VMM",
        floor,
        goal="<= 1.2x the floor",
        notes="a call that changes nothing and has no effect: it takes no lock",
    )
    with_effect = Figure(
        "hypercall round trip with an effect (PARTITION_INFO into 64 bytes, CPL3)",
        "us",
        info,
        "bare port-I/O exit (outb 0x80), same VMM",
        info_floor,
        notes="its answer written into the guest's memory, under the monitor's lock",
    )
    ping = Figure(
        "doorbell ping-pong round trip over a channel",
        "us",
        rtt,
        "2x the hypercall round trip",
        Sample(2 * hc.median, 2 * hc.min, 2 * hc.max, hc.n),
        notes="a round is two DOORBELL hypercalls, two MSIs and two polls of the channel",
    )
    streaming = Figure(
        "channel streaming (256 KiB slots, rep movsb in and out)",
        "MB/s",
        stream,
        "host memcpy, 256 KiB copies",
        memcpy,
        goal=">= 0.8x memcpy",
    )
    round_trip.met = round_trip.ratio <= 1.2
    streaming.met = streaming.ratio >= 0.8
    return [round_trip, with_effect, ping, streaming]
