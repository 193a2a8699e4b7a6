"""Imports point one way, as docs/development.md declares; no module imports another that imports it back.

The declaration is one line of docs/development.md's Layout section, read here:
"Imports point one way: `a`, `b` ← `c` ← ...": a room (a sub-package of moe_dist, or a top-level module) may
import itself and the rooms to its left, never one to its right. Every import counts, at module level or inside
a function (a function-level import hides an arrow, it does not remove it).
"""

import ast
import re

import pytest
from launcher import ROOT

PACKAGE = ROOT / "moe_dist"


def declared_order() -> list[list[str]]:
    guide = (ROOT / "docs" / "development.md").read_text()
    line = re.search(r"^Imports point one way: (.+?)(?:\.|$)", guide, re.M)
    assert line, "docs/development.md declares no import order ('Imports point one way: ...')"
    return [re.findall(r"`([\w.]+)`", level) for level in line.group(1).split("←")]


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path) -> set[str]:
    """Every moe_dist module `path` imports, resolved to a module (a name imported from a package that is
    a module of it counts as that module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if _exists(sub) else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "moe_dist" or m.startswith("moe_dist.")}


def _exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "moe_dist"


GRAPH = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def level_of() -> dict[str, int]:
    return {name: i for i, level in enumerate(declared_order()) for name in level}


def test_every_room_of_the_package_is_declared():
    levels = level_of()
    undeclared = sorted({room(m) for m in GRAPH} - set(levels) - {"moe_dist"})
    assert not undeclared, f"docs/development.md's import order does not place {undeclared}"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_points_up(module):
    levels = level_of()
    levels.setdefault("moe_dist", levels["model"])  # the package's __init__ registers the model, nothing more
    up = sorted(t for t in GRAPH[module] if levels.get(room(t), -1) > levels.get(room(module), -1))
    assert not up, f"{module} (room {room(module)!r}) imports {up}, above it in docs/development.md's order"


def test_no_import_cycle():
    seen, stack, cycles = set(), [], []

    def visit(module):
        if module in stack:
            cycles.append(stack[stack.index(module) :] + [module])
            return
        if module in seen:
            return
        seen.add(module)
        stack.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if target != module and not module.startswith(target + "."):  # a module's own package __init__
                visit(target)
        stack.pop()

    for module in sorted(GRAPH):
        visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
