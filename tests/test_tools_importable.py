"""`tools/` and `launch/` stand on the installed package: no `sys.path` edits, importable, runnable from anywhere.

The scripts used to put the repository root (and, through it, each other) on `sys.path`. Now
shared helpers live in `moe_dist.analysis.bench` and `moe_dist` comes from the installation, so a
script's imports mean what they say wherever it is run from.
"""

import ast
import importlib
import subprocess
import sys

import pytest
from launcher import ROOT

SCRIPTS = sorted([*(ROOT / "tools").glob("*.py"), *(ROOT / "launch").glob("*.py")])
TOOLS = sorted(p for p in SCRIPTS if p.parent.name == "tools")
# Every list method that changes the list: `sys.path.index(...)` and friends only read it.
SYS_PATH_METHODS = {
    "insert",
    "append",
    "extend",
    "remove",
    "pop",
    "clear",
    "sort",
    "reverse",
    "__setitem__",
    "__iadd__",
}


def _aliases(tree: ast.AST) -> dict[str, set[str]]:
    """The names bound to `sys`, `sys.path`, `site` and `site.addsitedir` by the file's imports."""
    names = {"sys": {"sys"}, "sys.path": set(), "site": set(), "site.addsitedir": set()}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in ("sys", "site"):
                    names[alias.name].add(alias.asname or alias.name)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in ("sys.path", "site.addsitedir"):
                    names[f"{node.module}.{alias.name}"].add(alias.asname or alias.name)
    return names


def sys_path_edits(source: str) -> list[str]:
    """`line: code` for every statement that changes `sys.path` or calls `site.addsitedir`.

    Parsed, not grepped: a comment or docstring that mentions `sys.path.insert` is no edit.
    Aliases count too (`import sys as s`, `from sys import path`, `from site import addsitedir`).
    """
    tree = ast.parse(source)
    names = _aliases(tree)

    def names_a(expr, module: str, attr: str) -> bool:  # `module.attr` or a name imported as it
        if isinstance(expr, ast.Name):
            return expr.id in names[f"{module}.{attr}"]
        return (
            isinstance(expr, ast.Attribute)
            and expr.attr == attr
            and isinstance(expr.value, ast.Name)
            and expr.value.id in names[module]
        )

    def is_sys_path(expr) -> bool:
        return names_a(expr, "sys", "path")

    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        else:
            targets = []
        # sys.path = [...], sys.path += [...], sys.path[0:0] = [...], del sys.path[0]
        edited = any(is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)) for t in targets)
        if isinstance(node, ast.Call):
            f = node.func
            edited = (isinstance(f, ast.Attribute) and f.attr in SYS_PATH_METHODS and is_sys_path(f.value)) or names_a(
                f, "site", "addsitedir"
            )
        if edited:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize(
    "source, edits",
    [
        ("import sys\nsys.path.insert(0, 'x')", 1),
        ("import sys\nsys.path.append('x')\nsys.path[0] = 'y'\nsys.path += ['z']", 3),
        ("import sys as s\ns.path.extend(['x'])", 1),
        ("import sys\nsys.path[0:0] = ['x']\ndel sys.path[0]", 2),
        ("from sys import path\npath.insert(0, 'x')", 1),
        ("import site\nsite.addsitedir('x')", 1),
        ("from site import addsitedir as add\nadd('x')", 1),
        ("import sys\n# sys.path.insert(0, 'x')\n'''sys.path.append(1)'''\nprint(sys.path[0])", 0),
        ("import os\nos.path.join('a', 'b')", 0),
    ],
)
def test_the_checker_finds_edits_and_ignores_comments_strings_and_reads(source, edits):
    assert len(sys_path_edits(source)) == edits


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_sys_path_manipulation_in_tools_or_launch(path):
    edits = sys_path_edits(path.read_text())
    assert not edits, f"{path.relative_to(ROOT)} edits sys.path (import from the installed moe_dist instead): {edits}"


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.stem)
def test_tool_imports_as_a_module(path):
    """Importing runs no tool: tests and notebooks can use a tool's functions (conftest puts the root on sys.path)."""
    module = importlib.import_module(f"tools.{path.stem}")
    assert callable(module.main)


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.stem)
def test_tool_help_runs_from_outside_the_checkout(path, tmp_path):
    """`python tools/X.py --help` from another folder: every import resolves through the installed package."""
    proc = subprocess.run(
        [sys.executable, str(path), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "usage:" in proc.stdout
