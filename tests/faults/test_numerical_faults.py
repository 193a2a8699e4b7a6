"""Non-finite steps are skipped on every rank together and counted; a run that only produces
them stops with a clear message and its last good checkpoint intact."""

import json
import re

import pytest
import torch
from launcher import CPU_EP2, EP2_ARGS, TRAIN, deepspeed, metrics

from moe_dist import MoEConfig, MoEForCausalLM
from moe_dist.parallel.optim import GuardedAdamW
from moe_dist.train.checkpoint import CheckpointStore


@pytest.mark.faults
@pytest.mark.multirank
def test_a_nan_batch_on_one_rank_is_skipped_by_both_and_training_goes_on(tmp_path):
    # Under ZeRO stage 1 (the other tests use stage 2), so every selectable stage trains somewhere.
    zero1 = json.loads(open(CPU_EP2).read())
    zero1["zero_optimization"] = {"stage": 1}
    (tmp_path / "zero1.json").write_text(json.dumps(zero1))
    args = [a if a != CPU_EP2 else str(tmp_path / "zero1.json") for a in EP2_ARGS]
    run = tmp_path / "run"
    proc = deepspeed(
        TRAIN,
        [*args, "--max_steps", "8", "--output_dir", str(run)],
        env={"MOE_DIST_FAULT": "nan_batch@before_step:3:1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3 skipped on every rank: non-finite loss or gradients (1 in a row, 1 in total)" in proc.stderr
    train = metrics(run)
    assert train[3]["loss"] is None  # NaN is written as null
    assert all(train[s]["loss"] is not None for s in (1, 2, 4, 5, 6, 7, 8))
    assert train[3]["lr"] == train[2]["lr"] < train[4]["lr"]  # the skipped step held the warmup schedule
    assert json.loads((run / "summary.json").read_text())["skipped_steps"] == 1


@pytest.mark.faults
@pytest.mark.multirank
def test_a_nan_expert_weight_stops_the_run_after_max_bad_steps(tmp_path):
    run = tmp_path / "run"
    proc = deepspeed(
        TRAIN,
        [*EP2_ARGS, "--save_every", "2", "--max_bad_steps", "3", "--output_dir", str(run)],
        env={"MOE_DIST_FAULT": "nan_expert@before_step:5:1"},
    )
    assert proc.returncode == 3
    message = re.search(
        r"error: 3 consecutive non-finite steps up to step 7 \(--max_bad_steps 3\); stopping\. "
        r"Last good checkpoint: (\S+)",
        proc.stderr,
    )
    assert message and message.group(1).endswith("step00000004")
    # No checkpoint was written during the bad streak, and the last one has finite weights.
    store = CheckpointStore(run / "checkpoints", is_main=True, barrier=lambda: None)
    last = store.candidates()[0]
    assert last.name == "step00000004"
    for expert_file in last.glob("layer_0_expert_*_model_states.pt"):
        assert all(torch.isfinite(t).all() for t in torch.load(expert_file, weights_only=True).values())


def _tiny_guard(lr=0.1):
    param = torch.nn.Parameter(torch.ones(3))
    return param, GuardedAdamW([param], lr=lr)


def test_guarded_adamw_skips_a_step_with_a_non_finite_gradient():
    param, opt = _tiny_guard()
    param.grad = torch.tensor([1.0, float("nan"), 1.0])
    opt.prepare_step()
    opt.step()
    assert opt.skipped and torch.equal(param.data, torch.ones(3)) and not opt.state
    assert opt.overflow  # the name DeepSpeed's engine reads to count the skip and hold the schedule
    param.grad = torch.ones(3)
    opt.prepare_step()
    opt.step()
    assert not opt.skipped and not opt.overflow and not torch.equal(param.data, torch.ones(3))


def test_guarded_adamw_skips_a_step_whose_loss_was_not_finite_even_with_finite_gradients():
    param, opt = _tiny_guard()
    param.grad = torch.ones(3)
    opt.prepare_step(nonfinite_loss=torch.tensor(1.0))
    opt.step()
    assert opt.skipped and torch.equal(param.data, torch.ones(3))


def test_guarded_adamw_trusts_a_grad_norm_handed_to_it_and_forgets_it_at_the_next_prepare():
    param, opt = _tiny_guard()
    param.grad = torch.ones(3)
    opt.prepare_step(grad_norm=torch.tensor(float("inf")))  # as if clipping had found an inf norm
    opt.step()
    assert opt.skipped and torch.equal(param.data, torch.ones(3))
    param.grad = torch.ones(3)  # the skipped step dropped the gradients
    opt.prepare_step()
    opt.step()
    assert not opt.skipped and not torch.equal(param.data, torch.ones(3))
    with pytest.raises(AttributeError):
        opt.skipped = True  # read-only: set only by step()


def test_router_losses_stay_finite_in_bf16_with_huge_logits():
    config = MoEConfig.from_preset("tiny-moe", vocab_size=256, num_hidden_layers=2, router_z_loss_coef=1e-3)
    model = MoEForCausalLM(config).to(torch.bfloat16).train()
    for router in model.routers():
        router.weight.data.mul_(1e4)  # bf16 logits in the hundreds: exp() would overflow in bf16
    ids = torch.randint(0, 256, (2, 32))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.aux_loss)
    for stats in model.routing_stats().values():
        assert torch.isfinite(stats["z_loss"]) and torch.isfinite(stats["aux_loss"])
        assert stats["z_loss"].dtype == torch.float32  # computed from fp32 router logits
