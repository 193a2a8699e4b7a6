"""Two engines behind one interface: DeepSpeed (expert parallel + ZeRO) and accelerate (one device or DDP).

The trainer's loop is engine-agnostic: it hands an engine the micro-batches of one
optimizer step and asks it to evaluate, save and load. Everything engine-specific (process
groups, parameter groups, precision, the optimizer step, checkpoint format) lives here.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..model.modeling import MoEForCausalLM
from ..train.faults import count_saved_files
from .expert_parallel import apply_expert_parallel, hf_named_parameters
from .optim import build_optimizer, param_groups, warmup_cosine
from .portable import PortableState, apply_plain, apply_zero


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
    skipped: bool  # non-finite loss or gradients on some rank: no rank updated its weights


def _nonfinite(losses: list[torch.Tensor]) -> torch.Tensor:
    """1.0 if any loss is NaN/inf, as a device tensor (no host sync)."""
    return (~torch.isfinite(torch.stack(losses))).any().float()


class TrainEngine:
    kind: str
    rank: int
    world_size: int
    device: torch.device
    model: MoEForCausalLM  # the bare module: eval, routing stats, bias updates
    released_shm: tuple[Path, ...] = ()  # library shared-memory names unlinked at init (see init_distributed)

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

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value on every rank."""
        if not dist.is_initialized() or self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.broadcast(t, src=0)
        return int(t)

    def eval_context(self):
        return contextlib.nullcontext()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def close(self) -> None:
        """End the process group once every rank has finished cleanly (see shutdown_distributed)."""
        shutdown_distributed()

    def restore_schedule(self, steps: int) -> None:
        """Put the lr schedule where `steps` optimizer steps left it (when resharding)."""
        self.scheduler.last_epoch = steps - 1
        self.scheduler.step()


def init_distributed(timeout_s: int) -> tuple[Path, ...]:
    """`deepspeed.init_distributed`, then unlink this rank's CPU shared-memory all-reduce segment.

    On the CPU accelerator DeepSpeed (0.19.8) creates a 66 MB `/dev/shm` segment per rank, named
    after the master address and port, and never unlinks it: every launch, clean or killed,
    leaves them behind and they hold RAM until reboot. Peers only need the name while they map it
    during init; after a barrier every rank has, so the mapping outlives the name and the memory
    is freed when the processes exit, however they exit. Returns the paths unlinked.
    """
    import deepspeed

    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    segment = Path("/dev/shm") / name
    if not segment.exists():  # GPU backends, or ranks on several hosts: DeepSpeed made none
        return ()
    dist.barrier()
    segment.unlink(missing_ok=True)
    return (segment,)


def shutdown_distributed() -> None:
    """Barrier, then destroy the process groups: the last call of a rank that succeeded.

    A process that exits with gloo groups still alive tears their worker threads down during
    interpreter finalization, which can abort it (SIGABRT, "terminate called without an active
    exception") after all its work is done, and the launcher reports the job as failed. The
    barrier keeps a fast rank from destroying the groups while a peer is still in a collective.
    Only for success: a rank that failed must not wait here for peers that will never come.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class DeepSpeedEngine(TrainEngine):
    kind = "deepspeed"

    def __init__(self, spec: EngineSpec):
        from deepspeed.accelerator import get_accelerator

        self.spec = spec
        if "RANK" not in os.environ:
            # Plain `python launch/train.py --deepspeed ...`: one rank. Without these variables
            # DeepSpeed falls back to MPI discovery and needs mpi4py.
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
        self.released_shm = init_distributed(spec.dist_timeout_s)
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
        self.guard = build_optimizer(groups, lr=spec.lr, betas=spec.betas, eps=spec.adam_eps)
        scheduler = warmup_cosine(self.guard, warmup_steps=spec.warmup_steps, max_steps=spec.max_steps,
                                  min_lr_ratio=spec.min_lr_ratio)
        # ZeRO accepts only the optimizer classes it lists; GuardedAdamW is torch's AdamW plus an
        # agreed skip of non-finite steps, so it is vouched for here rather than in every JSON.
        config = {**spec.ds_config, "zero_allow_untested_optimizer": True}
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=self.guard, lr_scheduler=scheduler, config=config)
        self.model = self.ds.module

    def train_batch(self, micro_batches) -> StepOutput:
        losses, router = [], []
        skipped_before, self.guard.overflow = self.ds.skipped_steps, False
        for input_ids, labels in micro_batches:
            out = self.ds(input_ids=input_ids.to(self.device), shift_labels=labels.to(self.device))
            self.ds.backward(out.loss)
            losses.append(out.loss.detach().float())
            router.append(out.aux_loss.detach().float())
            self.guard.nonfinite_loss = _nonfinite(losses)
            # Steps the optimizer on the accumulation boundary. ZeRO-1/2 skip a step with a
            # non-finite gradient norm on all ranks themselves; the guard covers the rest.
            self.ds.step()
        skipped = self.ds.skipped_steps > skipped_before or self.guard.overflow
        self.model.update_router_biases(apply=not skipped)
        norm = self.ds.get_global_grad_norm()
        return StepOutput(torch.stack(losses).mean(), torch.stack(router).mean(),
                          None if norm is None else float(norm), skipped)

    def save(self, staging: Path) -> None:
        count_saved_files(self.ds.checkpoint_engine, self.rank)  # a no-op unless a fault test asks
        self.ds.save_checkpoint(str(staging.parent), tag=staging.name, save_latest=False)

    def load(self, path: Path) -> None:
        loaded, _ = self.ds.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")

    def load_portable(self, state: PortableState) -> None:
        named = list(hf_named_parameters(self.ds.module))
        if hasattr(self.ds.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 or bf16 partitions
            apply_zero(self.ds, state, named)
        else:
            apply_plain(named, self.guard, state)


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
        self.guard = build_optimizer(param_groups(model, spec.weight_decay), lr=spec.lr, betas=spec.betas,
                                     eps=spec.adam_eps)
        # Stepped by hand once per optimizer step: accelerate's wrapper would step it once per process.
        self.scheduler = warmup_cosine(self.guard, warmup_steps=spec.warmup_steps, max_steps=spec.max_steps,
                                       min_lr_ratio=spec.min_lr_ratio)
        self.wrapped, self.optimizer = self.acc.prepare(model, self.guard)
        self.acc.register_for_checkpointing(self.scheduler)
        self.model = self.acc.unwrap_model(self.wrapped)

    def train_batch(self, micro_batches) -> StepOutput:
        losses, router, norm = [], [], None
        self.guard.overflow = False
        for input_ids, labels in micro_batches:
            with self.acc.accumulate(self.wrapped):
                out = self.wrapped(input_ids=input_ids.to(self.device), shift_labels=labels.to(self.device))
                self.acc.backward(out.loss)
                losses.append(out.loss.detach().float())
                router.append(out.aux_loss.detach().float())
                if self.acc.sync_gradients:
                    self.guard.nonfinite_loss = _nonfinite(losses)
                    if self.spec.grad_clip > 0:
                        self.guard.grad_norm = self.acc.clip_grad_norm_(self.wrapped.parameters(), self.spec.grad_clip)
                        norm = float(self.guard.grad_norm)
                self.optimizer.step()  # the guard skips it on every rank if anything is non-finite
                self.optimizer.zero_grad(set_to_none=True)
        skipped = self.guard.overflow
        if not skipped:
            self.scheduler.step()
        self.model.update_router_biases(apply=not skipped)
        return StepOutput(torch.stack(losses).mean(), torch.stack(router).mean(), norm, skipped)

    def eval_context(self):
        return self.acc.autocast()

    def save(self, staging: Path) -> None:
        self.acc.save_state(str(staging / "accelerate"), safe_serialization=True)

    def load(self, path: Path) -> None:
        self.acc.load_state(str(path / "accelerate"))

    def load_portable(self, state: PortableState) -> None:
        apply_plain(self.model.named_parameters(), self.guard, state)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_engine(kind: str, spec: EngineSpec) -> TrainEngine:
    return {"deepspeed": DeepSpeedEngine, "accelerate": AccelerateEngine}[kind](spec)
