"""The guarded optimizer reaches its skip verdict once per optimizer step, not once per parameter group.

ZeRO-1/2 call the optimizer's `step()` once per parameter group; a guard that decided in each call
would all-reduce a finiteness flag and read it on the host once per group. Two CPU ranks through the
real launcher, running `tests/scripts/train_probe.py` (the real trainer with every all-reduce counted
and the guard's `step()` calls observed), under ZeRO-1 and ZeRO-2.
"""

import json
from pathlib import Path

import pytest
from launcher import CPU_EP2, DATA_ARGS, ROOT, check, deepspeed

pytestmark = pytest.mark.multirank

SCRIPT = ROOT / "tests" / "scripts" / "train_probe.py"
STEPS = 3


@pytest.mark.parametrize("stage", [1, 2])
def test_one_finiteness_all_reduce_per_step_however_often_zero_calls_the_optimizer(tmp_path, stage):
    config = json.loads(Path(CPU_EP2).read_text())
    config["zero_optimization"] = {**config["zero_optimization"], "stage": stage}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    check(
        deepspeed(
            SCRIPT,
            [
                str(tmp_path),
                "--deepspeed",
                str(tmp_path / "ds.json"),
                "--model",
                "tiny-moe",
                *DATA_ARGS,
                "--seq_len",
                "32",
                "--max_steps",
                str(STEPS),
                "--eval_every",
                str(STEPS),
                "--log_every",
                "1",
                "--warmup_steps",
                "1",
                "--output_dir",
                str(tmp_path / "run"),
            ],
        )
    )
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["exit"] == 0 and len(record["steps"]) == STEPS
        for step in record["steps"]:
            assert step["apply"]
            # ZeRO stepped the optimizer once per parameter group (dense and expert groups) ...
            assert step["guard_calls"] > 1, step["guard_calls"]
            # ... and the guard agreed on finiteness once: one scalar flag.
            assert step["guard_all_reduces"] == [[]], step["guard_all_reduces"]
