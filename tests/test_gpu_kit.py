"""The GPU wheel kit: what the lent image satisfies, what travels, and the one device command.

CI builds the kit and rehearses the device command in a venv that mirrors the image (.ci/run); these
tests hold the rules that decide what the kit carries, its size limit, and the command's one spelling.
"""

import json
import os
import re
import subprocess
import sys

from launcher import ROOT
from packaging.requirements import Requirement
from packaging.version import Version

from moe_dist.export.standard_export import without_moe_dist
from tools.gpu_kit import applies, image_satisfies, lower_bound, marker_env, read_image


def test_the_image_satisfies_what_its_pinned_release_meets_and_any_version_of_an_unpinned_package():
    image = read_image()
    assert image["torch"] == Version("2.11.0") and image["numpy"] is None
    assert image_satisfies(Requirement("torch>=2.11.0,<3"), image)
    assert not image_satisfies(Requirement("transformers>=5.23.0,<6"), image)  # the image's 5.17 is too old
    assert image_satisfies(Requirement("numpy>=2.0.0,<3"), image)
    assert not image_satisfies(Requirement("deepspeed>=0.19.8,<0.20"), image)  # not in the image at all


def test_a_carried_requirement_travels_at_its_declared_lower_bound():
    assert lower_bound(Requirement("transformers>=5.23.0,<6")) == "transformers==5.23.0"
    assert lower_bound(Requirement("hjson")) == "hjson"


def test_dependency_markers_are_read_for_the_target_python_and_the_asked_extras():
    env312 = marker_env("3.12")
    assert applies(Requirement('tomli; python_version < "3.11"'), marker_env("3.10"), set())
    assert not applies(Requirement('tomli; python_version < "3.11"'), env312, set())
    assert not applies(Requirement('aiohttp; extra == "http"'), env312, set())
    assert applies(Requirement('aiohttp; extra == "http"'), env312, {"http"})


def test_the_stored_kit_is_what_the_lent_image_needs(tmp_path):
    kit = json.loads((ROOT / "docs" / "gpu" / "kit.json").read_text())
    names = {p["name"] for p in kit["packages"]}
    assert {"deepspeed", "transformers", "datasets", "pydantic", "pydantic-core"} <= names
    assert "torch" not in names and "torch" in kit["from_image"]
    assert kit["python"] == "3.12" and kit["total_bytes"] <= kit["limit_bytes"] == 40 * 2**20
    assert sum(p["bytes"] for p in kit["packages"]) == kit["total_bytes"]


def test_a_kit_over_the_limit_is_refused_with_one_line_and_nothing_written(tmp_path):
    out = tmp_path / "kit"
    proc = subprocess.run(
        [sys.executable, ROOT / "tools" / "gpu_kit.py", out, "--limit_mib", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "over --limit_mib 1" in lines[0] and "deepspeed-0.19.8" in lines[0], lines
    assert not out.exists()


def test_the_device_command_in_the_docs_is_the_one_ci_rehearses():
    doc = re.findall(r"^ {4}(bash tools/gpu_run\.sh .*)$", (ROOT / "docs" / "gpu" / "README.md").read_text(), re.M)
    ci = re.findall(r"^\s*(bash tools/gpu_run\.sh .* --dry-run .*)$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert doc == ['bash tools/gpu_run.sh .kit .kit-site --out "$OUT" --deadline_s 420'], doc
    assert ci == ["bash tools/gpu_run.sh .kit .kit-site --dry-run --out .venv-lower/gpu-dry-run"], ci
    # The same command, apart from the GPU flags (--out "$OUT" --deadline_s 420 there, --dry-run --out DIR here).
    assert doc[0].split(" --")[0] == ci[0].split(" --")[0]


def test_a_process_without_moe_dist_keeps_the_kit_on_its_path(tmp_path):
    kit = tmp_path / "site"
    kit.mkdir()
    env = without_moe_dist({"PYTHONPATH": os.pathsep.join([str(kit), str(ROOT)]), "HOME": "/root"})
    assert env["PYTHONPATH"] == str(kit) and env["HOME"] == "/root"
    assert "PYTHONPATH" not in without_moe_dist({"PYTHONPATH": str(ROOT)})
