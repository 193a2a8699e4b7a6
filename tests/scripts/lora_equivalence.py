"""Run under `deepspeed --num_gpus W`: a LoRA model sharded EP=P x ETP=T against one process, same global batch.

Usage: lora_equivalence.py OUT.json EP_SIZE ETP_SIZE. Every rank builds the same model from the same seed
and adapts it (every target, B made non-zero) before sharding, as `model/lora.py` asks; rank r feeds
micro-batch r to the DeepSpeed engine (ZeRO stage 0, only the adapters in the optimizer), and the reference
runs all W micro-batches through the plain adapted model and averages. Each adapter's gradient is compared
with the reference's, cut as the rank's slice is (`slice_tensor`); base weights must have none. Rank 0
writes, per (preset, routing), the largest loss and gradient differences and what was checked.
"""

import json
import re
import sys

import deepspeed
import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from moe_dist import MoEConfig, MoEForCausalLM
from moe_dist.model.lora import LoRAConfig, adapter_parameters, apply_lora
from moe_dist.parallel.expert_parallel import apply_expert_parallel
from moe_dist.parallel.expert_tensor_parallel import EtpLayout, apply_expert_tensor_parallel, slice_tensor
from moe_dist.parallel.process_group import init_distributed, shutdown_distributed

# GPT-2 blocks with biases, a dense first layer and a shared expert; the SwiGLU block.
PRESETS = {
    "gpt2": dict(preset="tiny-moe", expert_bias=True, num_shared_experts=1, skip_first_moe=1),
    "modern": dict(preset="tiny-modern"),
}
ROUTINGS = {"top2-dropless": (2, None), "top2-capacity1.0": (2, 1.0)}
MICRO, SEQ = 2, 32
_SHARDED = re.compile(r"experts\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\w+)\.(\w+)$")


def adapted(config: MoEConfig) -> MoEForCausalLM:
    torch.manual_seed(0)
    model = apply_lora(MoEForCausalLM(config).train(), LoRAConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, param in adapter_parameters(model):
            if name.endswith("lora_B"):
                param.normal_(std=0.2)
    return model


def reference_grad(reference: dict, name: str, layout: EtpLayout, rank: int, local: int) -> torch.Tensor:
    """The reference gradient of this rank's parameter `name`: an expert's under its global id, cut to the slice."""
    m = _SHARDED.search(name)
    if m is None:
        return reference[name].grad
    _, p, t = layout.position(rank)
    key = f"{name[: m.start()]}experts.{p * local + int(m.group(1))}.{m.group(2)}.{m.group(3)}"
    return slice_tensor(reference[key].grad, key, t, layout.etp_size)


def compare(preset: dict, top_k: int, capacity_factor, ep: int, etp: int) -> dict:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    overrides = {k: v for k, v in preset.items() if k != "preset"}
    config = MoEConfig.from_preset(
        preset["preset"], vocab_size=512, num_experts_per_tok=top_k, capacity_factor=capacity_factor, **overrides
    )
    reference, model = adapted(config), adapted(config)
    data = torch.randint(0, 512, (MICRO * world, SEQ + 1), generator=torch.Generator().manual_seed(1))
    micro = data.split(MICRO)
    ref_loss = sum(reference(input_ids=m[:, :-1], shift_labels=m[:, 1:]).loss for m in micro) / world
    ref_loss.backward()

    if etp > 1:
        apply_expert_tensor_parallel(model, ep_size=ep, etp_size=etp, timeout_s=600)
    else:
        apply_expert_parallel(model, ep)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = split_params_into_different_moe_groups_for_optimizer({"params": trainable, "name": "adapters"})
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

    layout, local = EtpLayout(world, ep, etp), config.num_local_experts // ep
    ref_params = dict(reference.named_parameters())
    worst, adapters, base_with_grad = 0.0, 0, 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            base_with_grad += param.grad is not None
            continue
        worst = max(worst, (param.grad - reference_grad(ref_params, name, layout, rank, local)).abs().max().item())
        adapters += 1
    result = torch.tensor([worst, abs(mean_loss.item() - ref_loss.item()), adapters, base_with_grad])
    torch.distributed.all_reduce(result, op=torch.distributed.ReduceOp.MAX)
    return {
        "max_grad_diff": result[0].item(),
        "loss_diff": result[1].item(),
        "adapters_checked": int(result[2]),
        "base_with_grad": int(result[3]),
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
