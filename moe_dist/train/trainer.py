"""The training loop: one loop, two engines (DeepSpeed or accelerate).

step -> log -> evaluate -> early-stop -> checkpoint, resumable from the run folder, and at
the end `summary.json` plus an `hf/` export. The engine owns parallelism and the optimizer
step; this module owns the schedule of what happens when.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from ..export import export_checkpoint
from ..model.configuration import MoEConfig
from ..model.modeling import MoEForCausalLM
from ..parallel.ds_config import ConfigError
from ..parallel.engines import TrainEngine, make_engine
from ..parallel.portable import read_state
from .checkpoint import (
    CheckpointError,
    CheckpointStore,
    capture_rng,
    load_rank_state,
    restore_rng,
    save_rank_state,
    step_of,
    write_atomic,
)
from .data import BlockSampler, DataError, batch_tensors, describe_source, prepare_data, validation_shard
from .evaluation import evaluate
from .faults import fault_point
from .logging_io import MetricsWriter, write_summary
from .metrics import CollapseMonitor, Throughput, format_progress, peak_memory_mb, routing_health, routing_utilization
from .plan import RUN_RECORD, RunPlan, check_run_folder, run_record
from .watchdog import Watchdog

log = logging.getLogger("moe_dist")
TRAINER_STATE = "trainer_state.json"


class TrainingHalted(RuntimeError):
    """Training cannot usefully go on (e.g. every step is non-finite); the last good checkpoint stays."""


@dataclass
class TrainerState:
    """Everything the loop needs to continue exactly where a checkpoint left it (saved by rank 0)."""

    step: int = 0
    best_val_loss: float = math.inf
    best_step: int = -1
    last_val: dict = field(default_factory=dict)
    evals_without_improvement: int = 0
    max_tok_s: float = 0.0
    peak_mem_mb: float = 0.0  # the largest rank's; torch's allocator peak on GPU, peak RSS on CPU
    peak_mem_mb_per_rank: list = field(default_factory=list)
    nvml_used_mb_per_rank: list = field(default_factory=list)  # whole-GPU use seen by NVML, max over logs
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    scheduler_steps: int = 0  # optimizer steps taken (skipped ones hold the lr schedule)
    engine: str = ""  # the layout that wrote the checkpoint: a different one means resharding
    ep_size: int = 0
    world_size: int = 0
    sampler: dict = field(default_factory=dict)
    collapse: dict = field(default_factory=dict)


def run(plan: RunPlan) -> dict | None:
    """Train as planned; returns the summary on rank 0 (None elsewhere)."""
    engine = make_engine(plan.engine, plan.spec)
    _configure_logging(engine.is_main)
    for segment in engine.released_shm:
        log.info("unlinked %s once every rank had mapped it, so no launch leaves it in RAM", segment)
    if engine.is_main:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        if not (plan.run_dir / RUN_RECORD).exists():
            # A tokenizer without a run record is left over from a launch that failed while
            # preparing data (say, on a corpus since fixed): never reuse it.
            shutil.rmtree(plan.run_dir / "tokenizer", ignore_errors=True)
    # Any non-empty validation set works at any world size: validation_shard pads the last batches.
    log.info("data: %s", describe_source(plan.data))
    data = prepare_data(plan.data, plan.run_dir, is_main=engine.is_main, barrier=engine.barrier)
    config = _fit_vocab(plan, data.tokenizer)
    check_run_folder(plan, config)
    engine.barrier()  # every rank has compared against the old record before rank 0 replaces it
    if engine.is_main:
        write_atomic(plan.run_dir / RUN_RECORD, json.dumps(run_record(plan, config), indent=1).encode())

    model = _build_model(plan, config)
    params_total, params_active = model.num_parameters(), model.num_active_parameters()
    engine.setup(model)
    torch.manual_seed(plan.train.seed * 1000 + engine.rank + 1)  # router jitter differs across ranks

    loop = _Loop(plan, engine, data, config)
    loop.resume()
    try:
        loop.train()
    except Exception as e:
        # Under the launcher every rank's stderr is shown: say who failed, and when.
        log.error("rank %d failed at step %d: %s: %s", engine.rank, loop.current_step, type(e).__name__, e)
        raise
    # The export is the last checkpoint; a run that ended in a non-finite streak keeps its last good one.
    settled = loop.state.bad_in_a_row or loop.last_saved == loop.state.step
    final = loop.last_saved_path if settled else loop.save(best=False)
    if engine.is_main and final is not None:
        export_checkpoint(final, plan.run_dir / "hf", tokenizer_dir=plan.run_dir / "tokenizer")
    summary = None  # rank 0's; the others wait for it in engine.close()
    if engine.is_main:
        summary = loop.summary(params_total, params_active)
        write_summary(plan.run_dir, summary)
        loop.writer.close()
        log.info("done: %s", json.dumps({k: summary[k] for k in ("steps", "final_val_ppl", "best_val_ppl",
                                                                  "max_tok_s")}))
    engine.close()
    return summary


def _configure_logging(is_main: bool) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if is_main else logging.WARNING, force=True)
    transformers.logging.set_verbosity_error()


def _fit_vocab(plan: RunPlan, tokenizer) -> MoEConfig:
    """The model's vocabulary: the tokenizer's size rounded up to 64 (tensor-core friendly), or checked."""
    config = plan.model_config
    n = len(tokenizer)
    if plan.vocab_from_tokenizer:
        config = MoEConfig.from_dict({**config.to_dict(), "vocab_size": -(-n // 64) * 64})
    elif n > config.vocab_size:
        raise ConfigError(f"the tokenizer has {n} tokens but the model's vocab_size is {config.vocab_size}; "
                          f"token ids would index past the embedding")
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def _build_model(plan: RunPlan, config: MoEConfig) -> MoEForCausalLM:
    # Same seed on every rank: every rank builds identical weights before experts are sharded.
    transformers.set_seed(plan.train.seed)
    if plan.init_from is not None:
        model = MoEForCausalLM.from_pretrained(plan.init_from, config=config, dtype=torch.float32)
    else:
        model = MoEForCausalLM(config)
    if plan.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


class _Loop:
    def __init__(self, plan: RunPlan, engine: TrainEngine, data, config: MoEConfig):
        self.plan, self.engine, self.data, self.config = plan, engine, data, config
        self.args, spec = plan.train, plan.spec
        self.sampler = BlockSampler(len(data.train_blocks), micro_batch_size=spec.micro_batch_size,
                                    grad_accum=spec.grad_accum, rank=engine.rank, world_size=engine.world_size,
                                    seed=self.args.seed)
        self.valid_shards = validation_shard(len(data.valid_blocks), rank=engine.rank, world_size=engine.world_size,
                                             micro_batch_size=spec.micro_batch_size)
        self.tokens_per_step = self.sampler.global_batch * plan.data.seq_len
        self.store = CheckpointStore(plan.run_dir / "checkpoints", is_main=engine.is_main, barrier=engine.barrier)
        self.writer = MetricsWriter(plan.run_dir, enabled=engine.is_main)
        self.throughput = Throughput()
        self.collapse = CollapseMonitor(max(config.num_local_experts, 1))
        self.state = TrainerState()
        self.current_step = 0
        self.last_saved, self.last_saved_path = -1, None

    # ---- resume ---------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the newest intact checkpoint. Rank 0 checks the files and every rank loads its choice."""
        choice = -1  # -1: nothing saved yet; -2: only broken checkpoints
        if self.engine.is_main:
            self.store.remove_partials()
            good = self.store.candidates()
            choice = step_of(good[0]) if good else (-2 if self.store.complete() else -1)
        choice = self.engine.broadcast_int(choice)
        if choice == -2:
            raise CheckpointError(f"no intact checkpoint in {self.store.root} (see the warnings above); "
                                  f"move it away to start fresh")
        if choice == -1:
            return
        path = self.store.root / f"step{choice:08d}"
        saved = TrainerState(**json.loads((path / TRAINER_STATE).read_text()))
        if (saved.engine, saved.ep_size, saved.world_size) == self._layout():
            self.engine.load(path)
            restore_rng(load_rank_state(path, self.engine.rank)["rng"])
        else:
            self._reshard(path, saved)
        self.state = saved
        self.sampler.load_state_dict(self.state.sampler)
        self.collapse.load_state_dict(self.state.collapse)
        self.writer.truncate_after(self.state.step)
        self.last_saved, self.last_saved_path = self.state.step, path
        log.info("resumed from %s (step %d)", path, self.state.step)

    def _layout(self) -> tuple[str, int, int]:
        return self.engine.kind, self.plan.spec.ep_size, self.engine.world_size

    def _reshard(self, path: Path, saved: TrainerState) -> None:
        """Load a checkpoint written by another engine, EP size or world size, through the portable state."""
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in MoEForCausalLM(self.config).named_parameters() if p.requires_grad}
        state = read_state(path, engine=saved.engine, ep_size=saved.ep_size,
                           num_experts=self.config.num_local_experts, shapes=shapes)
        if state.exp_avg is None and not self.args.allow_optimizer_reset:
            raise CheckpointError(f"cannot carry the optimizer state of {path} over to this layout "
                                  f"({state.why_no_moments}); add --allow_optimizer_reset to continue with exact "
                                  f"weights and a fresh optimizer")
        self.engine.load_portable(state)
        self.engine.restore_schedule(saved.scheduler_steps)
        if saved.world_size > self.engine.rank:  # this rank existed before: keep its random streams
            restore_rng(load_rank_state(path, self.engine.rank)["rng"])
        log.info("resharded %s from %s EP=%d on %d rank(s) to %s EP=%d on %d rank(s); optimizer %s",
                 path.name, saved.engine, saved.ep_size, saved.world_size, *self._layout(),
                 "state carried over" if state.exp_avg is not None else "reset (--allow_optimizer_reset)")

    # ---- the loop -------------------------------------------------------------------------

    def train(self) -> None:
        args, state = self.args, self.state
        log.info("training %s for %d steps on %d rank(s), %d tokens per step", self.plan.preset, args.max_steps,
                 self.engine.world_size, self.tokens_per_step)
        self.watchdog = Watchdog(args.dist_timeout, self.plan.run_dir / "heartbeats", self.engine.rank)
        while state.step < args.max_steps:
            self.current_step = state.step + 1
            fault_point("before_step", self.current_step, self.engine.rank, self.engine.model)
            # After the fault point: a rank stuck before its step still reports the previous one,
            # which is how the watchdog tells it from the peers blocked waiting for it.
            self.watchdog.beat(self.current_step)
            micro = [batch_tensors(self.data.train_blocks, idx) for idx in self.sampler.next_step()]
            out = self.engine.train_batch(micro)
            state.step += 1
            self._count_skip(out.skipped)
            self.throughput.update(self.tokens_per_step)
            if state.step % args.log_every == 0 or state.step in (1, args.max_steps):
                self._log_train(out)
            improved, stop = False, False
            if state.step % args.eval_every == 0 or state.step == args.max_steps:
                improved, stop = self._evaluate()
            # Never save in a non-finite streak: the weights may be what went wrong, and the
            # last checkpoint must stay the last good one.
            if (improved or stop or state.step % args.save_every == 0) and not state.bad_in_a_row:
                self.save(best=improved)
            fault_point("after_step", state.step, self.engine.rank)
            if stop:
                log.info("early stopping at step %d: no improvement for %d evals", state.step,
                         args.early_stopping_patience)
                break
            self.throughput.resume()  # evals and saves are not training time

    def _count_skip(self, skipped: bool) -> None:
        state = self.state
        if not skipped:
            state.bad_in_a_row = 0
            return
        state.skipped_steps += 1
        state.bad_in_a_row += 1
        if self.engine.is_main:
            log.warning("step %d skipped on every rank: non-finite loss or gradients (%d in a row, %d in total)",
                        state.step, state.bad_in_a_row, state.skipped_steps)
        if state.bad_in_a_row >= self.args.max_bad_steps:
            last = self.last_saved_path or "none yet"
            raise TrainingHalted(f"{state.bad_in_a_row} consecutive non-finite steps up to step {state.step} "
                                 f"(--max_bad_steps {self.args.max_bad_steps}); stopping. Last good checkpoint: {last}")

    def _log_train(self, out) -> None:
        engine, state = self.engine, self.state
        losses = engine.all_reduce(torch.stack([out.loss, out.router_loss])) / engine.world_size
        loss, router_loss = losses.tolist()
        mem = self._peak_memory()
        tok_s = self.throughput.tokens_per_s
        state.max_tok_s = max(state.max_tok_s, self.throughput.max_tokens_per_s)
        scalars = {"loss": loss, "lm_loss": loss - router_loss, "router_loss": router_loss, "lr": engine.lr(),
                   "tok_s": tok_s, "peak_mem_mb": mem, "grad_norm": out.grad_norm,
                   **routing_health(engine.model.routing_stats())}
        self.writer.log(state.step, "train", scalars)
        if engine.is_main:
            log.info(format_progress(state.step, self.args.max_steps, loss, engine.lr(), tok_s,
                                     self.throughput.eta_s(state.step, self.args.max_steps)))

    def _peak_memory(self) -> float:
        """Every rank's peak (and NVML reading, where there is one); returns the largest peak."""
        engine, state = self.engine, self.state
        mine = peak_memory_mb(engine.device)
        table = torch.zeros(2, engine.world_size, dtype=torch.float64, device=engine.device)
        table[:, engine.rank] = torch.tensor([mine["peak_mem_mb"], mine.get("nvml_used_mb", -1.0)])
        peak, nvml = engine.all_reduce(table).tolist()  # each rank filled its own column
        state.peak_mem_mb_per_rank = [max(a, b) for a, b in zip(state.peak_mem_mb_per_rank or peak, peak)]
        if max(nvml) >= 0:
            state.nvml_used_mb_per_rank = [max(a, b) for a, b in zip(state.nvml_used_mb_per_rank or nvml, nvml)]
        state.peak_mem_mb = max(state.peak_mem_mb_per_rank)
        return max(peak)

    def _evaluate(self) -> tuple[bool, bool]:
        engine, state, args = self.engine, self.state, self.args
        result = evaluate(engine.model, self.data.valid_blocks, self.valid_shards, device=engine.device,
                          all_reduce=engine.all_reduce, autocast=engine.eval_context,
                          progress=lambda: self.watchdog.beat(state.step, "eval"))
        routing = result.pop("routing")
        state.last_val = result
        improved = result["loss"] < state.best_val_loss
        if improved:
            state.best_val_loss, state.best_step = result["loss"], state.step
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
        warnings = self.collapse.update(state.step, routing) if routing else []
        for w in warnings:
            log.warning(w)
        self.writer.log(state.step, "eval", {**result, "best_ppl": math.exp(min(state.best_val_loss, 50)),
                                             **routing_health(routing)})
        if routing:
            self.writer.utilization_heatmap(state.step, routing_utilization(routing), layers=sorted(routing))
        if engine.is_main:
            log.info("eval step %d | val loss %.4f | ppl %.2f | top1 %.3f | top3 %.3f%s", state.step, result["loss"],
                     result["ppl"], result["top1_acc"], result["top3_acc"], " | new best" if improved else "")
        patience = args.early_stopping_patience
        return improved, bool(patience) and state.evals_without_improvement >= patience

    # ---- checkpoints and summary ----------------------------------------------------------

    def save(self, *, best: bool) -> Path:
        engine, state = self.engine, self.state
        if hasattr(self, "watchdog"):
            self.watchdog.beat(state.step, "save")
        started = time.perf_counter()
        staging = self.store.begin(state.step)
        fault_point("save_begin", state.step, engine.rank)
        engine.save(staging)
        save_rank_state(staging, engine.rank, {"rng": capture_rng()})
        if engine.is_main:
            state.sampler = self.sampler.state_dict()
            state.collapse = self.collapse.state_dict()
            state.scheduler_steps = engine.scheduler.last_epoch
            state.engine, state.ep_size, state.world_size = self._layout()
            (staging / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=1))
            self.config.to_json_file(staging / "config.json")
        self.store.seal(staging)
        fault_point("before_commit", state.step, engine.rank)
        path = self.store.publish(staging, best=best, keep_last=self.args.keep_last)
        self.last_saved, self.last_saved_path = state.step, path
        if engine.is_main:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            log.info("saved %s (%.1f MB) in %.2f s%s", path.name, size / 2**20, time.perf_counter() - started,
                     " | best" if best else "")
        return path

    def summary(self, params_total: int, params_active: int) -> dict:
        state, c, spec = self.state, self.config, self.plan.spec
        return {
            "final_val_ppl": state.last_val.get("ppl"), "final_val_loss": state.last_val.get("loss"),
            "best_val_ppl": math.exp(min(state.best_val_loss, 50)), "best_step": state.best_step,
            "final_top1_acc": state.last_val.get("top1_acc"), "final_top3_acc": state.last_val.get("top3_acc"),
            "max_tok_s": state.max_tok_s, "peak_mem_mb": state.peak_mem_mb, "steps": state.step,
            "peak_mem_mb_per_rank": state.peak_mem_mb_per_rank, "nvml_used_mb_per_rank": state.nvml_used_mb_per_rank,
            "skipped_steps": state.skipped_steps,
            "params_total": params_total, "params_active": params_active, "ep_size": spec.ep_size,
            "world_size": self.engine.world_size, "engine": self.engine.kind, "model": self.plan.preset,
            "precision": spec.precision, "tokens_per_step": self.tokens_per_step,
            "num_local_experts": c.num_local_experts, "num_experts_per_tok": c.num_experts_per_tok,
            "capacity_factor": c.capacity_factor, "router_jitter_noise": c.router_jitter_noise,
            "router_aux_loss_coef": c.router_aux_loss_coef, "router_z_loss_coef": c.router_z_loss_coef,
            "router_bias_update_rate": c.router_bias_update_rate, "router_type": c.router_type,
            "routing_warnings": self.collapse.warnings,
        }
