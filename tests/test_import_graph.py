"""The package's import graph has no cycles, and the layers point one way.

Every ``import osvmm...`` and ``from osvmm... import ...`` in the package is an
edge, including imports inside functions (a lazy import hides a cycle, it does
not remove it). docs/developing.md says how to run this check alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "osvmm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from pkg import submodule`` depends on the submodule (every
                # submodule import runs its parents' __init__ first, in any case).
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("osvmm"):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_point_down():
    """Nothing imports the CLI; boot/ never sees a partition or a VMM; vmm/ never
    sees the many-partition layer; the KVM binding imports nothing above it."""
    graph = import_graph()
    for name, deps in graph.items():
        assert "osvmm.cli" not in deps, f"{name} imports the CLI"
        if name.startswith(("osvmm.boot", "osvmm.loader", "osvmm.arch", "osvmm.machine")):
            # pure: the KVM structure mirrors (data) at most, no VM and no partition
            bad = {
                d
                for d in deps
                if d.startswith(("osvmm.vmm", "osvmm.up", "osvmm.kvm")) and d != "osvmm.kvm.structs"
            }
            assert not bad, f"{name} (pure) imports {bad}"
        if name.startswith("osvmm.vmm"):
            bad = {
                d for d in deps if d.startswith(("osvmm.up", "osvmm.hypercall", "osvmm.writemon"))
            }
            assert not bad, f"{name} (one partition) imports {bad}"
        if name.startswith("osvmm.snapshot"):
            # the snapshot format and memory images: pure, below vmm/
            bad = {
                d
                for d in deps
                if not d.startswith(("osvmm.snapshot", "osvmm.errors", "osvmm.arch"))
            }
            assert not bad, f"{name} (the snapshot format) imports {bad}"
        if name.startswith("osvmm.kvm"):
            bad = {d for d in deps if not d.startswith(("osvmm.kvm", "osvmm.errors"))}
            assert not bad, f"{name} (the KVM binding) imports {bad}"
