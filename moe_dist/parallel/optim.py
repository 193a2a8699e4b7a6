"""AdamW with decoupled weight-decay groups and a warmup + cosine schedule (both engines)."""

from __future__ import annotations

import math

import torch
from torch import nn


def named_param_groups(shapes: dict[str, torch.Size]) -> tuple[list[str], list[str]]:
    """(decayed, exempt) parameter names, in module order: decay matrices only.

    Norms, biases and the router are exempt: decay pulls router logits toward uniform,
    fighting the specialisation the router is there to learn. Works from shapes alone, so
    a checkpoint's optimizer state can be matched to names without building the engine.
    """
    exempt = {n for n, shape in shapes.items() if len(shape) < 2 or ".router." in n}
    return [n for n in shapes if n not in exempt], [n for n in shapes if n in exempt]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The two AdamW groups. Each has a `name`, which DeepSpeed's MoE helper needs to split
    expert parameters into groups of their own."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    decay, exempt = named_param_groups({n: p.shape for n, p in params.items()})
    return [
        {"name": "decay", "params": [params[n] for n in decay], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [params[n] for n in exempt], "weight_decay": 0.0},
    ]


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips, on every rank at once, a step whose loss or gradients are not finite.

    Ranks must agree: expert gradients differ across expert-parallel ranks, so a NaN in one
    rank's experts would otherwise update the replicated weights on some ranks only. Before
    each optimizer step the engine calls `prepare_step` once, with what it already knows;
    after it, `skipped` says whether the step was dropped.

    The verdict is reached once per step, with one all-reduce: ZeRO-1/2 call `step()` once per
    parameter group (DeepSpeed 0.19.8 `_optimizer_step`, each time with `param_groups` cut to
    that group), and each call deciding anew would cost a collective and a host read per group.
    """

    _nonfinite_loss: torch.Tensor | bool = False
    _grad_norm: torch.Tensor | None = None
    _skipped: bool | None = False  # None: this step's verdict is not reached yet

    def prepare_step(
        self, *, nonfinite_loss: torch.Tensor | bool = False, grad_norm: torch.Tensor | None = None
    ) -> None:
        """Set the state for the coming `step()` calls, and clear the last step's verdict.

        `nonfinite_loss`: whether some loss of this step was NaN/inf (a device tensor is fine:
        no host sync). `grad_norm`: the global norm if the engine already computed it for
        clipping, which saves a second pass over every gradient.
        """
        self._nonfinite_loss, self._grad_norm, self._skipped = nonfinite_loss, grad_norm, None

    @property
    def skipped(self) -> bool:
        """Whether the last step was skipped (on every rank) for a non-finite loss or gradient."""
        return bool(self._skipped)

    @property
    def overflow(self) -> bool:
        # The name DeepSpeed's engine reads after `optimizer.step()` (engine.py `_take_model_step`,
        # 0.19.8): when true it counts the step in `skipped_steps` and holds the lr schedule.
        return bool(self._skipped)

    @torch.no_grad()
    def step(self, closure=None):
        if self._skipped is None:
            self._skipped = self._agree_nonfinite()
        if self._skipped:
            self.zero_grad(set_to_none=True)
            return None
        return super().step(closure)

    def _agree_nonfinite(self) -> bool:
        """Whether any rank saw a non-finite loss or gradient: one all-reduce, one host read.

        Under ZeRO the gradients seen here are the first group's only; ZeRO itself skips a step
        whose global gradient norm is not finite, on every rank, before calling the optimizer.
        """
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        bad = torch.as_tensor(self._nonfinite_loss, dtype=torch.float32).to(device)
        if self._grad_norm is not None:
            bad = torch.maximum(bad, (~torch.isfinite(self._grad_norm.to(device))).float())
        elif grads:
            bad = torch.maximum(bad, (~torch.isfinite(torch.stack(torch._foreach_norm(grads)))).any().float())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bool(bad)


def build_optimizer(groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float) -> GuardedAdamW:
    # The fused kernel updates every tensor in one pass; the default per-tensor loop made the
    # optimizer a third of an E=16 model's extra step time on CPU (tools/bench_train.py --profile).
    return GuardedAdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, max_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak, then cosine decay to `min_lr_ratio` of it at `max_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
