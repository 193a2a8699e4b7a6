"""Feed-forward layers: the dense MLP (also each expert's body) and the MoE block.

The MoE block is router -> experts -> (+ shared experts). It knows nothing of expert
parallelism: `experts` is a `LocalExperts` here, and `moe_dist.parallel.expert_parallel` swaps in
DeepSpeed's MoE layer, which takes the same `(x_TD, routing)` call, for EP > 1. The
per-expert weight layout (`experts.{global_id}.up_proj.weight`, ...) is the same in both.

Shape suffixes: B batch, S sequence, T = B*S tokens, D model width, K top-k, R = K*T routes,
E experts, C slots per expert, I / O a projection's input / output width.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .routing import Router, Routing, count_per_expert

logger = logging.getLogger(__name__)


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


# ---- grouped expert GEMM ------------------------------------------------------------------


def grouped_refusal(device_type: str, dtype: torch.dtype, hidden_size: int, intermediate_size: int) -> str | None:
    """Why `torch.nn.functional.grouped_mm` cannot run the experts here, or None where it can.

    The conditions are torch's own, read in ATen's GroupedMMUtils.h (checked on CPU with torch
    2.13): every non-unit stride a multiple of 16 bytes, so D and I multiples of 4 in fp32 and
    8 in bf16.
    """
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no grouped_mm"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"grouped_mm is not used for {dtype}"
    if (hidden_size * dtype.itemsize) % 16 or (intermediate_size * dtype.itemsize) % 16:
        return f"widths {hidden_size}/{intermediate_size} in {dtype} are not multiples of 16 bytes"
    if device_type not in ("cpu", "cuda"):
        return f"grouped_mm is untested on {device_type}"
    return None


@functools.cache
def experts_impl(device: torch.device, dtype: torch.dtype, hidden_size: int, intermediate_size: int) -> str:
    """ "grouped" where `grouped_mm` runs all experts as one kernel per projection, else "loop".

        Decided once per (device, dtype, shape) and logged once; the forward only looks it up.
        CUDA bf16 on sm90/sm100 has a grouped kernel (cuda/GroupedBlas.cpp; not yet checked on a
        GPU), and only sm90 takes it: on sm100 an upstream report (pytorch issue 172439, not
        verified here) gives empty groups non-zero weight gradients. Everywhere else grouped_mm is
    `_grouped_mm_fallback`, a C++ loop of one matmul
        per expert, which on CUDA first copies `offs` to the host (a sync). On CPU that C++ loop,
        plus the per-forward weight stack, was slower than the Python loop in every benchmark cell
        but two, where they were within 1% (docs/bench: one seed-shape layer at E=8 0.66x dense
        against 0.95x, the 4096-token tiny step at E=16 0.87x against 0.99x). The loop's one
        `.tolist()` per layer costs a CPU tensor no device wait, so the CPU takes the loop.
    """
    reason = grouped_refusal(device.type, dtype, hidden_size, intermediate_size)
    if reason is None and device.type == "cpu":
        reason = "on CPU grouped_mm is a serial loop of matmuls, measured slower than the expert loop"
    if reason is None and device.type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        if dtype != torch.bfloat16 or major not in (9, 10):
            reason = "CUDA has a grouped kernel for bf16 on sm90/sm100 only (elsewhere it syncs and loops)"
        elif major == 10:
            reason = (
                "sm100's grouped kernel is reported to give empty experts non-zero weight gradients "
                "(pytorch issue 172439); the grouped path runs on sm90 only until a test shows otherwise"
            )
    impl = "loop" if reason else "grouped"
    logger.info(
        "MoE experts on %s %s (d %d, ffn %d): %s%s",
        device,
        dtype,
        hidden_size,
        intermediate_size,
        impl,
        f" ({reason})" if reason else "",
    )
    return impl


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts' matmuls run in: autocast's where it is on (accelerate's bf16), else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class GroupedMatmul(torch.autograd.Function):
    """y_RO[r] = x_RI[r] @ w_EOI[e(r)]^T, rows sorted by expert: expert e's rows end at offs_E[e].

    The weight is in `nn.Linear` layout ([out, in]) per expert, so the weight gradient comes out
    in the parameters' own layout and autograd hands each expert a contiguous slice, no copy.
    torch 2.13's own backward of grouped_mm fails on CPU ("Invalid strides/sizes"), so the
    gradients are written out: dx = grouped_mm(dy, w, offs), and the 2-D x 2-D form with the
    groups along the contraction gives dw_EOI = grouped_mm(dy^T, x, offs). Rows past offs[-1]
    belong to no expert: grouped_mm leaves their output and input gradient uninitialised (the
    caller masks them) and they never touch another row or the weight gradient.
    """

    @staticmethod
    def forward(ctx, x_RI, w_EOI, offs_E):
        ctx.save_for_backward(x_RI, w_EOI, offs_E)
        return F.grouped_mm(x_RI, w_EOI.transpose(-2, -1), offs=offs_E)

    @staticmethod
    def backward(ctx, dy_RO):
        x_RI, w_EOI, offs_E = ctx.saved_tensors
        dy_RO = dy_RO.contiguous()  # autograd may hand an expanded (stride-0) gradient
        dx_RI = F.grouped_mm(dy_RO, w_EOI, offs=offs_E) if ctx.needs_input_grad[0] else None
        dw_EOI = F.grouped_mm(dy_RO.t(), x_RI, offs=offs_E) if ctx.needs_input_grad[1] else None
        return dx_RI, dw_EOI, None


class LocalExperts(nn.ModuleList):
    """All of a layer's experts on one device, run dropless or with capacity.

    Routes are sorted by expert and every expert runs once on its exact slice, so there
    is no padding to a capacity buffer: top-1 costs the FLOPs of the dense FFN it replaces.
    Where `experts_impl` picks it (CUDA bf16 on sm90), all experts run as one grouped
    GEMM per projection with device-side offsets (no host sync); elsewhere, the CPU included,
    as a Python loop over the experts.

    The weights stay per-expert `nn.Linear`s (checkpoint, DeepSpeed per-expert files and export
    keys unchanged); the grouped and batched paths stack them per forward (`stacked`), and
    autograd splits the gradient back.
    """

    impl: str | None = None  # None: `experts_impl` decides; "grouped" / "loop" force one (tests, benchmarks)

    def stacked(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projection `name` of every expert: weight [E, O, I] (nn.Linear layout) in `dtype`, and bias
        [E, O] (in the parameters' own dtype: callers gather or add it at the precision they need) or None."""
        projs = [getattr(expert, name) for expert in self]
        bias_EO = torch.stack([p.bias for p in projs]) if projs[0].bias is not None else None
        return torch.stack([p.weight for p in projs]).to(dtype), bias_EO

    def _ffn(self, x: torch.Tensor, linear) -> torch.Tensor:
        """The expert MLP of `FeedForward`, with `linear(name, h)` applying every expert's projection."""
        h = linear("up_proj", x)
        h = F.silu(linear("gate_proj", x)) * h if self[0].gate_proj is not None else F.gelu(h, approximate="tanh")
        return linear("down_proj", h)

    def forward(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        T, E = x_TD.shape[0], len(self)
        expert_R = routing.expert_idx_TK.t().reshape(-1)  # route-major, as in assign_positions
        if routing.capacity is not None:
            # Dropped routes go to a sentinel expert E that sorts last and never runs. Boolean
            # indexing would size its output from the data: a device sync on GPU.
            expert_R = expert_R.masked_fill(~routing.keep_TK.t().reshape(-1), E)
        order_R = torch.argsort(expert_R, stable=True)  # by expert, route order within one
        counts_E1 = count_per_expert(expert_R, E + 1)  # a scatter-add: bincount would sync on CUDA
        token_R = order_R % T  # route k*T + t is token t's k-th choice
        x_RD = x_TD.index_select(0, token_R)
        dtype = _compute_dtype(x_TD)
        if self._impl(x_TD.device, dtype) == "grouped":
            y_RD = self._grouped(
                x_RD.to(dtype), expert_R.index_select(0, order_R), counts_E1, routing.capacity is not None
            )
        else:
            y_RD = self._loop(x_RD, counts_E1)
        weight_R = routing.weight_TK.t().reshape(-1).index_select(0, order_R)  # 0 for dropped routes
        # Weighted sum over a token's routes in fp32, as DeepSpeed's combine does.
        out_TD = torch.zeros(T, x_TD.shape[1], dtype=torch.float32, device=x_TD.device)
        out_TD.index_add_(0, token_R, y_RD.float() * weight_R.unsqueeze(1))
        return out_TD.to(x_TD.dtype)

    def _impl(self, device: torch.device, dtype: torch.dtype) -> str:
        """The path this forward takes: the forced one (if torch can run it), else `experts_impl`'s choice."""
        up = self[0].up_proj
        if self.impl != "grouped":
            return self.impl or experts_impl(device, dtype, up.in_features, up.out_features)
        reason = grouped_refusal(device.type, dtype, up.in_features, up.out_features)
        if reason:
            raise ValueError(f"LocalExperts.impl='grouped' cannot run here: {reason}")
        return "grouped"

    def _grouped(self, x_RD, expert_R, counts_E1, drops: bool) -> torch.Tensor:
        """One grouped GEMM per projection over the expert-sorted routes; no host sync."""
        E = len(self)
        offs_E = counts_E1[:E].cumsum(0).to(torch.int32)

        def matmul(h_RI, w_EOI):
            return GroupedMatmul.apply(h_RI, w_EOI, offs_E)

        def linear(name, h_RI):
            w_EOI, b_EO = self.stacked(name, h_RI.dtype)
            y_RO = self.adapted(name, h_RI, matmul(h_RI, w_EOI), matmul)
            if b_EO is None:
                return y_RO
            # Bias per row, gathered by expert id (the sentinel E of dropped routes gets a zero row),
            # in fp32: the gather's backward sums each expert's hundreds of row gradients, which in
            # bf16 would lose most of them (and on CUDA add them by bf16 atomics, in any order).
            return y_RO + F.pad(b_EO.float(), (0, 0, 0, 1)).index_select(0, expert_R).to(y_RO.dtype)

        if not drops:  # dropless: offs[-1] = R, every row belongs to an expert
            return self._ffn(x_RD, linear)
        # With capacity, the dropped routes sort last, past offs[-1], where grouped_mm leaves
        # uninitialised rows (possibly NaN; a zero gate weight would keep a NaN). Rows never mix,
        # so masking the block's output, and through the input's mask its input gradient, is enough.
        valid_R1 = (torch.arange(len(x_RD), device=x_RD.device) < offs_E[-1]).unsqueeze(1)
        return torch.where(valid_R1, self._ffn(torch.where(valid_R1, x_RD, 0), linear), 0)

    def _loop(self, x_RD, counts_E1) -> torch.Tensor:
        """The fallback: one `FeedForward` call per expert on its slice."""
        # The split sizes must live on the host: one device sync per layer.
        counts = counts_E1.tolist()
        # Every expert runs, even on zero rows, so each gets a (zero) gradient and no
        # parameter is "unused" for DDP or ZeRO. Dropped routes (last) get zero rows.
        chunks = x_RD.split(counts)
        return torch.cat([*(expert(chunk) for expert, chunk in zip(self, chunks)), torch.zeros_like(chunks[-1])])

    def forward_buffer(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Expert e on row block x_ECD[e] of a padded capacity buffer: one batched matmul per projection."""

        def matmul(h_ECI, w_EOI):
            return torch.bmm(h_ECI, w_EOI.transpose(1, 2))

        def linear(name, h_ECI):
            w_EOI, b_EO = self.stacked(name, h_ECI.dtype)
            if b_EO is None:
                y_ECO = matmul(h_ECI, w_EOI)
            else:
                y_ECO = torch.baddbmm(b_EO.to(h_ECI.dtype).unsqueeze(1), h_ECI, w_EOI.transpose(1, 2))
            return self.adapted(name, h_ECI, y_ECO, matmul)

        return self._ffn(x_ECD, linear)

    def adapted(self, name: str, h: torch.Tensor, y: torch.Tensor, matmul) -> torch.Tensor:
        """`y` plus projection `name`'s adapter term where the experts have one (LoRA, `model/lora.py`), run by
        `matmul`, the stacked path's own per-expert product. The loop path needs none: each expert's
        projection adds its own."""
        delta = getattr(getattr(self[0], name), "stacked_delta", None)
        return y if delta is None else y + delta([getattr(expert, name) for expert in self], h, matmul)


class MoEBlock(nn.Module):
    """Routed experts plus optional always-on shared experts (DeepSeekMoE, arXiv:2401.06066)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        width, act = config.moe_intermediate_size, config.hidden_act
        self.router = Router(config, layer_idx)
        self.experts = LocalExperts(
            FeedForward(config.hidden_size, width, act, config.expert_bias) for _ in range(config.num_local_experts)
        )
        # n shared experts of width w are one MLP of width n*w: same function, one matmul.
        self.shared_mlp = (
            FeedForward(config.hidden_size, config.num_shared_experts * width, act, config.expert_bias)
            if config.num_shared_experts
            else None
        )

    def forward(self, x_BSD: torch.Tensor, real_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`real_BS`: which tokens the routing losses and statistics count (None: all; see routing.py)."""
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routing = self.router(x_TD, None if real_BS is None else real_BS.reshape(-1))
        y_TD = self.experts(x_TD, routing)
        if self.shared_mlp is not None:
            y_TD = y_TD + self.shared_mlp(x_TD)
        return y_TD.view_as(x_BSD), routing.loss
