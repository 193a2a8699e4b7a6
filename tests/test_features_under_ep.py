"""Every model feature trains under expert parallelism, and the aux-loss-free router bias costs one
all-reduce per optimizer step for all MoE layers together, identical on every rank.

Two CPU ranks through the real launchers, running `tests/scripts/train_probe.py` (the real trainer,
with every `torch.distributed.all_reduce` counted and the routers observed). The model switches on
every feature at once: the modern block (RoPE, GQA, SwiGLU), a shared expert, top-3 routing,
the aux-free bias and activation checkpointing. Rank 1 gets a NaN batch at step 3: that step is
skipped on both ranks, and its loads must be dropped without a collective. The random router, which
excludes the learned one, gets its own run.
"""

import json
import math
import sys
from pathlib import Path

import pytest
from launcher import CPU_EP2, DATA_ARGS, ROOT, check, deepspeed, metrics, python

from moe_dist.parallel.process_group import free_port

pytestmark = pytest.mark.multirank

SCRIPT = ROOT / "tests" / "scripts" / "train_probe.py"
STEPS, SKIPPED = 5, 3
LAYERS, EXPERTS, TOP_K = 4, 8, 3  # tiny-modern: every one of its 4 FFNs is an 8-expert MoE block
COMMON = [
    *DATA_ARGS,
    "--seq_len",
    "32",
    "--max_steps",
    str(STEPS),
    "--eval_every",
    str(STEPS),
    "--save_every",
    str(STEPS),
    "--log_every",
    "1",
    "--warmup_steps",
    "2",
]
FEATURES = [
    "--model",
    "tiny-modern",
    "--num_shared_experts",
    "1",
    "--top_k",
    str(TOP_K),
    "--grad_ckpt",
    "--bias_update_rate",
    "1e-3",
    *COMMON,
]
FAULT = {"MOE_DIST_FAULT": f"nan_batch@before_step:{SKIPPED}:1"}


def _launch(engine: str, out: Path, args: list[str], env: dict | None = None):
    args = [str(SCRIPT), str(out), *args, "--output_dir", str(out / "run")]
    if engine == "deepspeed":
        return deepspeed(args[0], [*args[1:], "--deepspeed", CPU_EP2], env=env)
    accelerate = Path(sys.executable).parent / "accelerate"
    return python(
        accelerate,
        [
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--main_process_port",
            str(free_port()),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            *args,
        ],
        env=env,
    )


def _ranks(out: Path) -> list[dict]:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(rank["exit"] == 0 for rank in ranks)
    return ranks


@pytest.mark.parametrize("engine", ["deepspeed", "accelerate"])
def test_every_feature_trains_and_the_bias_costs_one_all_reduce_per_step_and_agrees_across_ranks(engine, tmp_path):
    check(_launch(engine, tmp_path, FEATURES, env=FAULT))
    ranks = _ranks(tmp_path)
    losses = {step: row["loss"] for step, row in metrics(tmp_path / "run").items()}
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[SKIPPED] is None
    assert all(math.isfinite(losses[s]) for s in losses if s != SKIPPED) and losses[STEPS] < losses[1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    tokens_per_rank = summary["tokens_per_step"] // 2
    for rank in ranks:
        steps = rank["steps"]
        assert [s["apply"] for s in steps] == [step != SKIPPED for step in range(1, STEPS + 1)]
        for step, record in enumerate(steps, start=1):
            # One [L, E] sum for every layer on an applied step; a skipped step drops its loads locally.
            assert record["all_reduces"] == ([[LAYERS, EXPERTS]] if record["apply"] else []), step
            assert len(record["bias"]) == LAYERS
            # Each of this rank's tokens was counted once per choice: the recomputation of
            # activation checkpointing re-runs the routers and must not count them again.
            assert [sum(layer) for layer in record["local_loads"]] == [tokens_per_rank * TOP_K] * LAYERS, step
        assert steps[SKIPPED - 1]["bias"] == steps[SKIPPED - 2]["bias"]  # the skipped step moved nothing
        assert any(b != 0 for layer in steps[-1]["bias"] for b in layer)  # the bias did move
        # Nowhere else in the run does anything reduce per-layer loads: one [L, E] per applied step.
        assert rank["all_reduces"].count([LAYERS, EXPERTS]) == STEPS - 1
        assert [EXPERTS] not in rank["all_reduces"]  # no per-layer [E] collective is left anywhere
    assert ranks[0]["steps"][-1]["bias"] == ranks[1]["steps"][-1]["bias"]  # the same bias, bit for bit
    assert ranks[0]["router_weights"] == ranks[1]["router_weights"]  # data-parallel router replicas agree


def test_random_router_trains_under_ep_frozen_and_identical_on_every_rank(tmp_path):
    check(_launch("deepspeed", tmp_path, ["--model", "tiny-moe", "--router_type", "random", "--top_k", "2", *COMMON]))
    ranks = _ranks(tmp_path)
    losses = [row["loss"] for row in metrics(tmp_path / "run").values()]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    for rank in ranks:
        assert rank["steps"] and all(s["all_reduces"] == [] for s in rank["steps"])  # no bias, no collective
        assert rank["router_weights"] == rank["first_router_weights"]  # frozen: no optimizer step moved it
    assert ranks[0]["router_weights"] == ranks[1]["router_weights"]
