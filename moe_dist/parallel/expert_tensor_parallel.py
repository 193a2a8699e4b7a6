"""Expert tensor parallelism (ETP): every expert sliced over `etp_size` ranks, combined with EP.

Layout. The world is split into blocks of P*T consecutive ranks (P = ep_size, T = etp_size); the
blocks are data-parallel replicas of the experts. Inside a block, rank j = p*T + t holds slice t
of the experts of EP rank p (E/P of them). So:
- the ETP group of a rank is its T consecutive neighbours with the same p (the most traffic, kept
  on the nearest ranks);
- the token all-to-all (EP > 1) runs over the P ranks of the block with the same t;
- a slice's gradient is reduced over the ranks with the same j in other blocks: exactly
  DeepSpeed's expert-data-parallel groups of `ep_size_{P*T}`, which also names the slices in
  checkpoints (file id = j * E/P + local expert; `checkpoint.formats` decodes it).
DeepSpeed's groups API gives the `ep_size_{P*T}` groups; the ETP and all-to-all groups have no
counterpart there (its own ETP needs a Megatron `mpu`), so they come from `dist.new_group`.

Forward. Each rank routes its OWN tokens (router, aux and z losses exactly as without ETP, so no
loss is counted twice), then the ETP group all-gathers the tokens and their routing. Every rank
of the group must run the same routes on the same gathered tokens; gathering the routing gives
exactly that (each token is routed once, by the rank that owns it, and every rank of the group
then holds the identical gathered routing by construction) and costs no repeated gate matmul.
Each rank runs its slice of every local expert on the gathered tokens: W1/W3 (up/gate) split by
output columns with their biases, W2 (down) by input rows, its bias held and added by slice 0
only. A reduce-scatter sums the partial outputs and hands each rank its own rows. The backward
is the mirror image: the all-gather's gradient is a reduce-scatter and vice versa.

Tokens per rank must be equal inside an ETP group (the trainer's fixed micro-batch shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.formats import slice_dim
from ..model.lora import adapt_like
from ..model.moe import FeedForward, LocalExperts, MoEBlock
from ..model.routing import Routing, assign_positions
from .expert_parallel import ExpertParallelError, _expert_shard_class, _PrecomputedGate, divisors

# ---- layout ---------------------------------------------------------------------------------


def validate_expert_tensor_parallel(
    *, num_experts: int, intermediate_size: int, ep_size: int, etp_size: int, world_size: int
) -> None:
    """Refuse a DP x EP x ETP layout that cannot work, with one line naming the valid values."""
    P, T = ep_size, etp_size
    if T < 1:
        raise ExpertParallelError(f"moe.etp_size={T} is invalid: must be >= 1")
    if intermediate_size % T:
        raise ExpertParallelError(
            f"moe.etp_size={T} does not divide the expert width moe_intermediate_size="
            f"{intermediate_size}: valid etp_size values are {divisors(intermediate_size)}"
        )
    if world_size % (P * T):
        fits = [t for t in divisors(intermediate_size) if world_size % (P * t) == 0]
        valid = (
            f"with ep_size={P}, valid etp_size values here are {fits}"
            if fits
            else f"ep_size={P} alone does not fit; valid ep_size values here are {divisors(world_size)}"
        )
        raise ExpertParallelError(
            f"moe.ep_size x moe.etp_size = {P} x {T} = {P * T} does not divide the world size {world_size}: {valid}"
        )
    if num_experts and num_experts % P:
        raise ExpertParallelError(
            f"moe.ep_size={P} does not divide num_experts={num_experts}: "
            f"valid ep_size values are {divisors(num_experts)}"
        )


@dataclass(frozen=True)
class EtpLayout:
    """Where a rank sits in the DP x EP x ETP layout (see the module docstring)."""

    world_size: int
    ep_size: int
    etp_size: int

    @property
    def block(self) -> int:
        return self.ep_size * self.etp_size

    def position(self, rank: int) -> tuple[int, int, int]:
        """(data-parallel replica, EP rank p, ETP rank t) of `rank`."""
        j = rank % self.block
        return rank // self.block, j // self.etp_size, j % self.etp_size

    def etp_groups(self) -> list[list[int]]:
        """Every ETP group: T consecutive ranks with the same (replica, p)."""
        T = self.etp_size
        return [list(range(start, start + T)) for start in range(0, self.world_size, T)]

    def all_to_all_groups(self) -> list[list[int]]:
        """Every token all-to-all group: the P ranks of a block with the same t."""
        B, T = self.block, self.etp_size
        return [list(range(base + t, base + B, T)) for base in range(0, self.world_size, B) for t in range(T)]

    def describe(self) -> str:
        return (
            f"DP {self.world_size // self.block} x EP {self.ep_size} x ETP {self.etp_size} on {self.world_size} rank(s)"
        )


def etp_bytes_per_layer(
    *, tokens_per_rank: int, hidden_size: int, top_k: int, etp_size: int, x_bytes: int, backward: bool
) -> dict[str, int]:
    """Bytes of the ETP collectives' full buffers (all-gather output, reduce-scatter input) for one MoE layer.

    Forward: all-gather the tokens [n, D], the gate weights [n, K] fp32 and the expert ids with
    their keep flags [n, 2K] int64; reduce-scatter the partial outputs [T*n, D]. Backward:
    all-gather the output gradient, reduce-scatter the token and gate-weight gradients.
    """
    gathered = etp_size * tokens_per_rank
    x = gathered * hidden_size * x_bytes
    weights, meta = gathered * top_k * 4, gathered * 2 * top_k * 8
    out = {"all_gather": x + weights + meta, "reduce_scatter": x}
    if backward:
        out = {"all_gather": out["all_gather"] + x, "reduce_scatter": out["reduce_scatter"] + x + weights}
    return out


# ---- collectives with their gradients -------------------------------------------------------


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
    dist.reduce_scatter_single(out, x.contiguous(), group=group)
    return out


class GatherRows(torch.autograd.Function):
    """All-gather along dim 0 over `group`; the gradient is summed over the group and scattered back.

    `sent` counts the bytes of every full buffer, forward and backward (the ETP cost test).
    """

    @staticmethod
    def forward(ctx, x, group, sent: dict):
        ctx.group, ctx.sent = group, sent
        out = _all_gather(x, group)
        sent["all_gather"] += out.numel() * out.element_size()
        return out

    @staticmethod
    def backward(ctx, grad):
        ctx.sent["reduce_scatter"] += grad.numel() * grad.element_size()
        return _reduce_scatter(grad, ctx.group), None, None


class ReduceScatterRows(torch.autograd.Function):
    """Sum over `group`, each rank keeping its own block of rows; the gradient is all-gathered."""

    @staticmethod
    def forward(ctx, x, group, sent: dict):
        ctx.group, ctx.sent = group, sent
        sent["reduce_scatter"] += x.numel() * x.element_size()
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        out = _all_gather(grad, ctx.group)
        ctx.sent["all_gather"] += out.numel() * out.element_size()
        return out, None, None


# ---- slicing ----------------------------------------------------------------------------------


def slice_tensor(full: torch.Tensor, key: str, t: int, T: int) -> torch.Tensor:
    """Slice t of T of one full expert tensor (weight, gradient or Adam moment) named `key`, cut along
    `slice_dim`: the inverse of `formats.merge_expert_slices`. The down bias comes back whole (slice 0's)."""
    dim = slice_dim(key)
    return full if dim is None else full.chunk(T, dim=dim)[t]


@torch.no_grad()
def slice_expert(expert: FeedForward, t: int, T: int) -> FeedForward:
    """Slice t of T of one expert, cut by `slice_tensor` (the rule the export joins slices back by).

    A slice is a narrower `FeedForward`, so `LocalExperts` runs slices unchanged. The down bias
    is added once per token, so only slice 0 keeps it. LoRA adapters come along, cut to match, and
    every parameter keeps the expert's `requires_grad` (a LoRA run's base stays frozen).
    """
    bias = expert.up_proj.bias is not None
    out = FeedForward(
        expert.up_proj.in_features,
        expert.up_proj.out_features // T,
        "swiglu" if expert.gate_proj is not None else "gelu",
        bias,
    )
    adapt_like(out, expert)
    for name, part in out.named_parameters():
        full = expert.get_parameter(name)
        part.copy_(slice_tensor(full, name, t, T))
        part.requires_grad_(full.requires_grad)
    if bias and t > 0:
        out.down_proj.register_parameter("bias", None)
    return out.to(expert.up_proj.weight.dtype)


def _sum_whole_adapter_grads(local: LocalExperts, etp_group) -> None:
    """A LoRA factor every slice holds whole (gate/up's A, down's B; `slice_dim` None) gets only its slice's
    share of the gradient on each rank: summed over the ETP group it is the whole expert's
    (tests/test_lora.py), and the T copies stay equal step after step. The hook runs before the gradient
    is accumulated, so DeepSpeed's reduction over the slice's replicas sees the sum; every rank of the
    group runs the same graph on the same gathered tokens, so the hooks' all-reduces come in one order."""

    def summed(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=etp_group)
        return grad

    for name, param in local.named_parameters():
        if param.requires_grad and name.endswith((".lora_A", ".lora_B")) and slice_dim(name) is None:
            param.register_hook(summed)


# ---- the layer -------------------------------------------------------------------------------


def _gather_routing(routing: Routing, group, sent: dict, *, T: int, positions: bool) -> Routing:
    """The ETP group's routing, rows in rank order like the gathered tokens.

    Kept routes keep their decisions; capacity grows to T x the per-rank capacity, each rank's
    kept routes fit in it. Slots (`positions`, only needed by DeepSpeed's dispatch under EP) are
    renumbered over the gathered kept routes, dropped ones parked on a sentinel expert.
    """
    K, E = routing.expert_idx_TK.shape[1], routing.num_experts
    weight_TK = GatherRows.apply(routing.weight_TK.float(), group, sent)
    meta = GatherRows.apply(torch.cat([routing.expert_idx_TK, routing.keep_TK.long()], dim=1), group, sent)
    expert_idx_TK, keep_TK = meta[:, :K], meta[:, K:].bool()
    position_TK = assign_positions(torch.where(keep_TK, expert_idx_TK, E), E + 1) if positions else None
    capacity = None if routing.capacity is None else routing.capacity * T
    return Routing(expert_idx_TK, weight_TK, position_TK, keep_TK, capacity, routing.loss, E)


def _expert_tensor_parallel_class():
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.sharded_moe import MOELayer

    class ExpertTensorParallelExperts(MoE):
        """A block's experts: E/P whole experts per EP rank, each sliced over the T ranks of its ETP group."""

        def __init__(self, experts: LocalExperts, layout: EtpLayout, rank: int, etp_group, a2a_group):
            nn.Module.__init__(self)  # MoE.__init__ builds its own gate and deep-copied experts
            P, T = layout.ep_size, layout.etp_size
            _, p, t = layout.position(rank)
            self.num_experts, self.ep_size, self.etp_size = len(experts), P, T
            self.num_local_experts = self.num_experts // P
            # The group DeepSpeed reduces, partitions and names the slices by (module docstring).
            self.expert_group_name = f"ep_size_{layout.block}"
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False  # DeepSpeed's Megatron-mpu ETP: not this one
            self.etp_group, self.sent = etp_group, {"all_gather": 0, "reduce_scatter": 0}
            first = p * self.num_local_experts
            local = LocalExperts(slice_expert(e, t, T) for e in experts[first : first + self.num_local_experts])
            _sum_whole_adapter_grads(local, etp_group)
            shard = _expert_shard_class()(local, self.expert_group_name)
            self.deepspeed_moe = MOELayer(_PrecomputedGate(), shard, self.expert_group_name, P, self.num_local_experts)
            if a2a_group is not None:
                self.deepspeed_moe._set_ep_group(a2a_group)

        def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
            # deepspeed.initialize calls this on every MoE layer to hand MOELayer the `ep_size_{P*T}`
            # group for its all-to-all; ours runs over the P ranks with the same slice, set above.
            pass

        def forward(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
            x_all = GatherRows.apply(x_TD, self.etp_group, self.sent)
            routing_all = _gather_routing(
                routing, self.etp_group, self.sent, T=self.etp_size, positions=self.ep_size > 1
            )
            if self.ep_size == 1:  # nothing to exchange: the exact slices, no capacity buffer
                y_partial = self.deepspeed_moe.experts.deepspeed_experts(x_all, routing_all)
            else:
                y_partial = self.deepspeed_moe(x_all, routing_all)
            # Partial sums travel in the activations' dtype (bf16 under bf16 training).
            return ReduceScatterRows.apply(y_partial, self.etp_group, self.sent)

    return ExpertTensorParallelExperts


def apply_expert_tensor_parallel(model: nn.Module, *, ep_size: int, etp_size: int, timeout_s: int) -> EtpLayout:
    """Slice every MoE block's experts over DP x EP x ETP; returns the layout.

    Needs `deepspeed.init_distributed()` first. Every rank must call it (it creates groups).
    """
    from deepspeed.utils import groups

    layout = EtpLayout(dist.get_world_size(), ep_size, etp_size)
    rank, timeout = dist.get_rank(), timedelta(seconds=timeout_s)
    if f"ep_size_{layout.block}" not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(layout.block)
    # new_group is collective: every rank creates every group, in the same order, and keeps its own.
    etp_group = _own_group(layout.etp_groups(), rank, timeout)
    a2a_group = _own_group(layout.all_to_all_groups(), rank, timeout) if ep_size > 1 else None
    cls = _expert_tensor_parallel_class()
    for module in model.modules():
        if isinstance(module, MoEBlock) and isinstance(module.experts, LocalExperts):
            module.experts = cls(module.experts, layout, rank, etp_group, a2a_group)
    return layout


def _own_group(all_ranks: list[list[int]], rank: int, timeout: timedelta):
    mine = None
    for ranks in all_ranks:
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = group
    return mine
