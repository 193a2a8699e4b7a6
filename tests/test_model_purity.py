"""The model subpackage is exactly what an export ships for `trust_remote_code`: it imports only its
siblings and third-party modelling code, and nothing distributed (docs/design.md#the-model-files-stay-pure).

`save_pretrained` copies these files flat into the export folder, so an import of the rest of
`moe_dist` breaks the remote load, and a collective inside the model ties it to a process group
(the engine sums the router loads instead, see `TrainEngine.update_router_biases`).
"""

import ast

import pytest
from launcher import ROOT

MODEL_FILES = sorted((ROOT / "moe_dist" / "model").glob("*.py"))
FORBIDDEN_ROOTS = ("moe_dist", "deepspeed")


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted name) of every import; relative imports keep their leading dots."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            # `from torch import distributed` imports torch.distributed too.
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names if node.module]
    return found


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` for an attribute chain on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def _forbidden_import(name: str) -> bool:
    if name.startswith(".."):  # reaches above moe_dist/model/
        return True
    root = name.split(".")[0]
    return root in FORBIDDEN_ROOTS or name == "torch.distributed" or name.startswith("torch.distributed.")


def test_the_model_files_are_the_ones_an_export_ships():
    assert {p.name for p in MODEL_FILES} >= {"configuration.py", "modeling.py", "moe.py", "routing.py"}


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_model_file_imports_nothing_from_the_rest_of_moe_dist_nor_anything_distributed(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [f"line {line}: import {name}" for line, name in _imported_modules(tree) if _forbidden_import(name)]
    assert not bad, f"{path.name}: {bad}"


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_model_file_makes_no_torch_distributed_or_deepspeed_call(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    uses = [(node.lineno, _dotted(node)) for node in ast.walk(tree) if isinstance(node, ast.Attribute)]
    names = [(node.lineno, node.id) for node in ast.walk(tree) if isinstance(node, ast.Name)]
    bad = [
        f"line {line}: {name}"
        for line, name in uses + names
        if name
        and (
            name == "torch.distributed"
            or name.startswith("torch.distributed.")
            or name.split(".")[0] == "deepspeed"
            or name in ("dist", "all_reduce")
        )
    ]
    assert not bad, f"{path.name}: {bad}"


def test_the_checks_catch_what_they_are_for():
    # Guard against a checker that passes everything: each line below must be flagged.
    for source in (
        "import torch.distributed as dist",
        "from torch import distributed",
        "import deepspeed",
        "from deepspeed.comm import all_reduce",
        "from ..parallel import engines",
        "from moe_dist.train import trainer",
    ):
        assert any(_forbidden_import(n) for _, n in _imported_modules(ast.parse(source))), source
    calls = ast.parse("torch.distributed.all_reduce(x)\nif torch.distributed.is_initialized(): pass")
    assert sum(_dotted(n) == "torch.distributed" for n in ast.walk(calls) if isinstance(n, ast.Attribute)) == 2
    assert not _forbidden_import(".routing") and not _forbidden_import("torch.nn.functional")
