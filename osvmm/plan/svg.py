"""``osvmm plan PLAN --svg FILE``: a picture of the placement, as SVG.

Per NUMA node a box: its cores, each a frame holding its SMT threads, each
thread a square filled with the colour of the partition that owns it (light
grey for the pool, where floating partitions run); under them the node's
memory as a bar split by partition, the rest free. Beside the nodes, a legend:
one row per partition (its colour, name, CPUs, vCPUs, memory and node), the
channels between partitions as labelled solid links, the doorbells as dashed
arrows. Pure: a function of the Assignment and the host topology, the same
values the text of ``osvmm plan`` shows (osvmm/plan/render.py). Every element
of the drawing carries ``data-*`` attributes naming what it is (a CPU, a
partition, a channel), for tests and for tools that read the picture.
"""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr

from osvmm.plan.config import format_cpu_list, format_size
from osvmm.plan.placement import Assignment
from osvmm.plan.render import human_size
from osvmm.plan.topology import HostTopology

PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
    "#393b79",
    "#637939",
)
FREE_FILL = "#e8e8e8"
CPU = 26  # the side of one thread's square
GAP = 6
CORES_PER_ROW = 8
NODE_PAD = 12
FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"


def colours(assignment: Assignment) -> dict[str, str]:
    """Partition name -> its colour, in plan order."""
    return {p.name: PALETTE[i % len(PALETTE)] for i, p in enumerate(assignment.partitions)}


def _text(x: float, y: float, text: str, size: int = 12, extra: str = "") -> str:
    return f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' {FONT}{extra}>{escape(text)}</text>"


def render_svg(assignment: Assignment, topology: HostTopology) -> str:
    """The SVG document of the placement."""
    colour = colours(assignment)
    owner = {c: p.name for p in assignment.partitions for c in p.cpus}
    body: list[str] = []
    y = 48
    node_width = 0
    threads = max((len(core) for core in topology.cores()), default=1)
    core_w = threads * CPU + (threads - 1) * 2 + 8
    for n, node in topology.nodes.items():
        cores = topology.cores(n)
        rows = max(1, -(-len(cores) // CORES_PER_ROW))
        width = 2 * NODE_PAD + min(len(cores), CORES_PER_ROW) * (core_w + GAP) - GAP
        width = max(width, 320)
        node_width = max(node_width, width)
        height = 28 + rows * (CPU + 8 + GAP) + 44
        body.append(
            f"<g data-node='{n}'><rect x='16' y='{y}' width='{width}' height='{height}' "
            "rx='8' fill='#fafafa' stroke='#555'/>"
        )
        body.append(
            _text(28, y + 18, f"node {n}: {human_size(node.mem_total)}", 13, " font-weight='bold'")
        )
        for i, core in enumerate(cores):
            cx = 16 + NODE_PAD + (i % CORES_PER_ROW) * (core_w + GAP)
            cy = y + 28 + (i // CORES_PER_ROW) * (CPU + 8 + GAP)
            body.append(
                f"<rect x='{cx}' y='{cy}' width='{core_w}' height='{CPU + 8}' rx='3' "
                "fill='none' stroke='#999'/>"
            )
            for j, cpu in enumerate(core):
                name = owner.get(cpu)
                fill = colour[name] if name else FREE_FILL
                tx = cx + 4 + j * (CPU + 2)
                who = quoteattr(name or "")
                body.append(
                    f"<rect data-cpu='{cpu}' data-owner={who} x='{tx}' y='{cy + 4}' "
                    f"width='{CPU}' height='{CPU}' fill='{fill}'><title>CPU {cpu}"
                    f"{': ' + escape(name) if name else ': pool'}</title></rect>"
                )
                ink = "#fff" if name else "#333"
                body.append(
                    _text(
                        tx + CPU / 2,
                        cy + 4 + CPU / 2 + 4,
                        str(cpu),
                        10,
                        f" text-anchor='middle' fill='{ink}'",
                    )
                )
        # memory bar
        by = y + height - 34
        bar = width - 2 * NODE_PAD
        body.append(
            f"<rect x='{16 + NODE_PAD}' y='{by}' width='{bar}' height='14' fill='{FREE_FILL}' "
            "stroke='#999'/>"
        )
        x = 16 + NODE_PAD
        total = max(node.mem_total, 1)
        for name, mem in assignment.memory_on(n):
            w = max(bar * mem / total, 2)
            body.append(
                f"<rect data-memory={quoteattr(name)} x='{x:.1f}' y='{by}' width='{w:.1f}' "
                f"height='14' fill='{colour[name]}'><title>{escape(name)}: "
                f"{format_size(mem)}</title></rect>"
            )
            x += w
        used = sum(m for _, m in assignment.memory_on(n))
        body.append(
            _text(
                16 + NODE_PAD,
                by + 28,
                f"memory: {human_size(used)} given, "
                f"{human_size(max(node.mem_total - used, 0))} free",
                11,
            )
        )
        body.append("</g>")
        y += height + 14
    nodes_bottom = y

    # legend: partitions, then channels and doorbells between their rows
    lx = 16 + node_width + 150  # room for the channels' links and names
    ly = 64
    row_y: dict[str, float] = {}
    body.append(_text(lx, ly - 10, "partitions", 13, " font-weight='bold'"))
    for p in assignment.partitions:
        cpus = format_cpu_list(p.cpus) if p.cpus else "floating"
        body.append(
            f"<g data-partition={quoteattr(p.name)}><rect x='{lx}' y='{ly}' width='18' "
            f"height='18' fill='{colour[p.name]}'/>"
        )
        body.append(_text(lx + 26, ly + 14, p.name, 13, " font-weight='bold'"))
        detail = f"CPUs {cpus}, {p.vcpus} vCPU, {format_size(p.memory)} on node {p.node}"
        body.append(_text(lx + 26, ly + 30, detail, 11, " fill='#444'") + "</g>")
        row_y[p.name] = ly + 9
        ly += 44
    link_x = lx - 12
    for k, ch in enumerate(assignment.plan.channels):
        members = [m for m, _ in ch.members if m in row_y]
        xk = link_x - 10 * k
        for a, b in zip(members, members[1:], strict=False):
            body.append(
                f"<path data-channel={quoteattr(ch.name)} d='M {lx} {row_y[a]} C {xk - 20} "
                f"{row_y[a]}, {xk - 20} {row_y[b]}, {lx} {row_y[b]}' fill='none' "
                "stroke='#333' stroke-width='2'/>"
            )
        if members:
            mid = sum(row_y[m] for m in members) / len(members)
            body.append(
                _text(
                    xk - 24,
                    mid,
                    f"{ch.name} ({format_size(ch.size)})",
                    10,
                    " text-anchor='end' fill='#333'",
                )
            )
    right = lx + 330
    for p in assignment.partitions:
        for target in p.spec.doorbells:
            if target in row_y:
                a, b = row_y[p.name], row_y[target]
                body.append(
                    f"<path data-doorbell={quoteattr(p.name + '->' + target)} d='M {right} {a} "
                    f"C {right + 40} {a}, {right + 40} {b}, {right + 4} {b}' fill='none' "
                    "stroke='#c33' stroke-dasharray='4 3' marker-end='url(#arrow)'/>"
                )
    if any(p.spec.doorbells for p in assignment.partitions):
        body.append(_text(right, 54, "doorbells", 11, " fill='#c33'"))

    title = f"osvmm plan {assignment.plan.source}: {topology.describe()}"
    width = max(right + 80, int(len(title) * 9) + 32)  # 14px bold: under 9 px a character
    height = max(nodes_bottom, ly) + 24
    head = [
        "<?xml version='1.0' encoding='UTF-8'?>",
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}'>",
        "<defs><marker id='arrow' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='6' "
        "markerHeight='6' orient='auto'><path d='M0,0 L10,5 L0,10 z' fill='#c33'/></marker>"
        "</defs>",
        f"<rect width='{width}' height='{height}' fill='#ffffff'/>",
        _text(
            16,
            26,
            title,
            14,
            " font-weight='bold'",
        ),
    ]
    return "\n".join(head + body + ["</svg>"]) + "\n"
