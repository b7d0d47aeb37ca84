"""The layers of DESIGN.md hold: imports point downwards only, and no module imports itself back.

Every import in a file counts, at module level or inside a function (a lazy import
hides a cycle, it does not remove it). A package's own __init__ imports count as
edges of the package; the implicit parent-package import does not.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gradleak", "p2p", "attacker")

# layer -> the layers it may import (itself included)
ALLOWED = {
    "core": {"core"},
    "attacker": {"core", "attacker"},
    "p2p": {"core", "p2p"},
    "runtime": {"core", "attacker", "p2p", "runtime"},
    "top": {"core", "attacker", "p2p", "runtime", "top"},
}


def layer(module: str) -> str:
    if module == "gradleak.core" or module.startswith("gradleak.core."):
        return "core"
    if module == "gradleak.runtime" or module.startswith("gradleak.runtime."):
        return "runtime"
    if module.split(".")[0] in ("attacker", "p2p"):
        return module.split(".")[0]
    return "top"


def project_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "proto" in path.relative_to(ROOT).parts:
                continue  # generated protobuf code
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `module` imports anywhere in its file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports the module pkg.mod where one exists.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` of a module a.b.c
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def test_imports_point_downwards() -> None:
    bad = sorted(f"{m} ({layer(m)}) imports {d} ({layer(d)})"
                 for m, deps in graph().items() for d in deps if layer(d) not in ALLOWED[layer(m)])
    assert not bad, "\n".join(bad)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_pure_layers_import_no_machinery() -> None:
    """attacker/ and p2p/ protocol code stay free of Ray and Prometheus (gRPC only in p2p's wire)."""
    forbidden = {"attacker": ("ray", "grpc", "prometheus_client"), "p2p": ("ray", "prometheus_client"),
                 "core": ("ray", "grpc", "prometheus_client")}
    mods = project_modules()
    for m, path in mods.items():
        if layer(m) not in forbidden:
            continue
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        bad = {x for x in names if x.split(".")[0] in forbidden[layer(m)]}
        assert not bad, f"{m} imports {bad}"
