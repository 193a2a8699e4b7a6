"""The training command line: one dataclass per concern, parsed by transformers' HfArgumentParser.

Config flows one way: these dataclasses and `data.DataConfig` (parsed as it is) -> `plan.plan_run`,
which checks them together and returns a `RunPlan` -> `plan.finalize`, which settles the model's
vocabulary once the tokenizer exists -> model, engine and loop. `ModelArgs` fields carry the
`MoEConfig` names (`num_local_experts`); the short CLI names (`--num_experts`, `--top_k`) are
aliases of those fields, so the overrides are the fields themselves, with no name map.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path

from transformers import HfArgumentParser

from ..model.configuration import MoEConfig
from ..model.lora import TARGETS, LoRAConfig
from ..parallel.ds_config import ConfigError
from ..parallel.process_group import WATCHDOG_MARGIN_S
from .data import DataConfig
from .ranges import Range, check_ranges

DEFAULT_PRESET = "tiny-moe"
# transformers.set_seed seeds numpy, whose seeds are 32-bit.
_SEEDS = Range(0, 2**32 - 1, why="numpy's seed range: the seed also seeds numpy")
# Process groups take their timeout as a datetime.timedelta, which holds at most 999,999,999 days.
_TIMEOUTS = Range(
    1,
    int(timedelta.max.total_seconds()) - WATCHDOG_MARGIN_S,
    why="process groups take it, plus a margin, as a datetime.timedelta",
)


def _help(text: str, default=None):
    return field(default=default, metadata={"help": text})


def _override(text: str, *aliases: str):
    """A `MoEConfig` field the command line may set; None keeps the preset's (or --init_from's) value."""
    # HfArgumentParser adds the dashed spelling of a field's own name only, so the aliases get theirs here.
    flags = [f for a in aliases for f in dict.fromkeys((f"--{a}", f"--{a.replace('_', '-')}"))]
    return field(default=None, metadata={"help": text, "aliases": flags})


@dataclass
class ModelArgs:
    """Which model: a preset, field overrides on it, or the weights of an earlier export."""

    model: str | None = _help(
        f"preset name (see moe_dist.model.configuration.PRESETS; default {DEFAULT_PRESET}); not "
        f"with --init_from, whose config.json is the model"
    )
    num_local_experts: int | None = _override("experts per MoE layer (0 = dense)", "num_experts")
    num_experts_per_tok: int | None = _override("experts per token", "top_k")
    moe_intermediate_size: int | None = _override("expert FFN width (default: the preset's)")
    capacity_factor: float | None = _override("training capacity factor (slots = factor x fair share)")
    dropless: bool = _help("no capacity limit: drop no tokens (default on the accelerate path)", False)
    router_jitter_noise: float | None = _override(
        "multiplicative router-input noise epsilon, training only", "router_jitter"
    )
    router_type: str | None = _override("softmax | random")
    moe_every: int | None = _override("every N-th FFN is MoE")
    skip_first_moe: int | None = _override("the first N FFNs stay dense")
    num_shared_experts: int | None = _override("always-on shared experts")
    router_aux_loss_coef: float | None = _override("Switch/GShard load-balancing loss coefficient", "aux_loss_coef")
    router_aux_loss: str | None = _override(
        "the load-balancing loss's form: per_layer (ours: each MoE layer's, summed; the presets'), stock "
        "(transformers' load_balancing_loss_func, pooled over the layers; --init_from of an MoE whose "
        "output_router_logits is true) or none (--init_from when it is false)"
    )
    router_z_loss_coef: float | None = _override("ST-MoE router z-loss coefficient", "z_loss_coef")
    router_bias_update_rate: float | None = _override(
        "DeepSeek-V3 aux-loss-free bias step (0 = off)", "bias_update_rate"
    )
    vocab_size: int | None = _override("model vocabulary (default: the tokenizer's size, rounded up to 64)")
    init_from: str | None = _help(
        "start from these weights: an hf/ export or run folder of ours, or a folder of a "
        "stock transformers class (gpt2, llama, qwen3, mixtral, qwen3_moe, olmoe, "
        "ernie4_5_moe), converted exactly"
    )
    norm_topk_prob: bool | None = _override("renormalise the k gate weights to sum to 1 (true/false)")
    upcycle_experts: int | None = _help(
        "with a dense --init_from: every routed FFN becomes this many copies of "
        "the dense FFN, plus a new router (sparse upcycling)"
    )
    upcycle_noise: float = _help("multiplicative noise std on each upcycled copy's weights", 0.0)
    upcycle_reinit: float = _help("Drop-Upcycling: fraction of each copy's intermediate channels re-initialised", 0.0)
    upcycle_granularity: int = _help(
        "fine-grained upcycling: split each copy into this many experts of 1/G the "
        "dense width; --top_k counts copies and is scaled by G",
        1,
    )
    grad_ckpt: bool = _help("activation checkpointing of every block", False)
    freeze_router: bool = _help(
        "keep every router's weights as they start (no gradient, no optimizer state): fine-tuning on narrow data "
        "then cannot move or collapse the routing",
        False,
    )
    freeze_router_bias: bool = _help(
        "keep the aux-loss-free selection bias as it starts (no bias update), the router's weights still train",
        False,
    )
    dropout: str | None = _help(
        "off: no dropout (attention, residual, embedding), whatever the preset or --init_from's config "
        "sets (GPT-2 releases train with 0.1); default: theirs"
    )
    lora_rank: int | None = _help(
        "LoRA: train a rank-r adapter on each targeted projection with every base weight frozen (docs/lora.md); "
        "default: full fine-tuning"
    )
    lora_alpha: float | None = _help("LoRA: the update is scaled by alpha / rank (default: the rank, scale 1)")
    lora_dropout: float | None = _help("LoRA: dropout on the adapters' input, in [0, 1) (default 0)")
    lora_targets: str | None = _help(
        f"LoRA: comma-separated, of {', '.join(TARGETS)} (default: every one the model has); the router follows "
        "--freeze_router"
    )

    RANGES = {"lora_rank": Range(1), "lora_alpha": Range(0, low_open=True), "lora_dropout": Range(0, 1, high_open=True)}

    @property
    def preset(self) -> str:
        return self.model or DEFAULT_PRESET

    def __post_init__(self):
        if self.model is not None and self.init_from is not None:
            raise ConfigError(
                f"--model {self.model} conflicts with --init_from {self.init_from}: the folder's "
                f"config.json is the model; drop --model"
            )
        check_ranges(self)

    def lora(self) -> LoRAConfig | None:
        """The LoRA adapters asked for; None: full fine-tuning."""
        extra = [f"--{n}" for n in ("lora_alpha", "lora_dropout", "lora_targets") if getattr(self, n) is not None]
        if self.lora_rank is None:
            if extra:
                raise ConfigError(f"{', '.join(extra)}: LoRA needs --lora_rank (the adapters' rank, an integer >= 1)")
            return None
        targets = (
            TARGETS
            if self.lora_targets is None
            else tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        )
        try:
            return LoRAConfig(
                rank=self.lora_rank,
                alpha=float(self.lora_rank if self.lora_alpha is None else self.lora_alpha),
                dropout=self.lora_dropout or 0.0,
                targets=targets,
            )
        except ValueError as e:  # an unknown or empty target: the message names the flag and the valid ones
            raise ConfigError(f"--{e}") from None

    def model_overrides(self) -> dict:
        """The `MoEConfig` fields given on the command line (the fields named after one)."""
        overrides = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name in MoEConfig.__dataclass_fields__ and getattr(self, f.name) is not None
        }
        if self.dropout not in (None, "off"):
            raise ConfigError(f"--dropout {self.dropout!r} is invalid: the one value is off (default: the model's own)")
        if self.dropout == "off":
            overrides.update(attention_dropout=0.0, resid_dropout=0.0, embd_dropout=0.0)
        if self.dropless:
            if self.capacity_factor is not None:
                raise ConfigError("--dropless and --capacity_factor contradict each other; pass one")
            overrides["capacity_factor"] = None
        return overrides


@dataclass
class RunArgs:
    """The run folder and the loop's schedule: how long, how often to log, evaluate and save, when to stop."""

    output_dir: str = _help("run folder; re-running the same command resumes from it")
    max_steps: int = _help("optimizer steps", 1000)
    eval_every: int = _help("evaluate every N steps", 100)
    save_every: int = _help("checkpoint every N steps (and at the end)", 500)
    log_every: int = _help("progress line every N steps", 10)
    early_stopping_patience: int = _help("stop after N evals without a new best (0 = off)", 0)
    routing_drift_alert: float = _help(
        "warn when a layer's routing drift (share of the probe's tokens whose experts changed since step 0) passes "
        "this",
        0.5,
    )
    keep_last: int = _help("committed checkpoints to keep, besides the best", 2)
    seed: int = _help("model init and data order", 0)
    max_bad_steps: int = _help("stop after N consecutive steps skipped for a non-finite loss or gradient", 10)
    allow_engine_change: bool = _help("resume a run saved by the other engine (DeepSpeed <-> accelerate)", False)
    allow_optimizer_reset: bool = _help(
        "when resharding cannot carry the optimizer state, continue with a fresh one instead of stopping", False
    )

    RANGES = {
        "max_steps": Range(1),
        "eval_every": Range(1),
        "save_every": Range(1),
        "log_every": Range(1),
        "early_stopping_patience": Range(0),
        "routing_drift_alert": Range(0.0, 1.0),
        "keep_last": Range(1),
        "seed": _SEEDS,
        "max_bad_steps": Range(1),
    }

    def __post_init__(self):
        if not self.output_dir:
            raise ConfigError("--output_dir is required")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ConfigError(
                f"--output_dir {self.output_dir} is an existing file; pass a folder (new, or a run to resume)"
            )
        check_ranges(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)


@dataclass
class EngineArgs:
    """How each step runs: the engine, its batch and precision (with --deepspeed the JSON's; a flag only repeats it)."""

    deepspeed: str | None = _help(
        "DeepSpeed JSON (its moe.ep_size sets expert parallelism); without it the run uses accelerate on one device"
    )
    local_rank: int = _help("set by the deepspeed launcher", -1)
    micro_batch_size: int | None = _help(
        "sequences per device per micro-step (with --deepspeed: the JSON's train_micro_batch_size_per_gpu)"
    )
    grad_accum: int | None = _help("micro-steps per optimizer step (accelerate path)")
    grad_clip: float | None = _help("max gradient norm, 0 = off (accelerate path)")
    precision: str = _help("auto | bf16 | fp32 (accelerate path; auto = bf16 on GPU, fp32 on CPU)", "auto")
    dist_timeout: int = _help("seconds without progress before a stuck rank ends the job", 1800)
    gpu_mem_gib: float | None = _help(
        "memory of one device in GiB, for the planner's memory estimate (default: the "
        "GPU's own; on CPU, the memory available now, shared by this machine's ranks)"
    )

    RANGES = {
        "local_rank": Range(-1),
        "micro_batch_size": Range(1),
        "grad_accum": Range(1),
        "grad_clip": Range(0),
        "dist_timeout": _TIMEOUTS,
        "gpu_mem_gib": Range(0, low_open=True),
    }

    def __post_init__(self):
        check_ranges(self)
        if self.precision not in ("auto", "bf16", "fp32"):
            why = " (fp16 needs loss scaling, which the accelerate path lacks)" if self.precision == "fp16" else ""
            raise ConfigError(f"--precision={self.precision!r} is invalid{why}: auto, bf16 or fp32")
        # `accelerate launch --mixed_precision fp16` (or its config file) sets this; the engine
        # passes its own mixed_precision, so fp16 would be silently dropped.
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        if not self.deepspeed and launched == "fp16":
            raise ConfigError(
                "ACCELERATE_MIXED_PRECISION=fp16 (accelerate launch --mixed_precision) is not "
                "supported: the accelerate path runs --precision auto, bf16 or fp32"
            )


@dataclass
class OptimArgs:
    """AdamW and its warmup-cosine schedule."""

    lr: float = _help("peak learning rate", 1e-3)
    min_lr_ratio: float = _help("final lr as a fraction of the peak", 0.1)
    warmup_steps: int = _help("linear warmup steps", 100)
    weight_decay: float = _help("AdamW decay on matrices (none on norms, biases, router)", 0.1)
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8

    # AdamW and the schedule are undefined outside these. lr 0 is allowed: it freezes the weights (evaluation-only
    # runs, early-stopping checks).
    RANGES = {
        "lr": Range(0),
        "min_lr_ratio": Range(0, 1),
        "warmup_steps": Range(0),
        "weight_decay": Range(0),
        "beta1": Range(0, 1, high_open=True),
        "beta2": Range(0, 1, high_open=True),
        "adam_eps": Range(0, low_open=True),
    }

    def __post_init__(self):
        check_ranges(self)


class _Parser(HfArgumentParser):
    def error(self, message: str):
        # argparse prints its 37-line usage before the message; a mistyped value deserves one line, like any
        # other bad input (cli.main prints it and exits 2).
        raise ConfigError(message)

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        for action in self._actions:
            # argparse drops "--" (its end-of-options marker) from `--flag=--`, leaving an empty list as the value.
            if action.nargs is None and isinstance(getattr(namespace, action.dest, None), list):
                self.error(f"argument {'/'.join(action.option_strings)}: expected one value")
        return namespace, rest


_PARTS = (ModelArgs, DataConfig, RunArgs, EngineArgs, OptimArgs)


def parse_args(argv: list[str] | None = None) -> tuple[ModelArgs, DataConfig, RunArgs, EngineArgs, OptimArgs]:
    """The command line as the five dataclasses `plan_run` takes, in that order; each knows which of its fields
    the command line gave (`given_fields`)."""
    parts = _Parser(_PARTS).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    given = _given_dests(argv)
    for part in parts:
        setattr(part, _GIVEN, frozenset(f.name for f in fields(part) if f.name in given))
    return parts


_GIVEN = "_given_fields"


def _given_dests(argv: list[str] | None) -> set[str]:
    # A flag typed at its default value is still the user's word; comparing values cannot tell, so the
    # command line is parsed once more with every default suppressed: what remains was typed.
    parser = _Parser(_PARTS)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    namespace, _ = parser.parse_known_args(argv)
    return set(vars(namespace))


def given_fields(part) -> frozenset[str]:
    """The fields of one of `parse_args`'s dataclasses that the command line gave; for one built in code, the
    fields that differ from their default."""
    given = getattr(part, _GIVEN, None)
    if given is not None:
        return given
    return frozenset(f.name for f in fields(part) if getattr(part, f.name) != _default(f))


def _default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
