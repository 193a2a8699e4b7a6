"""Run under `deepspeed --num_gpus W`: EP=P x ETP=T engines against one process with the same global batch.

Usage: etp_equivalence.py OUT.json EP_SIZE ETP_SIZE. Every rank builds the same model from the
same seed; rank r feeds micro-batch r to the sliced DeepSpeed engine (ZeRO stage 0, so gradients
stay whole), and the reference runs all W micro-batches through the plain model and averages,
which is what data parallelism computes (each rank routes its own tokens, so per-rank capacity
and router losses are the same in both). Each expert slice's gradient is compared with the same
slice of the reference gradient. Rank 0 writes, per (preset, routing), the largest differences
and every layer's ETP collective bytes next to the analytic count.
"""

import json
import re
import sys

import deepspeed
import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from moe_dist import MoEConfig, MoEForCausalLM
from moe_dist.parallel.expert_tensor_parallel import apply_expert_tensor_parallel, etp_bytes_per_layer, slice_tensor
from moe_dist.parallel.process_group import init_distributed, shutdown_distributed

# The GPT-2 block with biases everywhere (so bias slicing is checked), and the SwiGLU block.
PRESETS = {"gpt2": dict(preset="tiny-moe", expert_bias=True), "modern": dict(preset="tiny-modern")}
ROUTINGS = {"top1-dropless": (1, None), "top2-capacity1.0": (2, 1.0)}
MICRO, SEQ = 2, 32
_SLICED = re.compile(r"experts\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\w+)\.(weight|bias)$")


def compare(preset: dict, top_k: int, capacity_factor, ep: int, etp: int) -> dict:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config = MoEConfig.from_preset(
        preset["preset"],
        vocab_size=512,
        num_experts_per_tok=top_k,
        capacity_factor=capacity_factor,
        router_z_loss_coef=1e-3,
        router_aux_loss_coef=0.01,
        **{k: v for k, v in preset.items() if k != "preset"},
    )
    torch.manual_seed(0)
    reference = MoEForCausalLM(config).train()
    torch.manual_seed(0)
    model = MoEForCausalLM(config).train()
    data = torch.randint(0, 512, (MICRO * world, SEQ + 1), generator=torch.Generator().manual_seed(1))
    micro = data.split(MICRO)
    ref_loss = sum(reference(input_ids=m[:, :-1], shift_labels=m[:, 1:]).loss for m in micro) / world
    ref_loss.backward()

    layout = apply_expert_tensor_parallel(model, ep_size=ep, etp_size=etp, timeout_s=600)
    _, p, t = layout.position(rank)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "all"})
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(groups, lr=1e-3),
        config={"train_micro_batch_size_per_gpu": MICRO, "zero_optimization": {"stage": 0}},
    )
    loss = engine(input_ids=micro[rank][:, :-1], shift_labels=micro[rank][:, 1:]).loss
    engine.backward(loss)
    mean_loss = loss.detach().clone()
    torch.distributed.all_reduce(mean_loss)
    mean_loss /= world

    ref_params, local = dict(reference.named_parameters()), config.num_local_experts // ep
    worst, checked = 0.0, 0
    for name, param in model.named_parameters():
        m = _SLICED.search(name)
        if m:
            expert, proj, kind = p * local + int(m.group(1)), m.group(2), m.group(3)
            key = f"{name[: m.start()]}experts.{expert}.{proj}.{kind}"
            ref_grad = slice_tensor(ref_params[key].grad, key, t, etp)
        else:
            ref_grad = ref_params[name].grad
        worst = max(worst, (param.grad - ref_grad).abs().max().item())
        checked += 1
    result = torch.tensor([worst, abs(mean_loss.item() - ref_loss.item()), checked])
    torch.distributed.all_reduce(result, op=torch.distributed.ReduceOp.MAX)
    analytic = etp_bytes_per_layer(
        tokens_per_rank=MICRO * SEQ, hidden_size=config.hidden_size, top_k=top_k, etp_size=etp, x_bytes=4, backward=True
    )
    sent = [dict(m.sent) for m in model.modules() if hasattr(m, "etp_group")]
    return {
        "max_grad_diff": result[0].item(),
        "loss_diff": result[1].item(),
        "params_checked": int(result[2]),
        "bytes_measured": sent,
        "bytes_analytic": analytic,
    }


if __name__ == "__main__":
    out_path, ep, etp = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    init_distributed(timeout_s=600)
    results = {
        f"{name}/{routing}": compare(preset, *ROUTINGS[routing], int(ep), int(etp))
        for name, preset in PRESETS.items()
        for routing in ROUTINGS
    }
    if torch.distributed.get_rank() == 0:
        json.dump(results, open(out_path, "w"))
    shutdown_distributed()
