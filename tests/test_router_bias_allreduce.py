"""The aux-loss-free router bias costs one all-reduce per optimizer step for all MoE layers together,
on either engine, and stays identical on every rank (issue 11).

Two CPU ranks through the real launchers, with every `torch.distributed.all_reduce` counted by
tests/scripts/count_bias_allreduce.py. Rank 1 gets a NaN batch at step 3: that step is skipped on
both ranks, and its loads must be dropped without a collective.
"""

import json
import sys
from pathlib import Path

import pytest
from launcher import CPU_EP2, DATA_ARGS, ROOT, check, deepspeed, python

from moe_dist.parallel.process_group import free_port

pytestmark = pytest.mark.multirank

SCRIPT = ROOT / "tests" / "scripts" / "count_bias_allreduce.py"
STEPS, SKIPPED = 5, 3
LAYERS, EXPERTS = 4, 8  # tiny-moe: every one of its 4 FFNs is an 8-expert MoE block
TRAIN_ARGS = ["--model", "tiny-moe", *DATA_ARGS, "--bias_update_rate", "1e-3", "--max_steps", str(STEPS),
              "--eval_every", str(STEPS), "--save_every", str(STEPS), "--log_every", "1", "--warmup_steps", "2"]
FAULT = {"MOE_DIST_FAULT": f"nan_batch@before_step:{SKIPPED}:1"}


def _launch(engine: str, out: Path, run: Path):
    args = [str(SCRIPT), str(out), *TRAIN_ARGS, "--output_dir", str(run)]
    if engine == "deepspeed":
        return deepspeed(args[0], [*args[1:], "--deepspeed", CPU_EP2], env=FAULT)
    accelerate = Path(sys.executable).parent / "accelerate"
    return python(accelerate, ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                               "--main_process_port", str(free_port()), "--mixed_precision", "no",
                               "--dynamo_backend", "no", *args], env=FAULT)


@pytest.mark.parametrize("engine", ["deepspeed", "accelerate"])
def test_router_bias_update_is_one_all_reduce_per_step_for_all_layers_and_agrees_across_ranks(engine, tmp_path):
    check(_launch(engine, tmp_path, tmp_path / "run"))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["exit"] == 0
        steps = rank["steps"]
        assert [s["apply"] for s in steps] == [step != SKIPPED for step in range(1, STEPS + 1)]
        for step, record in enumerate(steps, start=1):
            # One [L, E] sum for every layer on an applied step; a skipped step drops its loads locally.
            assert record["all_reduces"] == ([[LAYERS, EXPERTS]] if record["apply"] else []), step
            assert len(record["bias"]) == LAYERS
        assert steps[SKIPPED - 1]["bias"] == steps[SKIPPED - 2]["bias"]  # the skipped step moved nothing
        assert any(b != 0 for layer in steps[-1]["bias"] for b in layer)  # the bias did move
        # Nowhere else in the run does anything reduce per-layer loads: one [L, E] per applied step.
        assert rank["all_reduces"].count([LAYERS, EXPERTS]) == STEPS - 1
        assert [EXPERTS] not in rank["all_reduces"]  # no per-layer [E] collective is left anywhere
    assert ranks[0]["steps"] == ranks[1]["steps"]  # every rank applied the same bias, bit for bit
