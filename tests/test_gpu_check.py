"""`tools/gpu_check.py`: the one-shot GPU check, run for real at toy size on CPU (`--dry-run`).

Every stage runs its real commands (pytest, both engines through their launchers, resume, export,
generate, the two benchmarks, the memory profiler), so a broken stage shows up here before a GPU
is ever lent. A failing stage stops the run with one line naming it.
"""
import importlib
import json
import math
import os
import subprocess
import sys

import pytest
from launcher import ROOT, python

GPU_CHECK = ROOT / "tools" / "gpu_check.py"
STAGES = ["unit_tests", "train", "resume_export_generate", "bench_moe", "bench_train", "profile_memory"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    proc = python(GPU_CHECK, ["--dry-run", "--out", str(out)], timeout=600)
    return proc, out


def test_dry_run_passes_every_stage_and_records_its_numbers(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads((out / "cpu-dry-run.json").read_text())
    assert result["status"] == "passed" and result["dry_run"] is True
    assert list(result["stages"]) == STAGES
    for name, stage in result["stages"].items():
        assert stage["status"] == "passed", (name, stage)
        assert stage["wall_s"] > 0 and stage["commands"], name
    s = result["stages"]
    assert s["unit_tests"]["passed"] > 0 and "failed" not in s["unit_tests"]
    for engine in ("accelerate", "deepspeed"):
        run = s["train"][engine]
        assert run["steps"] == 3 and math.isfinite(run["last_loss"]), run
        assert run["peak_reserved_mb_per_rank"] == []  # in summary.json; CPU has no allocator reserve
    assert s["train"]["deepspeed"]["engine"] != s["train"]["accelerate"]["engine"]
    assert s["train"]["router"]["fp32"] and s["train"]["router"]["routers"] > 0
    assert s["resume_export_generate"]["resume"]["from_step"] == 3
    assert s["resume_export_generate"]["generate"]["sample"]
    assert any(r["variant"] != "dense" and r["tok_s"] > 0 for r in s["bench_moe"]["rows"])
    assert {r["experts"] for r in s["bench_train"]["rows"]} >= {0, 4}
    measured = [r for r in s["profile_memory"]["rows"] if r["measured_mb"]]
    assert measured and measured[0]["predicted_mb"] > 0
    assert measured[0]["reserved_mb_per_rank"] is None  # CPU: no allocator reserve, no NVML
    md = (out / "cpu-dry-run.md").read_text()
    assert all(f"| {name} | passed |" in md for name in STAGES)


def test_a_failing_stage_stops_the_run_with_one_line_naming_it(tmp_path):
    proc = python(GPU_CHECK, ["--dry-run", "--out", str(tmp_path), "--fail_stage", "unit_tests"], timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: stage unit_tests failed"), proc.stderr
    result = json.loads((tmp_path / "cpu-dry-run.json").read_text())
    assert result["status"] == "failed" and list(result["stages"]) == ["unit_tests"]  # nothing after it ran


def test_a_command_that_exits_non_zero_fails_its_stage_with_its_exit_code(tmp_path):
    gpu_check = importlib.import_module("tools.gpu_check")
    args = gpu_check.parse_args(["--dry-run", "--out", str(tmp_path)])
    record = {}
    with pytest.raises(gpu_check.StageFailed, match="exited 3"):
        gpu_check.run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], args, record, timeout=60)
    assert record["commands"]
    with pytest.raises(gpu_check.StageFailed, match="timed out"):
        gpu_check.run([sys.executable, "-c", "import time; time.sleep(30)"], args, record, timeout=1)


def test_without_a_gpu_the_real_check_refuses_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "no CUDA device visible" in proc.stderr.strip().splitlines()[-1]
