"""Read and check a DeepSpeed JSON before anything is launched.

A `ds_configs/*.json` file is one scale: ZeRO stage, precision, micro-batch, accumulation,
clipping, and our `"moe": {"ep_size": P, "etp_size": T}` section (DeepSpeed ignores unknown
top-level keys; `etp_size`, expert tensor parallelism, defaults to 1). Every mistake we can
see in the file becomes one line naming the key and what is valid, instead of a traceback
from inside `deepspeed.initialize`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A bad command line or config file; the message is one line."""


# Keys DeepSpeed reads that we recognise; anything else at top level is probably a typo.
_KNOWN_TOP_LEVEL = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero_optimization",
    "bf16",
    "fp16",
    "moe",
    "steps_per_print",
    "wall_clock_breakdown",
    "communication_data_type",
    "prescale_gradients",
    "zero_allow_untested_optimizer",
    "activation_checkpointing",
    "flops_profiler",
    "comms_logger",
    "checkpoint",
    "data_types",
    "dump_state",
}
_KNOWN_ZERO = {
    "stage",
    "allgather_partitions",
    "allgather_bucket_size",
    "overlap_comm",
    "reduce_scatter",
    "reduce_bucket_size",
    "contiguous_gradients",
    "round_robin_gradients",
    "offload_optimizer",
    "offload_param",
    "sub_group_size",
    "elastic_checkpoint",
    "load_from_fp32_weights",
}


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What the trainer needs from the JSON; `raw` goes to `deepspeed.initialize` unchanged."""

    path: str
    raw: dict
    ep_size: int
    zero_stage: int
    precision: str  # "bf16" | "fp16" | "fp32"
    micro_batch_size: int
    grad_accum: int
    grad_clip: float
    etp_size: int = 1  # ranks that each expert is sliced over (expert tensor parallelism)


def load_deepspeed_config(path: str, *, world_size: int) -> DeepSpeedSettings:
    raw = _read_json(path)
    where = f"{path}:"
    for owned in ("optimizer", "scheduler"):
        if owned in raw:
            raise ConfigError(
                f"{where} remove the '{owned}' block: moe-dist builds AdamW and the warmup+cosine "
                f"schedule itself (flags --lr, --warmup_steps, --weight_decay)"
            )
    unknown = sorted(set(raw) - _KNOWN_TOP_LEVEL)
    if unknown:
        raise ConfigError(f"{where} unknown top-level key(s) {unknown}; known keys: {sorted(_KNOWN_TOP_LEVEL)}")

    moe = raw.get("moe")
    if not isinstance(moe, dict) or "ep_size" not in moe:
        raise ConfigError(f'{where} missing "moe": {{"ep_size": N}} (N = ranks that share one copy of the experts)')
    ep_size = _positive_int(where, "moe.ep_size", moe["ep_size"])
    etp_size = _positive_int(where, "moe.etp_size", moe.get("etp_size", 1))

    zero = _block(where, raw, "zero_optimization")
    bad_zero = sorted(set(zero) - _KNOWN_ZERO)
    if bad_zero:
        raise ConfigError(f"{where} unknown zero_optimization key(s) {bad_zero}; known keys: {sorted(_KNOWN_ZERO)}")
    stage = zero.get("stage", 0)
    if stage == 3:
        raise ConfigError(
            f"{where} zero_optimization.stage=3 is not supported: DeepSpeed refuses ZeRO-3 with "
            f"native MoE layers; use stage 0, 1 or 2 (experts are already sharded by ep_size)"
        )
    if stage not in (0, 1, 2):
        raise ConfigError(f"{where} zero_optimization.stage={stage!r} is invalid: valid stages are 0, 1, 2")
    for offload in ("offload_optimizer", "offload_param"):
        if _offload_enabled(zero.get(offload)):
            raise ConfigError(
                f"{where} zero_optimization.{offload} is not supported: offload keeps gradients on "
                f"the CPU, and the step's agreement all-reduce would then send a CPU tensor over "
                f'NCCL; remove it (or set "device": "none")'
            )

    bf16, fp16 = (bool(_block(where, raw, name).get("enabled", False)) for name in ("bf16", "fp16"))
    if bf16 and fp16:
        raise ConfigError(f"{where} bf16.enabled and fp16.enabled are both true; enable at most one")
    micro = _positive_int(where, "train_micro_batch_size_per_gpu", raw.get("train_micro_batch_size_per_gpu"))
    accum = _positive_int(where, "gradient_accumulation_steps", raw.get("gradient_accumulation_steps", 1))
    if "train_batch_size" in raw and raw["train_batch_size"] != micro * accum * world_size:
        raise ConfigError(
            f"{where} train_batch_size={raw['train_batch_size']} != micro batch {micro} x "
            f"accumulation {accum} x world size {world_size}; drop train_batch_size or fix it"
        )
    clip = raw.get("gradient_clipping", 0.0)
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not 0 <= clip < math.inf:  # NaN too
        raise ConfigError(f"{where} gradient_clipping={clip!r} is invalid: a finite number >= 0 (0 = off)")
    precision = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    return DeepSpeedSettings(path, raw, ep_size, stage, precision, micro, accum, float(clip), etp_size=etp_size)


def _block(where: str, raw: dict, name: str) -> dict:
    block = raw.get(name, {})
    if not isinstance(block, dict):
        raise ConfigError(f"{where} {name} must be an object, got {type(block).__name__}")
    return block


def _offload_enabled(block) -> bool:
    """DeepSpeed treats a missing block and `"device": "none"` as no offload."""
    if block is None:
        return False
    return not (isinstance(block, dict) and str(block.get("device", "none")).lower() == "none")


def _read_json(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise ConfigError(f"--deepspeed {path}: {what}; pass a JSON file such as ds_configs/cpu_ep2.json")
    try:
        raw = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--deepspeed {path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--deepspeed {path}: the top level must be a JSON object")
    return raw


def _positive_int(where: str, key: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where} {key}={value!r} is invalid: must be an integer >= 1")
    return value


def launcher_world_size() -> int:
    """World size as the launcher (deepspeed, torchrun, accelerate) announces it, before any group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))
