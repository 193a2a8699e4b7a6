"""Two engines behind one interface: DeepSpeed (expert parallel + ZeRO) and accelerate (one device or DDP).

The trainer's loop is engine-agnostic: it hands an engine the micro-batches of one
optimizer step and asks it to evaluate, save and load. Everything engine-specific (process
groups, parameter groups, precision, the optimizer step, checkpoint format) lives here.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .expert_parallel import apply_expert_parallel
from .modeling import MoEForCausalLM
from .optim import build_optimizer, param_groups, warmup_cosine


@dataclass
class EngineSpec:
    """What an engine needs from the run plan."""

    micro_batch_size: int
    grad_accum: int
    grad_clip: float
    precision: str  # "bf16" | "fp16" | "fp32"
    ep_size: int
    lr: float
    betas: tuple[float, float]
    adam_eps: float
    weight_decay: float
    warmup_steps: int
    max_steps: int
    min_lr_ratio: float
    dist_timeout_s: int
    ds_config: dict | None = None


@dataclass
class StepOutput:
    loss: torch.Tensor  # mean training loss over the micro-batches (LM + router losses), on device
    router_loss: torch.Tensor
    grad_norm: float | None


class TrainEngine:
    kind: str
    rank: int
    world_size: int
    device: torch.device
    model: MoEForCausalLM  # the bare module: eval, routing stats, bias updates

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """In place across every rank (sum by default); a no-op on one process."""
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor

    def eval_context(self):
        return contextlib.nullcontext()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class DeepSpeedEngine(TrainEngine):
    kind = "deepspeed"

    def __init__(self, spec: EngineSpec):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.spec = spec
        deepspeed.init_distributed(timeout=timedelta(seconds=spec.dist_timeout_s))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        accel = get_accelerator()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if accel.device_name() != "cpu":
            accel.set_device(local_rank)
        self.device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")

    def setup(self, model: MoEForCausalLM) -> None:
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        spec = self.spec
        if model.config.is_moe:
            apply_expert_parallel(model, spec.ep_size)
        groups = param_groups(model, spec.weight_decay)
        if model.config.is_moe:
            # Expert parameters get their own groups, reduced over expert-data-parallel ranks only.
            groups = split_params_into_different_moe_groups_for_optimizer(groups)
        optimizer = build_optimizer(groups, lr=spec.lr, betas=spec.betas, eps=spec.adam_eps)
        scheduler = warmup_cosine(optimizer, warmup_steps=spec.warmup_steps, max_steps=spec.max_steps,
                                  min_lr_ratio=spec.min_lr_ratio)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=spec.ds_config)
        self.model = self.ds.module

    def train_batch(self, micro_batches) -> StepOutput:
        losses, router = [], []
        for input_ids, labels in micro_batches:
            out = self.ds(input_ids=input_ids.to(self.device), shift_labels=labels.to(self.device))
            self.ds.backward(out.loss)
            self.ds.step()  # DeepSpeed steps the optimizer on the accumulation boundary
            losses.append(out.loss.detach().float())
            router.append(out.aux_loss.detach().float())
        self.model.update_router_biases()
        norm = self.ds.get_global_grad_norm()
        return StepOutput(torch.stack(losses).mean(), torch.stack(router).mean(),
                          None if norm is None else float(norm))

    def save(self, staging: Path) -> None:
        self.ds.save_checkpoint(str(staging.parent), tag=staging.name, save_latest=False)

    def load(self, path: Path) -> None:
        loaded, _ = self.ds.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")


class AccelerateEngine(TrainEngine):
    kind = "accelerate"

    def __init__(self, spec: EngineSpec):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        self.spec = spec
        self.acc = Accelerator(
            # Without cpu=True accelerate treats several CPU processes as unrelated single runs.
            cpu=not torch.cuda.is_available(),
            mixed_precision="bf16" if spec.precision == "bf16" else "no",
            gradient_accumulation_steps=spec.grad_accum,
            kwargs_handlers=[
                InitProcessGroupKwargs(timeout=timedelta(seconds=spec.dist_timeout_s)),
                # Routers keep per-rank load counters in buffers; DDP's default broadcast from
                # rank 0 would overwrite them before they are all-reduced.
                DistributedDataParallelKwargs(broadcast_buffers=False),
            ],
        )
        self.rank, self.world_size = self.acc.process_index, self.acc.num_processes
        self.device = self.acc.device

    def setup(self, model: MoEForCausalLM) -> None:
        spec = self.spec
        optimizer = build_optimizer(param_groups(model, spec.weight_decay), lr=spec.lr, betas=spec.betas,
                                    eps=spec.adam_eps)
        # Stepped by hand once per optimizer step: accelerate's wrapper would step it once per process.
        self.scheduler = warmup_cosine(optimizer, warmup_steps=spec.warmup_steps, max_steps=spec.max_steps,
                                       min_lr_ratio=spec.min_lr_ratio)
        self.wrapped, self.optimizer = self.acc.prepare(model, optimizer)
        self.acc.register_for_checkpointing(self.scheduler)
        self.model = self.acc.unwrap_model(self.wrapped)

    def train_batch(self, micro_batches) -> StepOutput:
        losses, router, norm = [], [], None
        for input_ids, labels in micro_batches:
            with self.acc.accumulate(self.wrapped):
                out = self.wrapped(input_ids=input_ids.to(self.device), shift_labels=labels.to(self.device))
                self.acc.backward(out.loss)
                if self.acc.sync_gradients and self.spec.grad_clip > 0:
                    norm = float(self.acc.clip_grad_norm_(self.wrapped.parameters(), self.spec.grad_clip))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(out.loss.detach().float())
            router.append(out.aux_loss.detach().float())
        self.scheduler.step()
        self.model.update_router_biases()
        return StepOutput(torch.stack(losses).mean(), torch.stack(router).mean(), norm)

    def eval_context(self):
        return self.acc.autocast()

    def save(self, staging: Path) -> None:
        self.acc.save_state(str(staging / "accelerate"), safe_serialization=True)

    def load(self, path: Path) -> None:
        self.acc.load_state(str(path / "accelerate"))


def make_engine(kind: str, spec: EngineSpec) -> TrainEngine:
    return {"deepspeed": DeepSpeedEngine, "accelerate": AccelerateEngine}[kind](spec)
