"""Run under `deepspeed --num_gpus W`: the gradient of one step of packed conversations, for each split of the
same 8 rows over W ranks x A accumulation steps x EP sizes, written to OUT/grads-W{W}-A{A}-EP{P}.pt.

The rows hold unequal numbers of supervised tokens on purpose. Each setting builds the model from the same
seed, hands it to DeepSpeed (ZeRO stage 0, so each rank keeps whole gradients) with `gradient_accumulation_steps`
= A, and runs the trainer's own `engines.forward_kwargs` and DeepSpeed's forward and backward for this rank's
micro-batches (the rows go (accumulation, rank, row) as `BlockSampler` deals them), as `train_batch` does; the
gradients are read at the accumulation boundary, before the optimizer steps. Expert parameters are saved
under their global expert index by the rank that holds them.
"""

import json
import re
import sys
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from moe_dist import MoEConfig, MoEForCausalLM
from moe_dist.parallel.engines import forward_kwargs
from moe_dist.parallel.expert_parallel import apply_expert_parallel
from moe_dist.parallel.process_group import init_distributed, shutdown_distributed
from moe_dist.train.packing import pack_conversations, packed_tensors

ROWS, SEQ = 8, 48
EP_NAME = r"experts\.deepspeed_moe\.experts\.deepspeed_experts\.\d+\."  # an expert under EP


class Collectives:
    """What `forward_kwargs` reads of an engine: the device copy, the all-reduce and the world size."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def to_device(self, t):
        return t

    def all_reduce(self, t):
        dist.all_reduce(t)
        return t


def rows() -> np.ndarray:
    class Ex:
        def __init__(self, ids, sup):
            self.input_ids, self.supervised = ids, sup

    rng = np.random.default_rng(3)
    examples = []
    for n in rng.integers(6, SEQ, 40):
        sup = np.zeros(n, dtype=bool)
        sup[rng.integers(1, n - 1) :] = True
        examples.append(Ex(rng.integers(0, 512, n), sup))
    packed, _ = pack_conversations(examples, SEQ, truncate=False, label="probe")
    assert len(packed) >= ROWS
    return packed[:ROWS]


def gradients(world: int, rank: int, accum: int, ep: int) -> dict[str, torch.Tensor]:
    config = MoEConfig.from_preset(
        "tiny-moe", vocab_size=512, capacity_factor=None, router_aux_loss_coef=0.0, router_z_loss_coef=0.0
    )
    torch.manual_seed(0)
    model = MoEForCausalLM(config).train()
    if ep > 1:
        apply_expert_parallel(model, ep)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "all"})
    micro = ROWS // (world * accum)
    ds_config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": {"stage": 0},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-3), config=ds_config)
    order = np.arange(ROWS).reshape(accum, world, micro)[:, rank]  # BlockSampler's deal of one global batch
    packed = rows()
    for i, kwargs in enumerate(forward_kwargs(Collectives(world), [packed_tensors(packed, idx) for idx in order])):
        engine.backward(engine(**kwargs).loss)
        if i < accum - 1:
            engine.step()  # only counts the micro-step: DeepSpeed all-reduces in the backward of the last one

    experts_per_rank = config.num_local_experts // ep
    out = {}
    for name, param in model.named_parameters():
        local = re.search(r"deepspeed_experts\.(\d+)\.", name)
        if local:
            global_index = (rank % ep) * experts_per_rank + int(local.group(1))
            name = re.sub(EP_NAME, f"experts.{global_index}.", name)
        elif rank != 0:
            continue  # replicated: rank 0's copy
        out[name] = param.grad.detach().clone()
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_dir, settings = Path(args[0]), json.loads(args[1])  # [[accum, ep], ...]
    init_distributed(timeout_s=600)
    world, rank = dist.get_world_size(), dist.get_rank()
    for accum, ep in settings:
        grads = gradients(world, rank, accum, ep)
        torch.save(grads, out_dir / f"grads-W{world}-A{accum}-EP{ep}-rank{rank}.pt")
        dist.barrier()
    shutdown_distributed()
