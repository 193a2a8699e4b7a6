"""Every setting a run uses, its value and where it came from: the table rank 0 prints at start and run.json keeps.

A setting has one source. The sources, and which wins where two could speak (docs/training.md, "Resolved
settings"): a flag the user typed; the DeepSpeed JSON (batch, accumulation, clipping, precision, ZeRO, EP/ETP);
the --init_from folder's config.json; the preset; the environment the launcher sets; else the default. Under
--deepspeed a batch, clipping or precision flag may only repeat the JSON: one that differs is refused here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from ..model.configuration import PRESETS, MoEConfig
from ..parallel.ds_config import ConfigError, DeepSpeedSettings
from .args import EngineArgs, ModelArgs, OptimArgs, RunArgs, given_fields
from .data import DataConfig

FLAG, JSON, INIT, PRESET, DEFAULT, ENV, TOKENIZER = (
    "flag",
    "deepspeed json",
    "init_from config",
    "preset",
    "default",
    "env",
    "tokenizer",
)
# The model fields a tokenizer fills in once the data is ready: not settings anyone gives.
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Environment variables that steer a run, shown when set.
_ENV = ("MOE_DIST_FAULT", "ACCELERATE_MIXED_PRECISION")
_WIDEST = 24  # the table's widest column, in characters
_UPCYCLE_FLAGS = ("upcycle_experts", "upcycle_noise", "upcycle_reinit", "upcycle_granularity")


@dataclass(frozen=True)
class Setting:
    group: str
    name: str
    value: object
    source: str


# ---- conflicts: a flag against the DeepSpeed JSON -------------------------------------------------------


# The engine flags the DeepSpeed JSON also sets, and its keys for each.
_JSON_KEYS = {
    "micro_batch_size": ("train_micro_batch_size_per_gpu",),
    "grad_accum": ("gradient_accumulation_steps",),
    "grad_clip": ("gradient_clipping",),
    "precision": ("bf16", "fp16"),
}


def _json_source(raw: dict, name: str) -> str:
    """Where the engine's value of flag `name` came from under --deepspeed: the file, or DeepSpeed's default."""
    return JSON if any(k in raw for k in _JSON_KEYS[name]) else DEFAULT


def check_engine_flags(engine: EngineArgs, ds: DeepSpeedSettings) -> None:
    """Under --deepspeed the JSON sets batch, accumulation, clipping and precision; a flag may repeat it, not
    contradict it (the JSON goes to DeepSpeed unchanged, so a differing flag would be silently ignored)."""
    given = given_fields(engine)
    for name, keys in _JSON_KEYS.items():
        flag, value = getattr(engine, name), getattr(ds, name)
        if name not in given or flag is None or flag == value or (name == "precision" and flag == "auto"):
            continue
        key = "precision (bf16/fp16.enabled)" if name == "precision" else keys[0]
        where = f"in {ds.path}" if _json_source(ds.raw, name) == JSON else f"(DeepSpeed's default; not in {ds.path})"
        raise ConfigError(
            f"{name}: --{name} {flag} (flag) contradicts {key} {value} {where}; give one (with --deepspeed, "
            f"set batch, accumulation, clipping and precision in the DeepSpeed JSON)"
        )


# ---- the table -------------------------------------------------------------------------------------------


def resolve(plan, model: ModelArgs, data: DataConfig, engine: EngineArgs, optim: OptimArgs) -> tuple[Setting, ...]:
    """The settings of `plan` (a `RunPlan`), each with its source; `model`, `data`, `engine` and `optim` are the
    command line's dataclasses as parsed (they know which fields were typed)."""
    return (
        *_model_settings(plan, model),
        *_data_settings(plan, data),
        *_flag_settings("run", plan.run, RunArgs),
        *_engine_settings(plan, engine),
        *_flag_settings("optim", optim, OptimArgs),
        *_env_settings(plan),
    )


def _model_settings(plan, model: ModelArgs) -> list[Setting]:
    typed, config = given_fields(model), plan.model_config
    if plan.init is not None:
        base, base_source = plan.init.fields, INIT
        rows = [Setting("model", "init_from", str(plan.init.folder), FLAG)]
    else:
        base, base_source = PRESETS[model.preset], PRESET
        rows = [Setting("model", "preset", model.preset, FLAG if "model" in typed else DEFAULT)]
    upcycled = {"num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "expert_bias"}
    for name in MoEConfig.__annotations__:  # its own fields, not PretrainedConfig's
        if name in _TOKEN_IDS:
            continue
        if name in typed or (name == "capacity_factor" and "dropless" in typed):
            source = FLAG
        elif name == "vocab_size" and plan.vocab_from_tokenizer:
            source = TOKENIZER
        elif plan.upcycling is not None and name in upcycled:
            source = FLAG  # --upcycle_experts (and its granularity) made the experts
        else:
            source = base_source if name in base else DEFAULT
        rows.append(Setting("model", name, getattr(config, name), source))
    flags = (
        "grad_ckpt",
        "freeze_router",
        "freeze_router_bias",
        *(_UPCYCLE_FLAGS if plan.upcycling is not None else ()),
    )
    rows += [Setting("model", n, getattr(model, n), FLAG if n in typed else DEFAULT) for n in flags]
    lora = plan.lora.record() if plan.lora is not None else {}
    return rows + [
        Setting("model", f"lora_{k}", ",".join(v) if k == "targets" else v, FLAG if f"lora_{k}" in typed else DEFAULT)
        for k, v in lora.items()
    ]


def _data_settings(plan, data: DataConfig) -> list[Setting]:
    typed, settled = given_fields(data), plan.data
    rows = _flag_settings("data", settled, DataConfig, typed)
    if "tokenizer" not in typed and plan.init is not None and settled.tokenizer == str(plan.init.folder):
        rows = [Setting(r.group, r.name, r.value, INIT) if r.name == "tokenizer" else r for r in rows]
    return rows


def _flag_settings(group: str, values, cls, typed: frozenset[str] | None = None) -> list[Setting]:
    typed = given_fields(values) if typed is None else typed
    names = [f.name for f in fields(cls) if f.name != "local_rank"]
    return [Setting(group, n, getattr(values, n), FLAG if n in typed else DEFAULT) for n in names]


def _engine_settings(plan, engine: EngineArgs) -> list[Setting]:
    spec, typed, ds = plan.spec, given_fields(engine), plan.spec.ds_config
    rows = [
        Setting("engine", "engine", plan.engine, FLAG if engine.deepspeed else DEFAULT),
        Setting("engine", "world_size", plan.world_size, ENV if "WORLD_SIZE" in os.environ else DEFAULT),
    ]
    if ds is not None:
        zero = ds.get("zero_optimization", {})
        rows += [
            Setting("engine", "deepspeed", engine.deepspeed, FLAG),
            Setting("engine", "ep_size", spec.ep_size, JSON),
            Setting("engine", "etp_size", spec.etp_size, JSON if "etp_size" in ds["moe"] else DEFAULT),
            Setting("engine", "zero_stage", zero.get("stage", 0), JSON if "stage" in zero else DEFAULT),
        ]
    for name in _JSON_KEYS:
        if ds is None:
            source = FLAG if name in typed else DEFAULT
        else:  # a typed flag here repeats the JSON's value: check_engine_flags refused any other
            source = f"{FLAG} = {JSON}" if name in typed else _json_source(ds, name)
        rows.append(Setting("engine", name, getattr(spec, name), source))
    rows += [
        Setting("engine", n, getattr(engine, n), FLAG if n in typed else DEFAULT)
        for n in ("dist_timeout", "gpu_mem_gib")
    ]
    return rows


def _env_settings(plan) -> list[Setting]:
    rows = [Setting("env", name, os.environ[name], ENV) for name in _ENV if name in os.environ]
    if plan.engine == "deepspeed":  # accelerate's precision variable means nothing to the DeepSpeed engine
        rows = [r for r in rows if r.name != "ACCELERATE_MIXED_PRECISION"]
    return rows


# ---- how it is shown -------------------------------------------------------------------------------------


def table(settings: tuple[Setting, ...]) -> str:
    """One aligned line per setting, grouped, for the log."""
    shown = [(s.group, s.name, _shown(s.value), s.source) for s in settings]
    # A long value (a path, a dict) runs past its column rather than widening every line.
    widths = [min(max(len(row[i]) for row in shown), _WIDEST) for i in range(3)]
    lines = [f"  {g:<{widths[0]}}  {n:<{widths[1]}}  {v:<{widths[2]}}  {src}" for g, n, v, src in shown]
    return "\n".join(["settings (group, name, value, source):", *lines])


def _shown(value) -> str:
    return "-" if value is None else str(value)


def settings_record(settings: tuple[Setting, ...], config: MoEConfig) -> dict:
    """run.json's `settings`: {name: {"value": ..., "source": ...}}, the vocabulary as `config` (the model built)
    has it: a trained tokenizer's size is known only once it is trained."""
    rows = {s.name: {"value": s.value, "source": s.source} for s in settings}
    if "vocab_size" in rows:
        rows["vocab_size"]["value"] = config.vocab_size
    return rows
