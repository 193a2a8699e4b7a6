"""What a user sees: our progress lines and real warnings, each once; no tool in a run folder
that fails; and a launched tool that refuses its output folder says so once, before any process group."""

import re

import pytest
from launcher import CPU_EP2, ROOT, TRAIN, check, deepspeed

pytestmark = pytest.mark.multirank

ROUTING_WARNING = re.compile(r"WARNING (layer \d+ .*\(step \d+\))")


def test_the_quick_start_prints_no_deprecation_and_each_routing_warning_once(tmp_path):
    # The README's quick start at 20 steps, evaluating every 2 so routing warnings have evals to fire on.
    proc = check(
        deepspeed(
            TRAIN,
            [
                "--deepspeed",
                CPU_EP2,
                "--model",
                "tiny-moe",
                "--tokenizer",
                "train:4096",
                "--max_steps",
                "20",
                "--eval_every",
                "2",
                "--warmup_steps",
                "3",
                "--output_dir",
                str(tmp_path / "run"),
            ],
            timeout=600,
        )
    )
    console = proc.stdout + proc.stderr
    assert "FutureWarning" not in console and "DeprecationWarning" not in console, console[-3000:]
    assert "untested optimizer" not in console
    warnings = ROUTING_WARNING.findall(console)
    assert warnings, "no routing warning fired: the once-per-eval check would be empty"
    assert len(warnings) == len(set(warnings)), sorted(w for w in warnings if warnings.count(w) > 1)
    assert "python -m moe_dist.export" in console  # where DeepSpeed would point at zero_to_fp32.py


def test_run_folders_hold_no_converter_that_fails_on_expert_checkpoints(ep2_run):
    scripts = sorted(p.name for p in (ep2_run / "checkpoints").rglob("zero_to_*.py"))
    assert (ep2_run / "checkpoints" / "latest").is_file() and not scripts, scripts


def test_profile_alltoall_refuses_a_taken_name_once_before_any_process_group(tmp_path):
    (tmp_path / "alltoall.json").write_text('{"mine": 1}')
    before = (tmp_path / "alltoall.json").stat().st_mtime_ns
    proc = deepspeed(
        ROOT / "tools" / "profile_alltoall.py", ["--deepspeed", CPU_EP2, "--out", str(tmp_path)], timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.count("error: ") == 1, proc.stderr[-2000:]
    assert "alltoall.json" in proc.stderr and "process group" not in proc.stdout.lower()
    assert (tmp_path / "alltoall.json").read_text() == '{"mine": 1}'
    assert (tmp_path / "alltoall.json").stat().st_mtime_ns == before
