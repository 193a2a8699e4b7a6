"""Feed-forward layers: the dense MLP (also each expert's body) and the MoE block.

The MoE block is router -> experts -> (+ shared experts). It knows nothing of expert
parallelism: `experts` is a `LocalExperts` here, and `moe_dist.parallel.expert_parallel` swaps in
DeepSpeed's MoE layer, which takes the same `(x_TD, routing)` call, for EP > 1. The
per-expert weight layout (`experts.{global_id}.up_proj.weight`, ...) is the same in both.

Shape suffixes: B batch, S sequence, T = B*S tokens, D model width, K top-k, R = K*T routes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .routing import Router, Routing


class FeedForward(nn.Module):
    """GPT-2 MLP (GELU, tanh approximation) or a SwiGLU MLP (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias) if activation == "swiglu" else None
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(x)
        h = F.silu(self.gate_proj(x)) * h if self.gate_proj is not None else F.gelu(h, approximate="tanh")
        return self.down_proj(h)


class LocalExperts(nn.ModuleList):
    """All of a layer's experts on one device, run dropless or with capacity.

    Routes are sorted by expert and every expert runs once on its exact slice, so there
    is no padding to a capacity buffer: top-1 costs the FLOPs of the dense FFN it replaces.
    """

    def forward(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        T, E = x_TD.shape[0], len(self)
        expert_R = routing.expert_idx_TK.t().reshape(-1)  # route-major, as in assign_positions
        if routing.capacity is not None:
            # Dropped routes go to a sentinel expert E that sorts last and never runs. Boolean
            # indexing would size its output from the data: a second device sync on GPU.
            expert_R = expert_R.masked_fill(~routing.keep_TK.t().reshape(-1), E)
        order_R = torch.argsort(expert_R, stable=True)  # by expert, route order within one
        # The split sizes must live on the host; this is the block's one device sync.
        counts = torch.bincount(expert_R, minlength=E + 1).tolist()
        order_R = order_R[:len(order_R) - counts[E]]
        token_R = order_R % T  # route k*T + t is token t's k-th choice
        weight_R = routing.weight_TK.t().reshape(-1).index_select(0, order_R)
        # Every expert runs, even on zero rows, so each gets a (zero) gradient and no
        # parameter is "unused" for DDP or ZeRO.
        y_RD = torch.cat([expert(chunk) for expert, chunk in zip(self, x_TD.index_select(0, token_R).split(counts[:E]))])
        # Weighted sum over a token's routes in fp32, as DeepSpeed's combine does.
        out_TD = torch.zeros(T, x_TD.shape[1], dtype=torch.float32, device=x_TD.device)
        out_TD.index_add_(0, token_R, y_RD.float() * weight_R.unsqueeze(1))
        return out_TD.to(x_TD.dtype)


class MoEBlock(nn.Module):
    """Routed experts plus optional always-on shared experts (DeepSeekMoE, arXiv:2401.06066)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        width, act = config.moe_intermediate_size, config.hidden_act
        self.router = Router(config, layer_idx)
        self.experts = LocalExperts(
            FeedForward(config.hidden_size, width, act, config.expert_bias) for _ in range(config.num_local_experts))
        # n shared experts of width w are one MLP of width n*w: same function, one matmul.
        self.shared_mlp = (FeedForward(config.hidden_size, config.num_shared_experts * width, act, config.expert_bias)
                           if config.num_shared_experts else None)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routing = self.router(x_TD)
        y_TD = self.experts(x_TD, routing)
        if self.shared_mlp is not None:
            y_TD = y_TD + self.shared_mlp(x_TD)
        return y_TD.view_as(x_BSD), routing.loss
