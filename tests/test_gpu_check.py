"""`tools/gpu_check.py`: the one-shot GPU check, run for real at toy size on CPU (`--dry-run`).

Every stage runs its real commands (pytest, both engines through their launchers, resume, export,
generate, the two benchmarks, the memory profiler), so a broken stage shows up here before a GPU
is ever lent. The check must always hand back what it measured (a GPU is lent for minutes, once): a stage that raises or
hangs is recorded and the others still run, a stage that cannot fit before the deadline is skipped,
and the JSON is complete either way.
"""

import importlib
import json
import math
import os
import subprocess
import sys
import time

import pytest
from launcher import ROOT, python

GPU_CHECK = ROOT / "tools" / "gpu_check.py"
STAGES = ["unit_tests", "train", "bench_moe", "bench_train", "profile_memory", "resume_export_generate"]


def result(out) -> dict:
    return json.loads((out / "cpu-dry-run.json").read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    proc = python(GPU_CHECK, ["--dry-run", "--out", str(out)], timeout=600)
    return proc, out


def test_dry_run_passes_every_stage_and_records_its_numbers(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "of the deadline" in proc.stdout  # the plan: each stage's share of --deadline_s
    r = result(out)
    assert r["status"] == "passed" and r["dry_run"] is True and list(r["stages"]) == STAGES
    for name, stage in r["stages"].items():
        assert stage["status"] == "passed", (name, stage)
        assert stage["wall_s"] > 0 and stage["commands"] and stage["planned_s"] > 0, name
    s = r["stages"]
    assert s["unit_tests"]["passed"] > 0 and "failed" not in s["unit_tests"]
    for engine in ("accelerate", "deepspeed"):
        run = s["train"][engine]
        assert run["steps"] == 3 and math.isfinite(run["last_loss"]), run
        assert run["peak_reserved_mb_per_rank"] == []  # in summary.json; CPU has no allocator reserve
    assert s["train"]["deepspeed"]["engine"] != s["train"]["accelerate"]["engine"]
    router = s["train"]["router"]
    assert router["fp32"] and router["routers"] > 0
    assert {d.split(":")[0] for d in router["dtypes"]} == {"logits", "weight", "loss"}  # the logits are checked too
    assert s["resume_export_generate"]["resume"]["from_step"] == 3
    assert s["resume_export_generate"]["generate"]["sample"]
    assert any(r["variant"] != "dense" and r["tok_s"] > 0 for r in s["bench_moe"]["rows"])
    assert {r["experts"] for r in s["bench_train"]["rows"]} >= {0, 4}
    measured = [r for r in s["profile_memory"]["rows"] if r["measured_mb"]]
    assert measured and measured[0]["predicted_mb"] > 0
    assert measured[0]["reserved_mb_per_rank"] is None  # CPU: no allocator reserve, no NVML
    md = (out / "cpu-dry-run.md").read_text()
    assert all(f"| {name} | passed |" in md for name in STAGES)


def test_a_stage_that_raises_or_hangs_is_recorded_and_every_other_stage_still_runs(tmp_path):
    work = tmp_path / "work"
    proc = python(
        GPU_CHECK,
        [
            "--dry-run",
            "--out",
            str(tmp_path / "out"),
            "--work_dir",
            str(work),
            "--inject",
            "train:exception",
            "--inject",
            "bench_moe:hang",
        ],
        timeout=600,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: not passed: train (failed), bench_moe (failed), resume_export_generate (skipped)"
    ]
    r = result(tmp_path / "out")
    assert r["status"] == "incomplete" and list(r["stages"]) == STAGES
    s = r["stages"]
    assert s["train"]["error"]["type"] == "RuntimeError" and "injected" in s["train"]["error"]["message"]
    assert any("done:" in line for line in s["train"]["error"]["output_tail"])  # the last lines of its output
    assert s["bench_moe"]["error"]["type"] == "StageFailed" and "killed after" in s["bench_moe"]["error"]["message"]
    assert s["resume_export_generate"] == {
        "status": "skipped",
        "planned_s": 60,
        "reason": "needs train, which failed",
        "wall_s": 0.0,
    }
    for name in ("unit_tests", "bench_train", "profile_memory"):
        assert s[name]["status"] == "passed", (name, s[name])
    # The hung command's own child was killed with its process group: nothing is left holding the device.
    with pytest.raises(ProcessLookupError):
        os.kill(int((work / "hang.pid").read_text()), 0)


def test_stages_that_cannot_fit_before_the_deadline_are_skipped_and_the_json_is_complete(tmp_path):
    # Only bench_moe's plan (30 s) fits in 35 s; after it, bench_train's 40 s cannot.
    proc = python(GPU_CHECK, ["--dry-run", "--out", str(tmp_path), "--deadline_s", "35"], timeout=300)
    assert proc.returncode == 1, proc.stderr
    s = result(tmp_path)["stages"]
    assert {name: rec["status"] for name, rec in s.items()} == {
        "unit_tests": "skipped",
        "train": "skipped",
        "bench_moe": "passed",
        "bench_train": "skipped",
        "profile_memory": "skipped",
        "resume_export_generate": "skipped",
    }
    assert s["unit_tests"]["reason"].startswith("deadline:") and s["bench_train"]["reason"].startswith("deadline:")


def test_a_dry_run_that_leaves_no_stage_fails(tmp_path):
    proc = python(GPU_CHECK, ["--dry-run", "--out", str(tmp_path), "--deadline_s", "5"], timeout=120)
    assert proc.returncode == 1 and "left no stage passed" in proc.stderr
    assert all(rec["status"] == "skipped" for rec in result(tmp_path)["stages"].values())


def test_a_nan_loss_fails_the_stage_with_a_line_not_a_type_error(tmp_path):
    gpu_check = importlib.import_module("tools.gpu_check")
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 2}))
    rows = [{"kind": "train", "step": 1, "loss": 5.0}, {"kind": "train", "step": 2, "loss": None}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(gpu_check.StageFailed, match="non-finite"):
        gpu_check.check_run(tmp_path, 2)


def test_a_command_that_exits_non_zero_fails_its_stage_with_its_exit_code(tmp_path):
    gpu_check = importlib.import_module("tools.gpu_check")
    args = gpu_check.parse_args(["--dry-run", "--out", str(tmp_path)])
    record = {}
    ctx = gpu_check.Context(args, tmp_path, record, "unit_tests", ends_at=time.monotonic() + 60)
    with pytest.raises(gpu_check.StageFailed, match="exited 3"):
        ctx.run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    assert record["commands"] and ctx.output_tail == ["boom"]


def test_without_a_gpu_the_real_check_refuses_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 2 and "no CUDA device visible" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "visible, expected",
    [("", ["--num_gpus", "2"]), ("3,5,7", ["--include", "localhost:3,5"]), (" 1 , 0 ", ["--include", "localhost:1,0"])],
)
def test_the_launcher_keeps_the_gpus_cuda_visible_devices_names(visible, expected):
    from moe_dist.parallel.process_group import deepspeed_launcher

    cmd, env = deepspeed_launcher(2, {"PATH": os.environ["PATH"], "CUDA_VISIBLE_DEVICES": visible})
    assert cmd[0].endswith("deepspeed") and cmd[1:] == expected and env == {}


def test_the_launcher_says_in_one_line_what_it_cannot_do(monkeypatch):
    from moe_dist.parallel.process_group import LauncherError, deepspeed_launcher

    with pytest.raises(LauncherError, match="names 1 device"):
        deepspeed_launcher(2, {"PATH": os.environ["PATH"], "CUDA_VISIBLE_DEVICES": "0"})
    monkeypatch.setattr(sys, "executable", "/nonexistent/bin/python")  # no launcher beside it, none on PATH
    with pytest.raises(LauncherError, match="no `deepspeed` launcher"):
        deepspeed_launcher(1, {"PATH": "/nonexistent"})
