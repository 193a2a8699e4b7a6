"""The training loop: one loop, two engines (DeepSpeed or accelerate).

step -> log -> evaluate -> early-stop -> checkpoint, resumable from the run folder, and at
the end `summary.json` plus an `hf/` export. The engine owns parallelism and the optimizer
step; this module owns the schedule of what happens when. Resuming lives in `resume`, the
numbers in `report`, and the named events tests listen to in `hooks`.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import transformers

from ..atomic_io import write_atomic
from ..checkpoint.formats import LORA_ADAPTERS, hf_named_parameters
from ..convert.sources import AdaptedSource
from ..convert.stock_import import weight_source
from ..convert.upcycle import source_record, step0_description
from ..export import export_checkpoint
from ..model.configuration import MoEConfig
from ..model.lora import adapter_parameters, apply_lora, init_adapters
from ..model.modeling import MoEForCausalLM
from ..output_guard import record as record_outputs
from ..parallel.engines import TrainEngine, make_engine
from ..parallel.expert_tensor_parallel import EtpLayout
from .checkpoint import CheckpointStore, capture_rng, save_rank_state
from .data import BlockSampler, PreparedData, batch_tensors, describe_source, prepare_data, validation_shard
from .eval_samples import chat_prompts, greedy_replies
from .evaluation import evaluate
from .faults import hooks_from_env
from .hooks import Hook, Hooks
from .metrics import CollapseMonitor, expert_similarity
from .plan import RUN_OUTPUTS, RUN_RECORD, TRAIN, RunPlan, check_run_folder, finalize, run_record
from .report import RunReport
from .resume import find_checkpoint, layout, load_checkpoint
from .routing_drift import RoutingDrift
from .shared_folder import check_run_folder_shared
from .state import TrainerState, write_trainer_state
from .watchdog import Watchdog

log = logging.getLogger("moe_dist")


class TrainingHalted(RuntimeError):
    """Training cannot usefully go on (e.g. every step is non-finite); the last good checkpoint stays."""


def run(plan: RunPlan, hooks: Iterable[Hook] = ()) -> dict | None:
    """Train as planned; returns the summary on rank 0 (None elsewhere).

    `hooks` hear the loop's named events (see `hooks`), after the one MOE_DIST_FAULT asks for.
    """
    engine = make_engine(plan.engine, plan.spec)
    _configure_logging(engine.is_main)
    if engine.is_main:
        # Before anything is written: the planner checked that none of these names is someone else's.
        record_outputs(plan.run_dir, TRAIN, RUN_OUTPUTS)
    log.info("layout: %s", EtpLayout(engine.world_size, plan.spec.ep_size, plan.spec.etp_size).describe())
    for segment in engine.released_shm:
        log.info("unlinked %s once every rank had mapped it, so no launch leaves it in RAM", segment)
    check_run_folder_shared(plan.run_dir, engine)  # before any rank writes data or checkpoints there
    data, config = _prepare(plan, engine)
    model, weights = _build_model(plan, config)
    params_total, params_active = model.num_parameters(), model.num_active_parameters()
    engine.setup(model, weights)
    torch.manual_seed(plan.run.seed * 1000 + engine.rank + 1)  # router jitter differs across ranks
    events = Hooks([*hooks_from_env(), *hooks], rank=engine.rank, model=engine.model)
    events.watch_saved_files(_checkpoint_writer(engine))

    loop = _Loop(plan, engine, data, config, events)
    loop.resume()
    try:
        loop.train()
    except Exception as e:
        # Under the launcher every rank's stderr is shown: say who failed, and when.
        log.error("rank %d failed at step %d: %s: %s", engine.rank, loop.current_step, type(e).__name__, e)
        raise
    final = loop.final_checkpoint()
    if engine.is_main and final is not None:
        export_checkpoint(final, plan.run_dir / "hf", tokenizer_dir=plan.run_dir / "tokenizer")
    summary = None  # rank 0's; the others wait for it in engine.close()
    if engine.is_main:
        summary = loop.report.finish(
            loop.state, params_total=params_total, params_active=params_active, routing_warnings=loop.collapse.warnings
        )
    engine.close()
    return summary


def _configure_logging(is_main: bool) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if is_main else logging.WARNING,
        force=True,
    )
    transformers.logging.set_verbosity_error()
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache notes are not ours to show


def _prepare(plan: RunPlan, engine: TrainEngine) -> tuple[PreparedData, MoEConfig]:
    """Tokenized data on every rank, the model's final config, and the run folder's record of it."""
    if engine.is_main:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        if not (plan.run_dir / RUN_RECORD).exists():
            # A tokenizer without a run record is left over from a launch that failed while
            # preparing data (say, on a corpus since fixed): never reuse it. It is ours: the
            # planner refuses a folder whose tokenizer/ moe-dist did not write.
            shutil.rmtree(plan.run_dir / "tokenizer", ignore_errors=True)
    # Any non-empty validation set works at any world size: validation_shard pads the last batches.
    log.info("data: %s", describe_source(plan.data))
    data = prepare_data(plan.data, plan.run_dir, is_main=engine.is_main, barrier=engine.barrier)
    config = finalize(plan, data.tokenizer)
    check_run_folder(plan, config)
    engine.barrier()  # every rank has compared against the old record before rank 0 replaces it
    if engine.is_main:
        # What the model card of an export cites: the latest launch's command line and data source.
        record = {**run_record(plan, config), "command": shlex.join(sys.argv), "data": describe_source(plan.data)}
        record = json.dumps(record, indent=1).encode()
        write_atomic(plan.run_dir / RUN_RECORD, lambda f: f.write(record))
    return data, config


def _build_model(plan: RunPlan, config: MoEConfig):
    """The model, and where its starting weights come from (None: a fresh seeded init).

    With --init_from the model is built on the meta device and the engine fills it after sharding its
    experts, so each rank reads only the tensors it holds (`TrainEngine.setup`).
    """
    # Same seed on every rank: every rank builds identical weights before experts are sharded.
    transformers.set_seed(plan.run.seed)
    weights = None
    if plan.init is not None:
        with torch.device("meta"):
            model = MoEForCausalLM(config)
        weights = weight_source(plan.init, config, plan.upcycling)
    else:
        model = MoEForCausalLM(config)
    if plan.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_trainable(model, plan)
    if plan.lora is not None:
        # Each adapter factor starts from (seed, its key) alone, whole, before the engine shards it: a model
        # filled after sharding reads the same values through the source.
        if weights is None:
            init_adapters(model, plan.run.seed)
        else:
            weights = AdaptedSource(weights, {n: p.shape for n, p in adapter_parameters(model)}, plan.run.seed)
    return model, weights


def set_trainable(model: MoEForCausalLM, plan: RunPlan) -> MoEForCausalLM:
    """What trains: LoRA's adapters on a frozen base (with --lora_rank), and the routers unless --freeze_router.

    Before the engine builds its optimizer, which then holds no state for a frozen weight; a resharded resume
    applies it to its meta model to match the saved optimizer state to names (`resume.load_checkpoint`).
    """
    routers = [(router, router.weight.requires_grad) for router in model.routers()]  # a random router never trains
    if plan.lora is not None:
        apply_lora(model, plan.lora)  # freezes every weight, the routers' too
    for router, trains in routers:
        router.weight.requires_grad_(trains and not plan.freeze_router)
        router.freeze_bias = plan.freeze_router_bias
    return model


def _checkpoint_writer(engine: TrainEngine):
    """DeepSpeed's checkpoint engine, which writes a save file by file; accelerate saves in one call."""
    ds = getattr(engine, "ds", None)
    return None if ds is None else ds.checkpoint_engine


class _Loop:
    """The schedule: step, log, evaluate when due, save when due, stop when told; `_Validation` evaluates and
    `_Checkpoints` saves and resumes."""

    def __init__(self, plan: RunPlan, engine: TrainEngine, data: PreparedData, config: MoEConfig, hooks: Hooks):
        self.plan, self.engine, self.data, self.hooks = plan, engine, data, hooks
        self.run, spec = plan.run, plan.spec
        self.sampler = BlockSampler(
            len(data.train_blocks),
            micro_batch_size=spec.micro_batch_size,
            grad_accum=spec.grad_accum,
            rank=engine.rank,
            world_size=engine.world_size,
            seed=self.run.seed,
        )
        tokens_per_step = self.sampler.global_batch * plan.data.seq_len
        self.report = RunReport(plan, engine, config, tokens_per_step=tokens_per_step)
        self.collapse = CollapseMonitor(max(config.num_local_experts, 1))
        self.watchdog = Watchdog(spec.dist_timeout_s, plan.run_dir / "heartbeats", engine.rank)
        self.validation = _Validation(plan, engine, data, config, self.report, self.collapse, self.watchdog)
        self.checkpoints = _Checkpoints(
            plan, engine, config, hooks, self.watchdog, self.sampler, self.collapse, self.report
        )
        self.state = TrainerState()
        self.current_step = 0

    def resume(self) -> None:
        """Continue from the newest intact checkpoint, if there is one."""
        self.state = self.checkpoints.resume() or self.state

    def train(self) -> None:
        run, state = self.run, self.state
        log.info(
            "training %s for %d steps on %d rank(s), %d tokens per step",
            self.plan.preset,
            run.max_steps,
            self.engine.world_size,
            self.report.tokens_per_step,
        )
        if self.plan.upcycling is not None and state.step == 0:
            self.validation.log_upcycled_start()
        if self.validation.drift is not None:
            self.validation.drift.start(self.engine.model, self.data.valid_blocks, self.engine, fresh=state.step == 0)
        while state.step < run.max_steps:
            self.current_step = state.step + 1
            self.hooks.fire("before_step", self.current_step)
            # After the event: a rank stuck before its step still reports the previous one,
            # which is how the watchdog tells it from the peers blocked waiting for it.
            self.watchdog.beat(self.current_step)
            micro = [batch_tensors(self.data.train_blocks, idx) for idx in self.sampler.next_step()]
            out = self.engine.train_batch(micro)
            state.step += 1
            self._count_skip(out.skipped)
            self.report.step_done()
            if state.step % run.log_every == 0 or state.step in (1, run.max_steps):
                self.report.log_train(state.step, out)
            improved, stop = False, False
            if state.step % run.eval_every == 0 or state.step == run.max_steps:
                improved, stop = self.validation.evaluate(state)
            # Never save in a non-finite streak: the weights may be what went wrong, and the
            # last checkpoint must stay the last good one.
            if (improved or stop or state.step % run.save_every == 0) and not state.bad_in_a_row:
                self.checkpoints.save(state, best=improved)
            self.hooks.fire("after_step", state.step)
            if stop:
                log.info(
                    "early stopping at step %d: no improvement for %d evals", state.step, run.early_stopping_patience
                )
                break
            self.report.pause_done()

    def _count_skip(self, skipped: bool) -> None:
        state, totals = self.state, self.report.totals
        if not skipped:
            state.bad_in_a_row = 0
            return
        totals.skipped_steps += 1
        state.bad_in_a_row += 1
        if self.engine.is_main:
            log.warning(
                "step %d skipped on every rank: non-finite loss or gradients (%d in a row, %d in total)",
                state.step,
                state.bad_in_a_row,
                totals.skipped_steps,
            )
        if state.bad_in_a_row >= self.run.max_bad_steps:
            last = self.checkpoints.last_saved_path or "none yet"
            raise TrainingHalted(
                f"{state.bad_in_a_row} consecutive non-finite steps up to step {state.step} "
                f"(--max_bad_steps {self.run.max_bad_steps}); stopping. Last good checkpoint: {last}"
            )

    def final_checkpoint(self) -> Path | None:
        return self.checkpoints.final(self.state)


class _Validation:
    """Evaluation on this rank's validation shard: the numbers and routing health it reports, the best loss so
    far, and whether early stopping's patience has run out."""

    def __init__(
        self,
        plan: RunPlan,
        engine: TrainEngine,
        data: PreparedData,
        config: MoEConfig,
        report: RunReport,
        collapse: CollapseMonitor,
        watchdog: Watchdog,
    ):
        self.plan, self.engine, self.data, self.config = plan, engine, data, config
        self.report, self.collapse, self.watchdog = report, collapse, watchdog
        self.shards = validation_shard(
            len(data.valid_blocks),
            rank=engine.rank,
            world_size=engine.world_size,
            micro_batch_size=plan.spec.micro_batch_size,
        )
        self.drift = RoutingDrift(plan.run_dir, plan.run.routing_drift_alert) if config.is_moe else None
        self.prompts = chat_prompts(plan.data.valid_file, data.tokenizer) if plan.data.conversations else []

    def _measure(self, progress: Callable[[], None] = lambda: None) -> dict:
        engine = self.engine
        return evaluate(
            engine.model,
            self.data.valid_blocks,
            self.shards,
            device=engine.device,
            all_reduce=engine.all_reduce,
            autocast=engine.eval_context,
            progress=progress,
        )

    def evaluate(self, state: TrainerState) -> tuple[bool, bool]:
        """(improved on the best, out of patience), the best and the patience count kept in `state`."""
        engine = self.engine
        result = self._measure(progress=lambda: self.watchdog.beat(state.step, "eval"))
        routing = result.pop("routing")
        similarity = (
            expert_similarity(
                hf_named_parameters(engine.model), engine.all_gather_objects, width=self.config.moe_intermediate_size
            )
            if self.config.is_moe
            else {}
        )
        improved = result["loss"] < state.best_val_loss
        if improved:
            state.best_val_loss, state.best_step = result["loss"], state.step
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
        drift = self.drift.measure(engine.model) if self.drift is not None else {}
        self._log_samples()
        drifted = self.drift.warnings(state.step, drift) if drift else []
        self.collapse.warnings += drifted  # summary.json's routing_warnings holds every routing alert
        for warning in (self.collapse.update(state.step, routing) if routing else []) + drifted:
            if engine.is_main:  # rank 0's, as metrics.jsonl and summary.json record them: one line each
                log.warning(warning)
        self.report.log_eval(
            state.step,
            result,
            routing,
            best_val_loss=state.best_val_loss,
            improved=improved,
            similarity={**similarity, **drift},
        )
        patience = self.plan.run.early_stopping_patience
        return improved, bool(patience) and state.evals_without_improvement >= patience

    def _log_samples(self) -> None:
        """Greedy replies to the first validation prompts (conversation runs), on every rank; rank 0 logs them."""
        if not self.prompts:
            return
        tokenizer, engine = self.data.tokenizer, self.engine
        eos = self.config.eos_token_id  # the model's stop ids (a list in Llama 3 instruct) and the tokenizer's
        stop = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        replies = greedy_replies(engine.model, self.prompts, tokenizer, engine.device, engine.eval_context, stop)
        if engine.is_main:
            for prompt, reply in zip(self.prompts, replies):
                log.info("sample | %s -> %r", tokenizer.decode(prompt[-48:]).replace("\n", " "), reply)

    def log_upcycled_start(self) -> None:
        """What the upcycled model computes before its first step, and how far its validation loss is from the
        dense model's (as the dense run's summary.json recorded it, on its own validation set)."""
        result = self._measure()
        if not self.engine.is_main:
            return
        dense = source_record(self.plan.init_from)
        compared = (
            f"; the dense run's final val loss {dense['final_val_loss']:.4f} (its summary.json): "
            f"{result['loss'] - dense['final_val_loss']:+.4f}"
            if dense.get("final_val_loss") is not None
            else "; the dense source records no val loss to compare with"
        )
        log.info(
            "upcycled to %s: step 0 computes %s; val loss %.4f (ppl %.2f)%s",
            self.plan.upcycling.describe(),
            step0_description(self.config, self.plan.upcycling),
            result["loss"],
            result["ppl"],
            compared,
        )


class _Checkpoints:
    """What a checkpoint holds beside the engine's own state (the sampler's position, the collapse monitor, the
    report's totals, the config), written through the store and read back on resume."""

    def __init__(
        self,
        plan: RunPlan,
        engine: TrainEngine,
        config: MoEConfig,
        hooks: Hooks,
        watchdog: Watchdog,
        sampler: BlockSampler,
        collapse: CollapseMonitor,
        report: RunReport,
    ):
        self.plan, self.engine, self.config, self.hooks, self.watchdog = plan, engine, config, hooks, watchdog
        self.sampler, self.collapse, self.report = sampler, collapse, report
        self.store = CheckpointStore(plan.run_dir / "checkpoints", is_main=engine.is_main, barrier=engine.barrier)
        self.last_saved, self.last_saved_path = -1, None

    def resume(self) -> TrainerState | None:
        """The state of the newest intact checkpoint, with the engine and the loop's parts restored from it; None
        before the first save."""
        path = find_checkpoint(self.engine, self.store)
        if path is None:
            return None
        state, self.report.totals = load_checkpoint(
            path,
            self.engine,
            ep_size=self.plan.spec.ep_size,
            config=self.config,
            allow_optimizer_reset=self.plan.run.allow_optimizer_reset,
            trainable=lambda model: set_trainable(model, self.plan),
        )
        self.sampler.load_state_dict(state.sampler)
        self.collapse.load_state_dict(state.collapse)
        self.report.writer.truncate_after(state.step)
        self.last_saved, self.last_saved_path = state.step, path
        log.info("resumed from %s (step %d)", path, state.step)
        return state

    def save(self, state: TrainerState, *, best: bool) -> Path:
        engine = self.engine
        self.watchdog.beat(state.step, "save")
        started = time.perf_counter()
        staging = self.store.begin(state.step)
        self.hooks.fire("save_begin", state.step)
        engine.save(staging)
        save_rank_state(staging, engine.rank, {"rng": capture_rng()})
        if engine.is_main:
            state.sampler = self.sampler.state_dict()
            state.collapse = self.collapse.state_dict()
            state.scheduler_steps = engine.scheduler.last_epoch
            state.engine, state.ep_size, state.world_size = layout(engine, self.plan.spec.ep_size)
            write_trainer_state(staging, state, self.report.totals)
            self.config.to_json_file(staging / "config.json")
            if self.plan.lora is not None:  # what the adapters in the weights are: the export folds them
                (staging / LORA_ADAPTERS).write_text(json.dumps(self.plan.lora.record()))
        self.store.seal(staging)
        self.hooks.fire("before_commit", state.step)
        path = self.store.publish(staging, best=best, keep_last=self.plan.run.keep_last)
        self.last_saved, self.last_saved_path = state.step, path
        if engine.is_main:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            log.info(
                "saved %s (%.1f MB) in %.2f s%s",
                path.name,
                size / 2**20,
                time.perf_counter() - started,
                " | best" if best else "",
            )
        return path

    def final(self, state: TrainerState) -> Path | None:
        """The checkpoint to export: the last one, saved now unless it is current or the run ended in a
        non-finite streak (which keeps its last good one)."""
        if state.bad_in_a_row or self.last_saved == state.step:
            return self.last_saved_path
        return self.save(state, best=False)
