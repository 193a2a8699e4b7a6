"""The package stays navigable: the size limits of docs/design.md#code-conventions, and the layout table
(docs/development.md) is the tree."""

import ast
import re

import pytest
from launcher import ROOT

PACKAGE = ROOT / "moe_dist"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 60, 150


def _definitions(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node, node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_over_60_lines_and_no_class_over_150(path):
    too_long = [
        f"{node.name} ({lines} lines)"
        for node, lines in _definitions(path)
        if lines > (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES)
    ]
    assert not too_long, f"{path.relative_to(ROOT)}: split {', '.join(too_long)}"


def _layout_rows() -> list[list[str]]:
    """The '## Layout' table of docs/development.md: per row, the paths of its first column, from the root.

    A row may name several files of one folder: "`moe_dist/train/args.py`, `plan.py`" means both
    are in moe_dist/train/.
    """
    guide = (ROOT / "docs" / "development.md").read_text()
    section = guide.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        names = re.findall(r"`([^`]+)`", line.split("|")[1])
        folder = names[0].rsplit("/", 1)[0] + "/" if "/" in names[0].rstrip("/") else ""
        rows.append([names[0]] + [n if "/" in n else folder + n for n in names[1:]])
    return rows


def test_every_path_in_the_layout_table_exists():
    missing = [p for row in _layout_rows() for p in row if not (ROOT / p).exists()]
    assert not missing, f"the layout table names paths that do not exist: {missing}"


def test_every_module_of_the_package_is_in_the_layout_table():
    named = {p.rstrip("/") for row in _layout_rows() for p in row}
    modules = [str(p.relative_to(ROOT)) for p in MODULES if p.name not in ("__init__.py", "__main__.py")]
    # A folder row covers the folder's files when none of them has a row of its own.
    unlisted = [
        m
        for m in modules
        if m not in named
        and not (m.rsplit("/", 1)[0] in named and not any(n.startswith(m.rsplit("/", 1)[0] + "/") for n in named))
    ]
    assert not unlisted, f"the layout table (docs/development.md) does not name: {unlisted}"
