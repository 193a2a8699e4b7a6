"""Expert parallelism: re-home each MoE block's experts on DeepSpeed's MoE layer.

Every rank builds the whole model (same seed, same weights); `apply_expert_parallel` then
swaps each block's `LocalExperts` for an `ExpertParallelExperts` that keeps this rank's
E/ep experts. Because it is a `deepspeed.moe.layer.MoE`, the engine treats it as native
MoE: it creates the `ep_size_N` groups, reduces expert gradients only across the
expert-data-parallel replicas, and saves `layer_{L}_expert_{E}_*` files with global ids.
Tokens move with DeepSpeed's `MOELayer` (gather into [E, C, D], all-to-all, experts,
all-to-all, combine); only the gate is ours, so routing is identical at every EP size.

The router, shared experts and the rest of the model stay outside the DeepSpeed module,
so they are ordinary data-parallel parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..model.moe import LocalExperts, MoEBlock
from ..model.routing import Routing, count_per_expert


class ExpertParallelError(ValueError):
    """An expert-parallel layout that cannot work, caught before any group is built."""


def validate_expert_parallel(*, num_experts: int, ep_size: int, world_size: int) -> None:
    if ep_size < 1:
        raise ExpertParallelError(f"moe.ep_size={ep_size} is invalid: must be >= 1")
    if world_size % ep_size:
        raise ExpertParallelError(
            f"moe.ep_size={ep_size} does not divide the world size {world_size}: "
            f"valid ep_size values here are {divisors(world_size)}"
        )
    if num_experts and num_experts % ep_size:
        raise ExpertParallelError(
            f"moe.ep_size={ep_size} does not divide num_experts={num_experts}: "
            f"valid ep_size values are {divisors(num_experts)}"
        )


def divisors(n: int) -> list[int]:
    """n's divisors in ascending order, from the pairs (d, n // d) with d up to sqrt(n): error messages list them
    for counts a user typed, and a loop up to n itself ran for minutes at n = 10**11."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


class _PrecomputedGate(nn.Module):
    """Stands in for DeepSpeed's TopKGate: the model's Router has already chosen the routes.

    `MOELayer.forward` hands its gate whatever came as its second input; we pass the
    `Routing` there and translate it into the sparse-route triples the dispatcher wants.
    """

    def __init__(self):
        super().__init__()
        self.ep_group = None

    def _set_ep_group(self, group) -> None:
        self.ep_group = group

    def forward(self, x_TD, routing: Routing, sparse_routes=True, use_tutel=False):
        import deepspeed.comm as dist

        counts_E = count_per_expert(routing.expert_idx_TK, routing.num_experts, weight=routing.keep_TK)
        capacity = routing.capacity
        if capacity is None:
            # Dropless: the all-to-all splits evenly, so every EP rank must use the same buffer
            # size; take the largest per-expert count in the group, as DeepSpeed does.
            largest = counts_E.max().reshape(1)
            dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=self.ep_group)
            # The layer's one host sync under EP (a cost the speed benchmarks count): the buffer size is a shape, and
            # every rank must agree on it before the all-to-all. Capacity routing needs none.
            capacity = max(int(largest), 1)
        keep_KT = routing.keep_TK.t()
        idx_KT = torch.where(keep_KT, routing.expert_idx_TK.t(), -1).int().contiguous()
        loc_KT = (routing.position_TK.t() * keep_KT).int().contiguous()
        gates_KT = routing.weight_TK.t().float().contiguous()
        no_aux = x_TD.new_zeros(())  # balancing losses are the Router's, already in routing.loss
        return no_aux, capacity, routing.num_experts, idx_KT, loc_KT, gates_KT, counts_E


def _expert_shard_class():
    from deepspeed.moe.experts import Experts

    class ExpertShard(Experts):
        """DeepSpeed's expert container, holding this rank's slice instead of deep copies."""

        def __init__(self, local: LocalExperts, group_name: str):
            nn.Module.__init__(self)  # Experts.__init__ would deep-copy one expert into every slot
            self.deepspeed_experts = local
            self.num_local_experts = len(local)
            for param in local.parameters():
                # The tags DeepSpeed reads to reduce these grads over expert-data-parallel ranks only.
                param.allreduce = False
                param.group_name = group_name

        def forward(self, inputs_GECD: torch.Tensor) -> torch.Tensor:
            """`Experts.forward`'s contract: G = ep_size source ranks, E = local experts, C slots.

            DeepSpeed's version chunks dim 1 and calls each expert in a Python loop; here all
            local experts run at once, one batched matmul per projection on [E, G*C, D].
            """
            G, E, C, D = inputs_GECD.shape
            x_ECD = inputs_GECD.transpose(0, 1).reshape(E, G * C, D)
            return self.deepspeed_experts.forward_buffer(x_ECD).view(E, G, C, D).transpose(0, 1)

    return ExpertShard


def _expert_parallel_class():
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.sharded_moe import MOELayer
    from deepspeed.utils import groups

    class ExpertParallelExperts(MoE):
        """A block's experts, sharded over the `ep_size` ranks of its expert-parallel group."""

        def __init__(self, experts: LocalExperts, ep_size: int):
            nn.Module.__init__(self)  # MoE.__init__ builds its own gate and deep-copied experts
            self.num_experts, self.ep_size = len(experts), ep_size
            self.num_local_experts = self.num_experts // ep_size
            self.expert_group_name = f"ep_size_{ep_size}"
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False
            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(ep_size)
            first = groups._get_expert_parallel_rank(self.expert_group_name) * self.num_local_experts
            local = experts[first : first + self.num_local_experts]
            shard = _expert_shard_class()(local, self.expert_group_name)
            self.deepspeed_moe = MOELayer(
                _PrecomputedGate(), shard, self.expert_group_name, ep_size, self.num_local_experts
            )
            self.deepspeed_moe._set_ep_group(groups._get_expert_parallel_group(self.expert_group_name))

        def forward(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
            if self.ep_size == 1:
                # Nothing to exchange: skip the capacity buffer and run the exact slices.
                return self.deepspeed_moe.experts.deepspeed_experts(x_TD, routing)
            return self.deepspeed_moe(x_TD, routing)

    return ExpertParallelExperts


def apply_expert_parallel(model: nn.Module, ep_size: int) -> nn.Module:
    """Shard every MoE block's experts over expert-parallel groups of `ep_size` ranks.

    Needs `deepspeed.init_distributed()` first. The non-local experts are dropped.
    """
    cls = _expert_parallel_class()
    for module in model.modules():
        if isinstance(module, MoEBlock) and isinstance(module.experts, LocalExperts):
            module.experts = cls(module.experts, ep_size)
    return model
