"""Run under `deepspeed --num_gpus 2`: the EP=2 engine against a single-process EP=1 reference.

Both ranks build the same model from the same seed. Rank r feeds micro-batch r to the
EP=2 DeepSpeed engine (ZeRO stage 0, so gradients stay whole); the reference runs both
micro-batches through the plain EP=1 model and averages, which is what data parallelism
computes. Per-rank capacity is the same in both, since each sees the same micro-batch.
Rank 0 writes, per routing setting, the largest loss and gradient differences to argv[1].
"""

import json
import re
import sys

import deepspeed
import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from moe_dist import MoEConfig, MoEForCausalLM
from moe_dist.parallel.expert_parallel import apply_expert_parallel
from moe_dist.parallel.process_group import init_distributed, shutdown_distributed

SETTINGS = {"top1-dropless": (1, None), "top2-capacity1.0": (2, 1.0)}


def compare(top_k: int, capacity_factor: float | None) -> dict:
    rank = torch.distributed.get_rank()
    config = MoEConfig.from_preset(
        "tiny-moe", vocab_size=512, num_experts_per_tok=top_k, capacity_factor=capacity_factor, router_z_loss_coef=1e-3
    )
    torch.manual_seed(0)
    reference = MoEForCausalLM(config).train()
    torch.manual_seed(0)
    model = MoEForCausalLM(config).train()
    data = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(1))
    halves = [data[i * 2 : (i + 1) * 2] for i in range(2)]

    ref_loss = sum(reference(input_ids=h[:, :-1], shift_labels=h[:, 1:]).loss for h in halves) / 2
    ref_loss.backward()

    apply_expert_parallel(model, 2)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "all"})
    config_ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0}}
    # A torch optimizer, as the trainer passes: a config "optimizer" section would JIT-compile
    # DeepSpeed's CPU Adam op (about 45 s on CI) for a test that never steps.
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config_ds)
    mine = halves[rank]
    loss = engine(input_ids=mine[:, :-1], shift_labels=mine[:, 1:]).loss
    engine.backward(loss)
    mean_loss = loss.detach().clone()
    torch.distributed.all_reduce(mean_loss)
    mean_loss /= 2

    ref_params = dict(reference.named_parameters())
    worst, checked = 0.0, 0
    for name, param in model.named_parameters():
        local = re.search(r"deepspeed_experts\.(\d+)\.", name)
        if local:  # this rank's expert i is global expert rank * 4 + i
            name = re.sub(
                r"experts\.deepspeed_moe\.experts\.deepspeed_experts\.\d+\.",
                f"experts.{rank * 4 + int(local.group(1))}.",
                name,
            )
        worst = max(worst, (param.grad - ref_params[name].grad).abs().max().item())
        checked += 1
    result = torch.tensor([worst, abs(mean_loss.item() - ref_loss.item()), checked])
    torch.distributed.all_reduce(result, op=torch.distributed.ReduceOp.MAX)
    return {"max_grad_diff": result[0].item(), "loss_diff": result[1].item(), "params_checked": int(result[2])}


if __name__ == "__main__":
    out_path = next(a for a in sys.argv[1:] if not a.startswith("--local_rank"))
    init_distributed(timeout_s=600)
    results = {name: compare(*setting) for name, setting in SETTINGS.items()}
    if torch.distributed.get_rank() == 0:
        json.dump(results, open(out_path, "w"))
    shutdown_distributed()
