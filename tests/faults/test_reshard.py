"""Resume at a different EP size, world size or engine: exact weights, Adam moments carried over.

The global batch (16 sequences) and the capacity per micro-batch (8 sequences) are the same
in every layout used here, so the continued losses must equal the uninterrupted run's.
"""

import json
import re

import pytest
from launcher import CPU_EP1, CPU_EP2, EP2_ARGS, STEPS, TRAIN, check, deepspeed, metrics, python, truncate_run

pytestmark = [pytest.mark.faults, pytest.mark.multirank]

COMMON = [a for a in EP2_ARGS if a not in ("--deepspeed", CPU_EP2)]


def assert_continues(straight, resumed, after: int) -> None:
    a, b = metrics(straight), metrics(resumed)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(after + 1, STEPS + 1):
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5, step


def test_ep2_deepspeed_run_resumes_on_one_process_with_accelerate(ep2_run, tmp_path):
    run = tmp_path / "run"
    truncate_run(ep2_run, run, keep_step=12)
    args = [
        *COMMON,
        "--capacity_factor",
        "1.0",
        "--micro_batch_size",
        "8",
        "--grad_accum",
        "2",
        "--output_dir",
        str(run),
    ]
    refused = python(TRAIN, args)
    assert refused.returncode == 2 and "--allow_engine_change" in refused.stderr
    proc = check(python(TRAIN, [*args, "--allow_engine_change"]))
    assert re.search(
        r"resharded step00000012 from deepspeed EP=2 on 2 rank\(s\) to accelerate EP=1 on 1 rank\(s\); "
        r"optimizer state carried over",
        proc.stderr,
    )
    assert_continues(ep2_run, run, after=12)


def test_single_process_ep1_deepspeed_run_resumes_at_ep2(tmp_path):
    straight = tmp_path / "ep1"
    check(python(TRAIN, ["--deepspeed", CPU_EP1, *COMMON, "--output_dir", str(straight)]))
    run = tmp_path / "run"
    truncate_run(straight, run, keep_step=12)
    proc = check(deepspeed(TRAIN, ["--deepspeed", CPU_EP2, *COMMON, "--output_dir", str(run)]))
    assert (
        "resharded step00000012 from deepspeed EP=1 on 1 rank(s) to deepspeed EP=2 on 2 rank(s); "
        "optimizer state carried over" in proc.stderr
    )
    assert_continues(straight, run, after=12)


def test_zero0_optimizer_state_cannot_be_carried_without_allow_optimizer_reset(tmp_path):
    ds = json.loads(open(CPU_EP2).read())
    ds["zero_optimization"] = {"stage": 0}
    (tmp_path / "zero0.json").write_text(json.dumps(ds))
    run = tmp_path / "run"
    check(
        deepspeed(
            TRAIN, ["--deepspeed", str(tmp_path / "zero0.json"), *COMMON, "--max_steps", "4", "--output_dir", str(run)]
        )
    )
    (run / "summary.json").unlink()
    more = ["--deepspeed", CPU_EP1, *COMMON, "--max_steps", "6", "--output_dir", str(run)]
    refused = python(TRAIN, more)
    assert refused.returncode == 2
    assert "cannot carry the optimizer state" in refused.stderr and "--allow_optimizer_reset" in refused.stderr
    proc = check(python(TRAIN, [*more, "--allow_optimizer_reset"]))
    assert "optimizer reset (--allow_optimizer_reset)" in proc.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
