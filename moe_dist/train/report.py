"""The run report: progress lines and metrics as the loop goes, every rank's peak memory, and `summary.json`.

Everything here is measurement: the loop decides what happens when, and tells the report.
Every rank takes part in the collectives of `log_train`; only rank 0 writes and prints.
"""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING

import torch

from ..convert.upcycle import source_record
from ..model.configuration import MoEConfig
from .logging_io import MetricsWriter, write_summary
from .metrics import Throughput, format_progress, peak_memory_mb, routing_health, routing_utilization
from .state import ReportTotals, TrainerState

if TYPE_CHECKING:
    from ..parallel.engines import StepOutput, TrainEngine
    from .plan import RunPlan

log = logging.getLogger("moe_dist")


class RunReport:
    def __init__(self, plan: RunPlan, engine: TrainEngine, config: MoEConfig, *, tokens_per_step: int):
        self.plan, self.engine, self.config, self.tokens_per_step = plan, engine, config, tokens_per_step
        self.writer = MetricsWriter(plan.run_dir, enabled=engine.is_main)
        self.throughput = Throughput()
        self.totals = ReportTotals()
        # The CUDA allocator's reserve peak per rank (allocated + its cache; empty on CPU). Kept
        # here, not in ReportTotals: trainer_state.json keeps its format, and after a resume the
        # new processes' peak is the one that says whether the GPU fits.
        self.peak_reserved_mb_per_rank: list[float] = []

    def step_done(self) -> None:
        self.throughput.update(self.tokens_per_step)

    def pause_done(self) -> None:
        self.throughput.resume()  # evals and saves are not training time

    def log_train(self, step: int, out: StepOutput) -> None:
        engine, totals, max_steps = self.engine, self.totals, self.plan.run.max_steps
        losses = engine.all_reduce(torch.stack([out.loss, out.router_loss])) / engine.world_size
        loss, router_loss = losses.tolist()
        mem = self._peak_memory()
        tok_s = self.throughput.tokens_per_s
        totals.max_tok_s = max(totals.max_tok_s, self.throughput.max_tokens_per_s)
        scalars = {
            "loss": loss,
            "lm_loss": loss - router_loss,
            "router_loss": router_loss,
            "lr": engine.lr(),
            "tok_s": tok_s,
            "peak_mem_mb": mem,
            "grad_norm": out.grad_norm,
            **routing_health(engine.model.routing_stats()),
        }
        self.writer.log(step, "train", scalars)
        if engine.is_main:
            log.info(format_progress(step, max_steps, loss, engine.lr(), tok_s, self.throughput.eta_s(step, max_steps)))

    def _peak_memory(self) -> float:
        """Every rank's peak (and NVML reading, where there is one); returns the largest peak."""
        engine, totals = self.engine, self.totals
        mine = peak_memory_mb(engine.device)
        table = torch.zeros(3, engine.world_size, dtype=torch.float64, device=engine.device)
        table[:, engine.rank] = torch.tensor(
            [mine["peak_mem_mb"], mine.get("nvml_used_mb", -1.0), mine.get("torch_reserved_peak_mb", -1.0)]
        )
        peak, nvml, reserved = engine.all_reduce(table).tolist()  # each rank filled its own column
        if max(reserved) >= 0:
            self.peak_reserved_mb_per_rank = [
                max(a, b) for a, b in zip(self.peak_reserved_mb_per_rank or reserved, reserved)
            ]
        totals.peak_mem_mb_per_rank = [max(a, b) for a, b in zip(totals.peak_mem_mb_per_rank or peak, peak)]
        if max(nvml) >= 0:
            totals.nvml_used_mb_per_rank = [max(a, b) for a, b in zip(totals.nvml_used_mb_per_rank or nvml, nvml)]
        totals.peak_mem_mb = max(totals.peak_mem_mb_per_rank)
        return max(peak)

    def log_eval(
        self,
        step: int,
        result: dict,
        routing: dict,
        *,
        best_val_loss: float,
        improved: bool,
        similarity: dict[str, float] | None = None,
    ) -> None:
        self.totals.last_val = result
        self.writer.log(
            step,
            "eval",
            {**result, "best_ppl": math.exp(min(best_val_loss, 50)), **routing_health(routing), **(similarity or {})},
        )
        if routing:
            self.writer.utilization_heatmap(step, routing_utilization(routing), layers=sorted(routing))
        if self.engine.is_main:
            log.info(
                "eval step %d | val loss %.4f | ppl %.2f | top1 %.3f | top3 %.3f%s",
                step,
                result["loss"],
                result["ppl"],
                result["top1_acc"],
                result["top3_acc"],
                " | new best" if improved else "",
            )

    def finish(
        self, state: TrainerState, *, params_total: int, params_active: int, routing_warnings: list[str]
    ) -> dict:
        """Write `summary.json` and close the metrics (rank 0 only); returns the summary."""
        summary = self.summary(
            state, params_total=params_total, params_active=params_active, routing_warnings=routing_warnings
        )
        write_summary(self.plan.run_dir, summary)
        self.writer.close()
        log.info(
            "done: %s", json.dumps({k: summary[k] for k in ("steps", "final_val_ppl", "best_val_ppl", "max_tok_s")})
        )
        return summary

    def summary(
        self, state: TrainerState, *, params_total: int, params_active: int, routing_warnings: list[str]
    ) -> dict:
        totals, c, spec = self.totals, self.config, self.plan.spec
        return {
            "final_val_ppl": totals.last_val.get("ppl"),
            "final_val_loss": totals.last_val.get("loss"),
            "best_val_ppl": math.exp(min(state.best_val_loss, 50)),
            "best_step": state.best_step,
            "final_top1_acc": totals.last_val.get("top1_acc"),
            "final_top3_acc": totals.last_val.get("top3_acc"),
            "max_tok_s": totals.max_tok_s,
            "peak_mem_mb": totals.peak_mem_mb,
            "steps": state.step,
            "peak_mem_mb_per_rank": totals.peak_mem_mb_per_rank,
            "nvml_used_mb_per_rank": totals.nvml_used_mb_per_rank,
            "skipped_steps": totals.skipped_steps,
            "peak_reserved_mb_per_rank": self.peak_reserved_mb_per_rank,
            "params_total": params_total,
            "params_active": params_active,
            "ep_size": spec.ep_size,
            "etp_size": spec.etp_size,
            "world_size": self.engine.world_size,
            "engine": self.engine.kind,
            "model": self.plan.preset,
            "precision": spec.precision,
            "tokens_per_step": self.tokens_per_step,
            "num_local_experts": c.num_local_experts,
            "num_experts_per_tok": c.num_experts_per_tok,
            "capacity_factor": c.capacity_factor,
            "router_jitter_noise": c.router_jitter_noise,
            "router_aux_loss_coef": c.router_aux_loss_coef,
            "router_z_loss_coef": c.router_z_loss_coef,
            "router_bias_update_rate": c.router_bias_update_rate,
            "router_type": c.router_type,
            "routing_warnings": routing_warnings,
            **(
                {"upcycling": self.plan.upcycling.record(), "upcycled_from": source_record(self.plan.init_from)}
                if self.plan.upcycling
                else {}
            ),
        }
