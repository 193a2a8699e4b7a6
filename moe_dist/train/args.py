"""The training command line as dataclasses (parsed by transformers' HfArgumentParser).

Config flows one way: these dataclasses -> `MoEConfig` / `DataConfig` / `DeepSpeedSettings`
(in `trainer.plan_run`) -> model and engine. Short names (`--num_experts`, `--top_k`) map
onto the HF config fields in `model_overrides`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from ..parallel.ds_config import ConfigError


def _help(text: str, default=None):
    return field(default=default, metadata={"help": text})


@dataclass
class ModelArgs:
    model: str = _help("preset name (see moe_dist.model.configuration.PRESETS)", "tiny-moe")
    num_experts: int | None = _help("experts per MoE layer (0 = dense)")
    top_k: int | None = _help("experts per token")
    capacity_factor: float | None = _help("training capacity factor (slots = factor x fair share)")
    dropless: bool = _help("no capacity limit: drop no tokens (default on the accelerate path)", False)
    router_jitter: float | None = _help("multiplicative router-input noise epsilon, training only")
    router_type: str | None = _help("softmax | random")
    moe_every: int | None = _help("every N-th FFN is MoE")
    skip_first_moe: int | None = _help("the first N FFNs stay dense")
    num_shared_experts: int | None = _help("always-on shared experts")
    aux_loss_coef: float | None = _help("Switch/GShard load-balancing loss coefficient")
    z_loss_coef: float | None = _help("ST-MoE router z-loss coefficient")
    bias_update_rate: float | None = _help("DeepSeek-V3 aux-loss-free bias step (0 = off)")
    vocab_size: int | None = _help("model vocabulary (default: the tokenizer's size, rounded up to 64)")
    init_from: str | None = _help("start from the weights of an hf/ export (or a run folder)")
    grad_ckpt: bool = _help("activation checkpointing of every block", False)

    def model_overrides(self) -> dict:
        names = {"num_experts": "num_local_experts", "top_k": "num_experts_per_tok",
                 "capacity_factor": "capacity_factor", "router_jitter": "router_jitter_noise",
                 "router_type": "router_type", "moe_every": "moe_every", "skip_first_moe": "skip_first_moe",
                 "num_shared_experts": "num_shared_experts", "aux_loss_coef": "router_aux_loss_coef",
                 "z_loss_coef": "router_z_loss_coef", "bias_update_rate": "router_bias_update_rate",
                 "vocab_size": "vocab_size"}
        overrides = {hf: getattr(self, cli) for cli, hf in names.items() if getattr(self, cli) is not None}
        if self.dropless:
            if self.capacity_factor is not None:
                raise ConfigError("--dropless and --capacity_factor contradict each other; pass one")
            overrides["capacity_factor"] = None
        return overrides


@dataclass
class DataArgs:
    dataset: str | None = _help("hub dataset with train/validation splits, e.g. roneneldan/TinyStories "
                                "(default, with no data flag: the TinyStories sample bundled in data/)")
    train_file: str | None = _help("local training text (.txt stories split by <|endoftext|> lines, or .jsonl; "
                                   ".gz is read directly)")
    valid_file: str | None = _help("local validation text, same format")
    tokenizer: str | None = _help("tokenizer name or path, or train:N for a byte-level BPE of N tokens "
                                  "(default: the --init_from model's own, else gpt2)")
    seq_len: int | None = _help("tokens per training sequence (default: the model's context length)")
    max_valid_blocks: int | None = _help("evaluate on the first N validation blocks only")
    cache_dir: str | None = _help("where tokenized data is cached (default: <output_dir>/cache)")


@dataclass
class TrainArgs:
    output_dir: str = _help("run folder; re-running the same command resumes from it")
    deepspeed: str | None = _help("DeepSpeed JSON (its moe.ep_size sets expert parallelism); "
                                  "without it the run uses accelerate on one device")
    local_rank: int = _help("set by the deepspeed launcher", -1)
    max_steps: int = _help("optimizer steps", 1000)
    eval_every: int = _help("evaluate every N steps", 100)
    save_every: int = _help("checkpoint every N steps (and at the end)", 500)
    log_every: int = _help("progress line every N steps", 10)
    early_stopping_patience: int = _help("stop after N evals without a new best (0 = off)", 0)
    keep_last: int = _help("committed checkpoints to keep, besides the best", 2)
    seed: int = _help("model init and data order", 0)
    lr: float = _help("peak learning rate", 1e-3)
    min_lr_ratio: float = _help("final lr as a fraction of the peak", 0.1)
    warmup_steps: int = _help("linear warmup steps", 100)
    weight_decay: float = _help("AdamW decay on matrices (none on norms, biases, router)", 0.1)
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    micro_batch_size: int | None = _help("sequences per device per micro-step (accelerate path; "
                                         "with --deepspeed it comes from the JSON)")
    grad_accum: int | None = _help("micro-steps per optimizer step (accelerate path)")
    grad_clip: float | None = _help("max gradient norm, 0 = off (accelerate path)")
    precision: str = _help("auto | bf16 | fp32 (accelerate path; auto = bf16 on GPU, fp32 on CPU)", "auto")
    dist_timeout: int = _help("seconds without progress before a stuck rank ends the job", 1800)
    max_bad_steps: int = _help("stop after N consecutive steps skipped for a non-finite loss or gradient", 10)
    allow_engine_change: bool = _help("resume a run saved by the other engine (DeepSpeed <-> accelerate)", False)
    allow_optimizer_reset: bool = _help("when resharding cannot carry the optimizer state, continue with a "
                                        "fresh one instead of stopping", False)

    def __post_init__(self):
        if not self.output_dir:
            raise ConfigError("--output_dir is required")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ConfigError(f"--output_dir {self.output_dir} is an existing file; pass a folder (new, or a run to resume)")
        self._check_optimizer()
        for name in ("max_steps", "eval_every", "save_every", "log_every", "keep_last", "dist_timeout",
                     "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}={getattr(self, name)} is invalid: must be >= 1")
        if self.warmup_steps < 0 or self.early_stopping_patience < 0:
            raise ConfigError("--warmup_steps and --early_stopping_patience must be >= 0")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"--precision={self.precision!r} is invalid: auto, bf16 or fp32")
        if self.deepspeed:
            given = [n for n in ("micro_batch_size", "grad_accum", "grad_clip") if getattr(self, n) is not None]
            if given or self.precision != "auto":
                raise ConfigError(f"--{(given or ['precision'])[0]} conflicts with --deepspeed: set batch, "
                                  f"accumulation, clipping and precision in the DeepSpeed JSON")


    # (flag, lowest, highest, whether each end is allowed): AdamW and the schedule are undefined outside these.
    # lr 0 is allowed: it freezes the weights (evaluation-only runs, early-stopping checks).
    _OPTIMIZER_RANGES = (("lr", 0.0, math.inf, (True, False)), ("weight_decay", 0.0, math.inf, (True, False)),
                         ("beta1", 0.0, 1.0, (True, False)), ("beta2", 0.0, 1.0, (True, False)),
                         ("adam_eps", 0.0, math.inf, (False, False)), ("min_lr_ratio", 0.0, 1.0, (True, True)))

    def _check_optimizer(self) -> None:
        for name, low, high, (low_ok, high_ok) in self._OPTIMIZER_RANGES:
            value = getattr(self, name)
            above = value >= low if low_ok else value > low
            below = value <= high if high_ok else value < high
            if not (above and below):  # also catches NaN
                valid = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
                raise ConfigError(f"--{name}={value:g} is invalid: must be in {valid}")


def parse_args(argv: list[str] | None = None) -> tuple[ModelArgs, DataArgs, TrainArgs]:
    parser = HfArgumentParser((ModelArgs, DataArgs, TrainArgs))
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
