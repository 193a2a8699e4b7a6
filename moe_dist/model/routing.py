"""Routers: which experts see which tokens, with what weight, and what balancing costs.

Pure torch, no DeepSpeed: the functions are the math, `Router` holds the parameters and
the per-layer statistics of the last forward. The expert-parallel layer consumes the same
`Routing` that the single-device path does, so both drop exactly the same tokens.

Shape suffixes: T tokens, D model width, E experts, K experts per token (top-k).

`real_T` (None, or a bool per token) marks the tokens that count: packed conversations pad the end of a
row, and padding must not move the balancing losses, the aux-loss-free bias or the statistics. None
means every token is real, and then each function computes exactly what it did before the mask existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """The routing decision for one MoE layer's tokens."""

    expert_idx_TK: torch.Tensor  # int64; column 0 is each token's first choice
    weight_TK: torch.Tensor  # fp32 gate weights; 0 where the route was dropped
    position_TK: torch.Tensor  # int64 slot of the route in its expert's buffer
    keep_TK: torch.Tensor  # bool; False where capacity dropped the route
    capacity: int | None  # slots per expert; None = dropless
    # Weighted aux + z loss, to be added to the LM loss; with the "stock" aux loss the vector of
    # `stock_balance_terms` instead, which the model sums over layers and hands to `total_router_loss`.
    loss: torch.Tensor
    num_experts: int


# ---- pure functions -------------------------------------------------------------------


def mean_over(x_T: torch.Tensor, real_T: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens (all of them when `real_T` is None)."""
    if real_T is None:
        return x_T.mean()
    return (x_T * real_T).sum() / real_T.sum().clamp_min(1)


def real_routes(expert_idx_TK: torch.Tensor, real_T: torch.Tensor | None) -> torch.Tensor | None:
    """`real_T` per route (T, K), for `count_per_expert`'s weight."""
    return None if real_T is None else real_T[:, None].expand_as(expert_idx_TK)


def count_per_expert(expert_idx: torch.Tensor, num_experts: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """How many routes (optionally: kept routes) each expert got, as int64.

    A scatter-add into a fixed-size buffer: `bincount` sizes its output from the data, and a
    boolean-mask gather does too, so both would stall the GPU on a host sync every layer.
    """
    idx = expert_idx.reshape(-1)
    ones = torch.ones_like(idx) if weight is None else weight.reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.long, device=idx.device).scatter_add_(0, idx, ones)


def load_balancing_loss(
    *, probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor, num_experts: int, real_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer aux loss (arXiv:2101.03961 eq. 4-6), GShard's top-k form.

    E * sum_e f_e * P_e, with f_e the fraction of routes sent to expert e (before capacity
    drops) and P_e its mean router probability. It is 1 for perfectly uniform routing.
    """
    counts_E = count_per_expert(expert_idx_TK, num_experts, real_routes(expert_idx_TK, real_T)).to(probs_TE.dtype)
    if real_T is None:
        return num_experts * torch.sum(counts_E / expert_idx_TK.numel() * probs_TE.mean(dim=0))
    tokens = real_T.sum().clamp_min(1)
    P_E = (probs_TE * real_T[:, None]).sum(dim=0) / tokens
    return num_experts * torch.sum(counts_E / (tokens * expert_idx_TK.shape[1]) * P_E)


def stock_balance_terms(
    *, weighted_z: torch.Tensor, probs_TE: torch.Tensor, top_k: int, real_T: torch.Tensor | None = None
) -> torch.Tensor:
    """One layer's share of transformers' `load_balancing_loss_func`, as a vector [z, counts_E, prob_sums_E, rows].

    The stock loss pools every MoE layer before it multiplies (f_e = all layers' top-k choices of e over all
    layers' rows, so f sums to k; P_e likewise): it does not split into per-layer losses, so the layers hand
    their sums up and the model adds them. The top-k is of the plain probabilities, without a selection bias,
    as the stock function recomputes it from the router logits.
    """
    num_experts = probs_TE.shape[-1]
    choices_TK = probs_TE.topk(top_k, dim=-1).indices
    counts_E = count_per_expert(choices_TK, num_experts, real_routes(choices_TK, real_T)).to(probs_TE.dtype)
    if real_T is None:
        return torch.cat([weighted_z.reshape(1), counts_E, probs_TE.sum(dim=0), probs_TE.new_full((1,), len(probs_TE))])
    sums_E = (probs_TE * real_T[:, None]).sum(dim=0)
    return torch.cat([weighted_z.reshape(1), counts_E, sums_E, real_T.sum().reshape(1).to(probs_TE.dtype)])


def total_router_loss(summed: torch.Tensor, *, num_experts: int, aux_coef: float) -> torch.Tensor:
    """The router loss of a forward from the sum over its layers of `Routing.loss`: a scalar as it is, the
    vectors of `stock_balance_terms` as z + coef * E * sum_e f_e * P_e (transformers' formula)."""
    if summed.dim() == 0:
        return summed
    E = num_experts
    counts_E, prob_sums_E, rows = summed[1 : E + 1], summed[E + 1 : 2 * E + 1], summed[2 * E + 1]
    return summed[0] + aux_coef * E * torch.sum((counts_E / rows) * (prob_sums_E / rows))


def router_z_loss(*, logits_TE: torch.Tensor, real_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss (arXiv:2202.08906 eq. 5): mean squared log-partition, keeps logits small."""
    return mean_over(torch.logsumexp(logits_TE, dim=-1).square(), real_T)


def routing_entropy(probs_TE: torch.Tensor, real_T: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of -sum_e p log p: log E for uniform routing, 0 for one-hot."""
    return mean_over(-(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(dim=-1), real_T)


def expert_capacity(*, num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """Slots per expert: capacity_factor times the fair share of the T*K routes.

    Capped at T, since top-k picks distinct experts and an expert never sees a token twice.
    """
    fair = math.ceil(num_tokens * top_k / num_experts * capacity_factor)
    return min(max(fair, min_capacity), num_tokens)


def assign_positions(expert_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slot of every route in its expert's buffer.

    Priority is route-major, as in GShard: every token's first choice is placed before any
    second choice, then token order. Capacity therefore drops second choices first.
    """
    T, K = expert_idx_TK.shape
    expert_R = expert_idx_TK.t().reshape(-1)  # R = K*T routes, route-major
    # A stable sort keeps route order within each expert, so a route's slot is its rank in
    # the sorted list minus the rank of its expert's first route. This equals the one-hot
    # cumsum over [R, E] but costs O(R log R), not O(R * E): on one CPU core 1.5-2.5x
    # faster at 2k-8k tokens and 8-16 experts, 5x at 32k tokens.
    sorted_R, order_R = torch.sort(expert_R, stable=True)
    start_E = torch.searchsorted(sorted_R, torch.arange(num_experts, device=expert_R.device, dtype=expert_R.dtype))
    rank_R = torch.arange(expert_R.numel(), device=expert_R.device) - start_E.index_select(0, sorted_R)
    position_R = torch.empty_like(rank_R).scatter_(0, order_R, rank_R)
    return position_R.view(K, T).t()


def aux_free_bias_update(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3 aux-loss-free balancing (arXiv:2412.19437 §2.1.2).

    Raise the selection bias of under-loaded experts and lower it for over-loaded ones by
    a fixed step; the bias only changes which experts are chosen, never the gate weight.
    """
    load_E = load_E.to(bias_E.dtype)
    return bias_E + rate * torch.sign(load_E.mean() - load_E)


# ---- the router module ----------------------------------------------------------------


class Router(nn.Module):
    """Token-choice top-k router with capacity, jitter, z-loss and aux-loss-free bias.

    Reads its settings from `config` (a `MoEConfig`) where they are used, so there is one
    copy of each. The tensor names (`weight`, `score_bias`, `load_sum`) are checkpoint and
    export keys: exports written by earlier versions load into this class unchanged.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        E = config.num_local_experts
        # A random router is a fixed random projection: a deterministic, untrained baseline
        # in the spirit of hash routing (Roller et al. 2021, arXiv:2106.04426).
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size), requires_grad=not self.is_random)
        self.register_buffer("score_bias", torch.zeros(E))
        # The bias-update window: selections counted since the last update. int64 so that
        # casting the model to bf16 cannot round the counts.
        self.register_buffer("load_sum", torch.zeros(E, dtype=torch.long), persistent=False)
        self.stats: dict[str, torch.Tensor] = {}

    @property
    def num_experts(self) -> int:
        return self.config.num_local_experts

    @property
    def is_random(self) -> bool:
        return self.config.router_type == "random"

    freeze_bias = False  # the trainer's --freeze_router_bias: the bias stays as loaded

    @property
    def updates_bias(self) -> bool:
        """Whether this router balances by the aux-loss-free selection bias (rate > 0, not frozen)."""
        return self.config.router_bias_update_rate > 0 and not self.freeze_bias

    def _apply(self, fn, recurse=True):
        # The balancing bias moves in 1e-3 steps that bf16 would round away: keep it fp32
        # when the engine casts the model.
        bias = self.score_bias
        super()._apply(fn, recurse)
        if self.score_bias.dtype != torch.float32:
            self.score_bias = self.score_bias.float() if bias.is_meta else bias.to(self.score_bias.device)
        return self

    def capacity(self, num_tokens: int) -> int | None:
        c = self.config
        factor = c.capacity_factor if self.training else c.eval_capacity_factor
        if factor is None:
            return None
        return expert_capacity(
            num_tokens=num_tokens,
            num_experts=self.num_experts,
            top_k=c.num_experts_per_tok,
            capacity_factor=factor,
            min_capacity=c.min_capacity,
        )

    def forward(self, x_TD: torch.Tensor, real_T: torch.Tensor | None = None) -> Routing:
        # Routing in fp32: bf16 logits flip near-ties and overflow the z-loss. Autocast would
        # recast F.linear to bf16 despite the .float() calls, so it is switched off here.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self._route(x_TD.float(), real_T)

    def _route(self, x_TD: torch.Tensor, real_T: torch.Tensor | None) -> Routing:
        c = self.config
        jitter = c.router_jitter_noise
        if self.training and jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - jitter, 1 + jitter)
        logits_TE = F.linear(x_TD, self.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        K = c.num_experts_per_tok

        if self.is_random:
            expert_idx_TK = logits_TE.topk(K, dim=-1).indices
            weight_TK = torch.full(expert_idx_TK.shape, 1.0 / K, device=x_TD.device)
            loss = logits_TE.new_zeros(())
            aux = z = loss
        else:
            expert_idx_TK = (probs_TE + self.score_bias).topk(K, dim=-1).indices
            weight_TK = probs_TE.gather(1, expert_idx_TK)
            if c.norm_topk_prob:
                weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
            aux = load_balancing_loss(
                probs_TE=probs_TE, expert_idx_TK=expert_idx_TK, num_experts=self.num_experts, real_T=real_T
            )
            z = router_z_loss(logits_TE=logits_TE, real_T=real_T)
            loss = self._loss(probs_TE, aux, z, real_T)

        capacity = self.capacity(x_TD.shape[0])
        position_TK = assign_positions(expert_idx_TK, self.num_experts)
        keep_TK = position_TK < capacity if capacity is not None else torch.ones_like(expert_idx_TK, dtype=torch.bool)
        weight_TK = weight_TK * keep_TK
        self._record(probs_TE, expert_idx_TK, keep_TK, aux, z, real_T)
        return Routing(expert_idx_TK, weight_TK, position_TK, keep_TK, capacity, loss, self.num_experts)

    def _loss(self, probs_TE, aux, z, real_T) -> torch.Tensor:
        c = self.config
        if c.router_aux_loss == "stock":
            return stock_balance_terms(
                weighted_z=c.router_z_loss_coef * z, probs_TE=probs_TE, top_k=c.num_experts_per_tok, real_T=real_T
            )
        aux_coef = c.router_aux_loss_coef if c.router_aux_loss == "per_layer" else 0.0
        return aux_coef * aux + c.router_z_loss_coef * z

    @torch.no_grad()
    def _record(self, probs_TE, expert_idx_TK, keep_TK, aux, z, real_T) -> None:
        """Keep this forward's statistics as tensors; reading them (a host sync) is the logger's call."""
        real_TK = real_routes(expert_idx_TK, real_T)
        kept_TK = keep_TK if real_TK is None else keep_TK & real_TK
        self.stats = {
            "selected_per_expert": count_per_expert(expert_idx_TK, self.num_experts, weight=real_TK),
            "tokens_per_expert": count_per_expert(expert_idx_TK, self.num_experts, weight=kept_TK),
            "drop_fraction": 1.0 - mean_over(keep_TK.float(), None if real_TK is None else real_TK.float()),
            "entropy": routing_entropy(probs_TE, real_T),
            "aux_loss": aux.detach(),
            "z_loss": z.detach(),
            "score_bias": self.score_bias.clone(),
        }

    @torch.no_grad()
    def accumulate_load(self) -> None:
        """Add the last forward's selection counts to the bias-update window.

        Called once per model forward, outside the layers, so that activation-checkpoint
        recomputation (which re-runs the layers) does not count tokens twice.
        """
        if self.updates_bias and self.stats:
            self.load_sum += self.stats["selected_per_expert"]

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor | None = None, apply: bool = True) -> None:
        """Apply one aux-loss-free step from `load_E`, then start a new window.

        `load_E` defaults to this router's own window (`load_sum`). Under data parallelism
        the caller passes the window summed over ranks, so every replica moves its bias
        identically; summing is the engine's job, not the model's (one collective for all
        layers, see `TrainEngine.update_router_biases`). With `apply=False` (a skipped,
        non-finite step, agreed by all ranks) the window is dropped instead.
        """
        if self.updates_bias and apply:
            load_E = self.load_sum if load_E is None else load_E
            self.score_bias.copy_(aux_free_bias_update(self.score_bias, load_E, self.config.router_bias_update_rate))
        self.load_sum.zero_()
