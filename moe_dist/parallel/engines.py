"""Two engines behind one declared interface: DeepSpeed (expert parallel + ZeRO) and accelerate
(one device or DDP).

The trainer's loop is engine-agnostic: it hands an engine the micro-batches of one
optimizer step and asks it to evaluate, save and load, through `TrainEngine` and nothing
else. Everything engine-specific (parameter groups, precision, the optimizer step,
checkpoint format) lives in the two subclasses; the optimizer, the lr schedule and the
router-bias update are shared and live in the base.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint.formats import EXPERT_SLICES, hf_named_parameters
from ..model.modeling import IGNORE_INDEX, MoEForCausalLM
from .expert_parallel import apply_expert_parallel
from .expert_tensor_parallel import apply_expert_tensor_parallel
from .optim import GuardedAdamW, build_optimizer, param_groups, warmup_cosine
from .portable import PortableState, apply_plain, apply_zero, slice_state
from .process_group import collective_timeout_s, free_port, init_distributed, set_group_timeouts, shutdown_distributed

log = logging.getLogger("moe_dist")


@dataclass
class EngineSpec:
    """What an engine needs from the run plan (the planner, `train.plan`, builds it)."""

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
    etp_size: int = 1  # expert tensor parallelism: ranks each expert is sliced over


@dataclass
class StepOutput:
    loss: torch.Tensor  # mean training loss over the micro-batches (LM + router losses), on device
    router_loss: torch.Tensor
    grad_norm: float | None
    skipped: bool  # non-finite loss or gradients on some rank: no rank updated its weights


def _nonfinite(losses: list[torch.Tensor]) -> torch.Tensor:
    """1.0 if any loss is NaN/inf, as a device tensor (no host sync)."""
    return (~torch.isfinite(torch.stack(losses))).any().float()


class TrainEngine(ABC):
    """Everything the trainer may use of an engine.

    Lifecycle: the constructor joins the process group (if any); `setup(model)` builds the
    optimizer and lr schedule, once, here, and hands them to the subclass to wrap; then
    `train_batch` once per optimizer step, `save` / `load` / `load_portable` for checkpoints,
    and `close` at the end of a successful run.
    """

    kind: str  # "deepspeed" | "accelerate": recorded in checkpoints, compared on resume
    spec: EngineSpec
    rank: int
    world_size: int
    device: torch.device
    model: MoEForCausalLM  # the bare module: eval, routing stats, bias updates
    guard: GuardedAdamW  # the optimizer as built; the engine may wrap it
    scheduler: torch.optim.lr_scheduler.LRScheduler  # `last_epoch` = optimizer steps applied
    released_shm: tuple[Path, ...] = ()  # library shared-memory names unlinked at init (see init_distributed)

    # ---- set-up: the part both engines share ------------------------------------------------

    def setup(self, model: MoEForCausalLM, weights=None) -> None:
        """Shard `model` where the engine does, build AdamW and its schedule, then wrap all three.

        `weights` (a source with `read(name)`, see `convert.sources`): `model` was built on the meta device
        and is filled from it, after sharding where each rank can read just its own experts.
        """
        spec = self.spec
        model = self.shard(model, weights)
        self.guard = build_optimizer(self._param_groups(model), lr=spec.lr, betas=spec.betas, eps=spec.adam_eps)
        self.scheduler = warmup_cosine(
            self.guard, warmup_steps=spec.warmup_steps, max_steps=spec.max_steps, min_lr_ratio=spec.min_lr_ratio
        )
        self._wrap(model)

    def shard(self, model: MoEForCausalLM, weights=None) -> MoEForCausalLM:
        """Place `model`'s experts where this engine keeps them and, when it was built on the meta device,
        fill it from `weights`; the first half of `setup` (tools measure it alone)."""
        if weights is not None:
            model.load_weights(weights)
        return model

    def _param_groups(self, model: MoEForCausalLM) -> list[dict]:
        return param_groups(model, self.spec.weight_decay)

    @abstractmethod
    def _wrap(self, model: MoEForCausalLM) -> None:
        """Hand model, `self.guard` and `self.scheduler` to the library; set `self.model`."""

    # ---- what the loop calls ------------------------------------------------------------------

    @abstractmethod
    def train_batch(self, micro_batches) -> StepOutput:
        """Forward, backward and one optimizer step over the micro-batches of one step.

        Ends with `update_router_biases`. A step with a non-finite loss or gradient on any
        rank is skipped on every rank, and the schedule does not advance.
        """

    @abstractmethod
    def save(self, staging: Path) -> None:
        """Write this engine's native checkpoint (weights, optimizer, schedule) into `staging`."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Restore a checkpoint that this engine wrote at the same layout."""

    @abstractmethod
    def load_portable(self, state: PortableState) -> None:
        """Restore weights and Adam moments written at another engine, EP size or world size."""

    def restore_schedule(self, steps: int) -> None:
        """Put the lr schedule where `steps` optimizer steps left it (when resharding)."""
        self.scheduler.last_epoch = steps - 1
        self.scheduler.step()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def eval_context(self):
        return contextlib.nullcontext()

    @torch.no_grad()
    def update_router_biases(self, apply: bool) -> None:
        """One aux-loss-free bias step for every MoE layer, with one all-reduce in all.

        The bias must move on the loads of the whole batch, identically on every rank, or the
        replicas diverge; each rank counted only its own tokens. Stacking every layer's window
        into one [L, E] tensor makes that one collective per step rather than one per layer,
        and keeps the model free of process groups, as the files an export ships for
        trust_remote_code must be (torchtitan updates its expert bias outside the model too).
        A skipped step (`apply=False`, agreed by all ranks) drops the windows, with no collective.
        """
        loads = self.model.router_loads()
        if not (apply and loads):
            self.model.update_router_biases(apply=False)
            return
        loads_LE = self.all_reduce(torch.stack(loads))  # shape [L, E], int64 counts
        self.model.update_router_biases(loads_LE)

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A host batch on the device. On CUDA it is copied from pinned memory without blocking the host,
        as DataLoader(pin_memory=True) does, so the copy queues behind the previous kernels instead of
        stalling the host while they run."""
        if self.device.type != "cuda":
            return batch
        return batch.pin_memory().to(self.device, non_blocking=True)

    # ---- collectives and process facts ---------------------------------------------------------

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

    def all_gather_objects(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order; `[obj]` on one process."""
        if not dist.is_initialized() or self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value on every rank."""
        if not dist.is_initialized() or self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.broadcast(t, src=0)
        return int(t)

    def close(self) -> None:
        """End the process group once every rank has finished cleanly (see shutdown_distributed)."""
        shutdown_distributed()


def forward_kwargs(engine: TrainEngine, micro_batches) -> list[dict]:
    """The model's keyword arguments for each micro-batch of one step, on the device.

    Plain blocks come as (input_ids, labels); every block holds seq_len labelled tokens, so each
    micro-batch's mean loss averages to the step's mean. Packed conversations come as (input_ids, labels,
    position_ids, real): rows hold different numbers of supervised tokens, so the loss is the sum over a
    micro-batch divided by the step's count over every micro-batch and rank (one all-reduce), times
    world_size * grad_accum, the factor by which the engines average gradients. The step's gradient is
    then the mean over all its supervised tokens, however the batch is split over ranks and accumulation
    (the normalisation of verl PR #3994).
    """
    out = [
        {"input_ids": engine.to_device(batch[0]), "shift_labels": engine.to_device(batch[1])} for batch in micro_batches
    ]
    if all(len(batch) == 2 for batch in micro_batches):
        return out
    supervised = sum((kw["shift_labels"] != IGNORE_INDEX).sum() for kw in out).double()
    supervised = engine.all_reduce(supervised.reshape(1))[0]
    per_unit = supervised.clamp_min(1) / (engine.world_size * len(micro_batches))
    for kw, (_, _, positions, real) in zip(out, micro_batches):
        kw.update(
            position_ids=engine.to_device(positions),
            real_tokens=engine.to_device(real),
            num_items_in_batch=per_unit,
            use_cache=False,  # transformers keeps packed sequences apart only without a cache
        )
    return out


class DeepSpeedEngine(TrainEngine):
    kind = "deepspeed"

    def __init__(self, spec: EngineSpec):
        from deepspeed.accelerator import get_accelerator

        self.spec = spec
        if "RANK" not in os.environ:
            # Plain `python launch/train.py --deepspeed ...`: one rank. Without these variables
            # DeepSpeed falls back to MPI discovery and needs mpi4py.
            os.environ.update(
                RANK="0",
                LOCAL_RANK="0",
                WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())),
            )
        self.released_shm = init_distributed(collective_timeout_s(spec.dist_timeout_s))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        accel = get_accelerator()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if accel.device_name() != "cpu":
            accel.set_device(local_rank)
        self.device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")

    def shard(self, model: MoEForCausalLM, weights=None) -> MoEForCausalLM:
        spec = self.spec
        if not model.config.is_moe or spec.etp_size > 1:
            # ETP cuts each rank's slices from whole experts: those are read whole first.
            model = super().shard(model, weights)
            weights = None
        if not model.config.is_moe:
            return model
        if spec.etp_size > 1:
            timeout_s = collective_timeout_s(spec.dist_timeout_s)
            apply_expert_tensor_parallel(model, ep_size=spec.ep_size, etp_size=spec.etp_size, timeout_s=timeout_s)
        else:
            apply_expert_parallel(model, spec.ep_size)  # on the meta device: the other ranks' experts are dropped
        if weights is not None:
            # Each rank reads its own experts only (under their global ids) and the replicated rest.
            model.load_weights(weights, named_parameters=hf_named_parameters)
        return model

    def _param_groups(self, model: MoEForCausalLM) -> list[dict]:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = super()._param_groups(model)
        if model.config.is_moe:
            # Expert parameters get their own groups, reduced over expert-data-parallel ranks only.
            groups = split_params_into_different_moe_groups_for_optimizer(groups)
        # deepspeed.initialize drops an empty group from the optimizer but not from the schedule built on it,
        # which then no longer matches (LoRA on the experts alone with a frozen router leaves no trainable
        # non-expert parameter): the empty groups go before either is built.
        return [g for g in groups if g["params"]]

    def _wrap(self, model: MoEForCausalLM) -> None:
        import deepspeed

        # ZeRO accepts only the optimizer classes it lists; GuardedAdamW is torch's AdamW plus an
        # agreed skip of non-finite steps, so it is vouched for here rather than in every JSON.
        config = {**self.spec.ds_config, "zero_allow_untested_optimizer": True}
        # DeepSpeed steps the schedule itself, after each applied optimizer step.
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=self.guard, lr_scheduler=self.scheduler, config=config
        )
        self.model = self.ds.module
        # Every group exists now: the expert groups and DeepSpeed's own copy of the world group, all
        # made with torch's backend default timeout.
        set_group_timeouts(collective_timeout_s(self.spec.dist_timeout_s))
        # DeepSpeed copies zero_to_fp32.py and zero_to_torch.py into every ZeRO checkpoint, and
        # both skip the layer_*_expert_* files (DeepSpeed #4497): a converter that fails on our
        # checkpoints. Ours reads them; say so once, and leave theirs out.
        self.ds._copy_recovery_script = lambda save_path: None
        if self.is_main and self.spec.ds_config.get("zero_optimization", {}).get("stage", 0) > 0:
            log.info(
                "checkpoints: convert any of them with `python -m moe_dist.export RUN_OR_CHECKPOINT OUT` "
                "(DeepSpeed's zero_to_fp32.py is not written: it drops the expert files)"
            )

    def train_batch(self, micro_batches) -> StepOutput:
        losses, router = [], []
        skipped_before = self.ds.skipped_steps
        for kwargs in forward_kwargs(self, micro_batches):
            out = self.ds(**kwargs)
            self.ds.backward(out.loss)
            losses.append(out.loss.detach().float())
            router.append(out.aux_loss.detach().float())
            # `ds.step()` steps the optimizer only on the accumulation boundary, the last
            # micro-batch here, so the guard's state then covers every loss of the step.
            self.guard.prepare_step(nonfinite_loss=_nonfinite(losses))
            # ZeRO-1/2 skip a step with a non-finite gradient norm on all ranks themselves (and
            # never call the guard); the guard covers the rest.
            self.ds.step()
        skipped = self.ds.skipped_steps > skipped_before or self.guard.skipped
        self.update_router_biases(apply=not skipped)
        norm = self.ds.get_global_grad_norm()
        return StepOutput(
            torch.stack(losses).mean(), torch.stack(router).mean(), None if norm is None else float(norm), skipped
        )

    def save(self, staging: Path) -> None:
        self.ds.save_checkpoint(str(staging.parent), tag=staging.name, save_latest=False)
        if self.spec.etp_size > 1 and self.is_main:
            # Sliced experts: the file ids mean (expert, slice) only with this record (checkpoint.formats).
            (staging / EXPERT_SLICES).write_text(json.dumps(self._slice_record()))

    def _slice_record(self) -> dict:
        """How this run slices its experts, as expert_slices.json records it (`formats.read_expert_slices`)."""
        return {
            "ep_size": self.spec.ep_size,
            "etp_size": self.spec.etp_size,
            "experts_per_ep_rank": self.ds.module.config.num_local_experts // self.spec.ep_size,
        }

    def load(self, path: Path) -> None:
        loaded, _ = self.ds.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")

    def load_portable(self, state: PortableState) -> None:
        named = list(hf_named_parameters(self.ds.module))  # expert slices under their slice ids (formats)
        if self.spec.etp_size > 1:  # cut this rank's slices, weights and moments, from the whole experts
            state = slice_state(state, (name for name, _ in named), self._slice_record())
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
                # Past the --dist_timeout watchdog, whose message names the stuck rank.
                InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s(spec.dist_timeout_s))),
                # Routers keep per-rank load counters in buffers; DDP's default broadcast from
                # rank 0 would overwrite them before they are all-reduced.
                DistributedDataParallelKwargs(broadcast_buffers=False),
            ],
        )
        self.rank, self.world_size = self.acc.process_index, self.acc.num_processes
        self.device = self.acc.device

    def _wrap(self, model: MoEForCausalLM) -> None:
        # The schedule stays out of `prepare` and is stepped by hand once per optimizer step:
        # accelerate's wrapper would step it once per process.
        self.wrapped, self.optimizer = self.acc.prepare(model, self.guard)
        self.acc.register_for_checkpointing(self.scheduler)
        self.model = self.acc.unwrap_model(self.wrapped)

    def train_batch(self, micro_batches) -> StepOutput:
        losses, router, norm = [], [], None
        for kwargs in forward_kwargs(self, micro_batches):
            with self.acc.accumulate(self.wrapped):
                out = self.wrapped(**kwargs)
                self.acc.backward(out.loss)
                losses.append(out.loss.detach().float())
                router.append(out.aux_loss.detach().float())
                if self.acc.sync_gradients:  # the last micro-batch: the optimizer steps now
                    norm = self._prepare_guard(losses)
                self.optimizer.step()  # the guard skips it on every rank if anything is non-finite
                self.optimizer.zero_grad(set_to_none=True)
        skipped = self.guard.skipped
        if not skipped:
            self.scheduler.step()
        self.update_router_biases(apply=not skipped)
        return StepOutput(torch.stack(losses).mean(), torch.stack(router).mean(), norm, skipped)

    def _prepare_guard(self, losses: list[torch.Tensor]) -> float | None:
        """Clip (if asked) and tell the guard what this step knows; returns the global grad norm."""
        grad_norm = None
        if self.spec.grad_clip > 0:
            # Clipping returns the global norm: the guard reuses it instead of norming every gradient again.
            grad_norm = self.acc.clip_grad_norm_(self.wrapped.parameters(), self.spec.grad_clip)
        self.guard.prepare_step(nonfinite_loss=_nonfinite(losses), grad_norm=grad_norm)
        return None if grad_norm is None else float(grad_norm)

    def eval_context(self):
        return self.acc.autocast()

    def save(self, staging: Path) -> None:
        self.acc.save_state(str(staging / "accelerate"), safe_serialization=True)

    def load(self, path: Path) -> None:
        self.acc.load_state(str(path / "accelerate"))

    def load_portable(self, state: PortableState) -> None:
        apply_plain(self.model.named_parameters(), self.guard, state)


def make_engine(kind: str, spec: EngineSpec) -> TrainEngine:
    return {"deepspeed": DeepSpeedEngine, "accelerate": AccelerateEngine}[kind](spec)
