"""Turn the command line into a checked run plan, before any process group or model exists.

Everything a user can get wrong and we can see without a GPU is caught here, as one line
naming the flag or file: a value out of its range, a bad DeepSpeed JSON, an EP size that does
not divide the experts or the world, an --init_from folder whose files cannot be read, a model
that cannot fit in memory, data that cannot be read to its end, a tokenizer that does not fit
the model, or an output folder that holds a different run. Nothing is written here. The one
decision that needs the tokenizer itself, the model's vocabulary, is `finalize`'s, once the
data is ready and before the trainer starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..convert.stock_import import (
    NATIVE,
    VOLATILE_FIELDS,
    InitFrom,
    check_import,
    config_from_fields,
    init_config,
    read_init_config,
)
from ..convert.upcycle import Upcycling, moe_fields
from ..model.configuration import MAX_EXPERTS, MoEConfig
from ..model.lora import TARGETS, LoRAConfig
from ..output_guard import check as check_outputs
from ..parallel.ds_config import ConfigError, DeepSpeedSettings, launcher_world_size, load_deepspeed_config
from ..parallel.engines import EngineSpec
from ..parallel.expert_parallel import validate_expert_parallel
from ..parallel.expert_tensor_parallel import validate_expert_tensor_parallel
from .args import EngineArgs, ModelArgs, OptimArgs, RunArgs
from .conversations import chat_template
from .data import TOKENIZER_FILES, DataConfig, check_data_file, load_tokenizer, trained_vocab_size
from .data_prep import default_num_proc
from .memory_fit import check_fits
from .ranges import Range
from .settings import Setting, check_engine_flags, resolve, settings_record

RUN_RECORD = "run.json"
# Every top-level name a run writes into --output_dir; a run may add them beside other files, never over them.
RUN_OUTPUTS = (
    RUN_RECORD,
    "summary.json",
    "metrics.jsonl",
    "tb",
    "heatmaps",
    "checkpoints",
    "hf",
    "tokenizer",
    "cache",
    "heartbeats",
    ".ranks",
)
TRAIN = "train"  # the output kind of a run folder (output_guard)
# Shape fields that --init_from cannot change: the loaded weights would not fit.
_SHAPE_FIELDS = (
    "num_local_experts",
    "moe_intermediate_size",
    "moe_every",
    "skip_first_moe",
    "num_shared_experts",
    "vocab_size",
)
# Filled in from the tokenizer once the data is ready, so not comparable before that.
_FROM_TOKENIZER = {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"}


@dataclass
class RunPlan:
    engine: str  # "deepspeed" | "accelerate"
    world_size: int
    preset: str
    model_config: MoEConfig  # as planned; `finalize` returns the one the model is built with
    vocab_from_tokenizer: bool  # model vocab = tokenizer size (rounded up), known once data is ready
    init: InitFrom | None  # --init_from: the folder, what it holds (our export or a stock class) and its fields
    upcycling: Upcycling | None  # --upcycle_experts: the dense --init_from becomes an MoE
    grad_ckpt: bool
    data: DataConfig  # tokenizer and seq_len settled
    spec: EngineSpec
    run: RunArgs  # the loop's schedule and the run folder
    settings: tuple[Setting, ...] = ()  # every setting with its source (`settings.resolve`)
    freeze_router: bool = False  # routers' weights stay as they start
    freeze_router_bias: bool = False  # the aux-loss-free selection bias stays as it starts
    lora: LoRAConfig | None = None  # LoRA adapters on a frozen base; None: full fine-tuning

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def init_from(self) -> Path | None:
        return self.init.folder if self.init else None


def plan_run(
    model: ModelArgs, data: DataConfig, run: RunArgs, engine: EngineArgs | None = None, optim: OptimArgs | None = None
) -> RunPlan:
    """The checked plan of a run, from the command line's dataclasses (see `args.parse_args`)."""
    engine, optim = engine or EngineArgs(), optim or OptimArgs()
    world = launcher_world_size()
    ds = load_deepspeed_config(engine.deepspeed, world_size=world) if engine.deepspeed else None
    if ds is not None:
        check_engine_flags(engine, ds)
    overrides = model.model_overrides()
    if ds is None and "capacity_factor" not in overrides:
        overrides["capacity_factor"] = None  # one device needs no capacity: route dropless
    init = read_init_config(_resolve_init_from(model.init_from)) if model.init_from else None
    _keep_recorded_router_loss(run.run_dir, overrides)
    upcycling = _upcycling(model, init, overrides, seed=run.seed)
    config = _model_config(model.preset, init, overrides, upcycling)

    ep_size = ds.ep_size if ds else 1
    _validate_layout(config, ep_size, ds.etp_size if ds else 1, world)
    data_given, given_tokenizer = data, data.tokenizer
    data = _settle_data(data, config, init.folder if init else None)
    vocab_fixed = "vocab_size" in overrides or init is not None
    vocab = _planned_vocab(
        data.tokenizer, config, vocab_fixed, given=given_tokenizer is not None, weights=init.folder if init else None
    )
    # Settled once, with the vocabulary as planned: the memory estimate, the settings table and the resume check
    # all read this config; `finalize` only fills in what the prepared tokenizer knows.
    config = config_from_fields({**config.to_dict(), "vocab_size": vocab})

    # A started-from model is named by its folder and format; --model names the preset otherwise.
    source = None if init is None else (init.folder.parent if init.folder.name == "hf" else init.folder)  # a run's hf/
    preset = model.preset if init is None else f"{source.name} ({init.fmt}{', upcycled' if upcycling else ''})"
    plan = RunPlan(
        engine="deepspeed" if ds else "accelerate",
        world_size=world,
        preset=preset,
        model_config=config,
        vocab_from_tokenizer=not vocab_fixed,
        init=init,
        upcycling=upcycling,
        grad_ckpt=model.grad_ckpt,
        freeze_router=model.freeze_router,
        freeze_router_bias=model.freeze_router_bias,
        lora=_lora(model, config),
        data=data,
        spec=_engine_spec(engine, optim, ds, ep_size, run.max_steps),
        run=run,
    )
    plan.settings = resolve(plan, model, data_given, engine, optim)
    _check_memory(plan, ds.zero_stage if ds else 0, engine.gpu_mem_gib)
    check_run_folder(plan)
    check_run_outputs(plan.run_dir)
    # The slow checks last: every data file read to its end, then a stock import's logits.
    _check_data_files(data)
    _check_stock_import(plan)
    return plan


def _lora(model: ModelArgs, config: MoEConfig) -> LoRAConfig | None:
    """The LoRA adapters asked for, on the targets this model has: all of them unless --lora_targets names some,
    and a named target the model has nothing for (`mlp` where every FFN is routed) is refused rather than left
    to train nothing."""
    lora = model.lora()
    if lora is None:
        return None
    found = lora_targets_of(config)
    if model.lora_targets is None:
        return dataclasses.replace(lora, targets=found)
    for target in lora.targets:
        if target not in found:
            raise ConfigError(
                f"--lora_targets={','.join(lora.targets)!r} is invalid for this model: it has nothing for {target}; "
                f"valid targets here are {', '.join(found)}"
            )
    return lora


def lora_targets_of(config: MoEConfig) -> tuple[str, ...]:
    """The LoRA targets (`model.lora.TARGETS`) that name some projection of a model of `config`, from the config
    alone: building even a meta model of a released MoE takes seconds, on every rank."""
    moe_layers = set(config.moe_layer_indices)
    has = {
        "attention": True,
        "experts": bool(moe_layers),
        "shared_experts": bool(moe_layers) and config.num_shared_experts > 0,
        "mlp": len(moe_layers) < config.num_hidden_layers,
    }
    return tuple(t for t in TARGETS if has[t])


def _check_memory(plan: RunPlan, zero_stage: int, gpu_mem_gib: float | None) -> None:
    spec = plan.spec
    check_fits(
        plan.model_config,
        zero_stage=zero_stage,
        ds_config=spec.ds_config,
        ep_size=spec.ep_size,
        etp_size=spec.etp_size,
        world_size=plan.world_size,
        precision=spec.precision,
        micro_batch=spec.micro_batch_size,
        seq_len=plan.data.seq_len,
        grad_ckpt=plan.grad_ckpt,
        gpu_mem_gib=gpu_mem_gib,
    )


def _check_data_files(data: DataConfig) -> None:
    for flag, path in (("--train_file", data.train_file), ("--valid_file", data.valid_file)):
        if path is not None:
            check_data_file(flag, path)
    if data.conversations:  # a template to render them with: --chat_template's, else the tokenizer's own
        chat_template(load_tokenizer(data.tokenizer), data.chat_template)


def _planned_vocab(tokenizer: str, config: MoEConfig, fixed: bool, *, given: bool, weights: Path | None) -> int:
    """The model's vocabulary as `finalize` will settle it; refuses a tokenizer larger than a fixed one (by
    --vocab_size, or by the --init_from folder `weights`).

    A named tokenizer is loaded here, so one that cannot be read is refused before anything is written.
    """
    trained = trained_vocab_size(tokenizer)
    tokens = trained or len(load_tokenizer(tokenizer))
    if fixed and tokens > config.vocab_size:
        who = f"--tokenizer {tokenizer}" if given else f"the tokenizer of --init_from ({tokenizer})"
        where, fix = (
            (
                f" (config.json of --init_from {weights})",
                f"pass a --tokenizer of at most {config.vocab_size} tokens (the weights fix the vocabulary)",
            )
            if weights
            else ("", "use a smaller tokenizer or a larger --vocab_size")
        )
        raise ConfigError(
            f"{who} {'makes' if trained else 'has'} {tokens} tokens but the model's vocab_size is "
            f"{config.vocab_size}{where}; token ids would index past the embedding: {fix}"
        )
    return config.vocab_size if fixed else padded_vocab(tokens)


def padded_vocab(tokens: int) -> int:
    """A tokenizer's size rounded up to 64, the model's vocabulary when nothing fixes it (tensor-core friendly)."""
    return -(-tokens // 64) * 64


def _check_stock_import(plan: RunPlan) -> None:
    """A stock class's weights are converted exactly or refused: its logits against ours on a fixed batch.

    Once, on rank 0, when the run starts (not on a resume: the checkpoint holds the weights then), with the
    stock model's own config, before the command line's routing changes. It holds both models in fp32 in
    one process; the training ranks then read only their own experts.
    """
    init = plan.init
    if init is None or init.fmt == NATIVE or os.environ.get("RANK", "0") != "0":
        return
    if (plan.run_dir / "checkpoints" / "latest").is_file():
        return
    diff = check_import(init, init_config(init))
    print(
        f"--init_from {init.folder}: {init.fmt} converted exactly (max |logit difference| {diff:.2e} in fp32)",
        flush=True,
    )


def check_run_outputs(run_dir: Path) -> None:
    """Refuse a --output_dir where a name the run writes is taken by a file moe-dist did not write."""
    check_outputs(run_dir, TRAIN, RUN_OUTPUTS, legacy=lambda d: (d / RUN_RECORD).is_file(), what="--output_dir")


def _validate_layout(config: MoEConfig, ep_size: int, etp_size: int, world: int) -> None:
    if etp_size == 1:
        validate_expert_parallel(num_experts=config.num_local_experts, ep_size=ep_size, world_size=world)
        return
    if not config.is_moe:
        raise ConfigError(
            f"moe.etp_size={etp_size} slices experts, but this model has none (num_local_experts=0): "
            f"valid etp_size for a dense model is 1"
        )
    validate_expert_tensor_parallel(
        num_experts=config.num_local_experts,
        ep_size=ep_size,
        etp_size=etp_size,
        intermediate_size=config.moe_intermediate_size,
        world_size=world,
    )


def finalize(plan: RunPlan, tokenizer) -> MoEConfig:
    """The config the model is built with: the planned one, with the tokenizer's vocabulary and special tokens.

    The vocabulary is the tokenizer's size rounded up to 64 (tensor-core friendly) unless
    --vocab_size or --init_from fixed it; then it is checked. `plan` is left as it was.
    """
    config, n = plan.model_config, len(tokenizer)
    vocab = padded_vocab(n) if plan.vocab_from_tokenizer else config.vocab_size
    if n > vocab:
        raise ConfigError(
            f"the tokenizer has {n} tokens but the model's vocab_size is {vocab}; "
            f"token ids would index past the embedding"
        )
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    # With the folder's own tokenizer, its config.json says what the model stops on (a list, for an instruct model).
    if plan.init is not None and plan.data.tokenizer == str(plan.init.folder):
        ids.update({k: v for k in ids if (v := plan.init.fields.get(k)) is not None})
    return MoEConfig.from_dict({**config.to_dict(), "vocab_size": vocab, **ids})


def _keep_recorded_router_loss(run_dir: Path, overrides: dict) -> None:
    """A run recorded before `router_aux_loss` existed trained with the per-layer loss (an --init_from MoE
    included): it resumes with it, unless the command line names one (which the resume check then compares)."""
    path = run_dir / RUN_RECORD
    if "router_aux_loss" in overrides or not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())["model_config"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # check_run_folder names what is wrong with it
    if isinstance(recorded, dict) and "router_aux_loss" not in recorded:
        overrides["router_aux_loss"] = "per_layer"


def _model_config(preset: str, init: InitFrom | None, overrides: dict, upcycling: Upcycling | None) -> MoEConfig:
    if init is None:
        return MoEConfig.from_preset(preset, **overrides)
    # Upcycling makes the experts: where they go and how many are shared is the command line's to say.
    placement = {"moe_every", "skip_first_moe", "num_shared_experts"} if upcycling else set()
    changed = sorted(k for k in overrides if k in _SHAPE_FIELDS and k not in placement)
    if changed:
        raise ConfigError(
            f"--init_from {init.folder}: cannot change the model's shape ({changed}); "
            f"routing settings such as --capacity_factor may change"
        )
    if not upcycling:
        return config_from_fields({**init.fields, **overrides})
    # --top_k counts copies: a fine-grained layer routes to all the slices of each (moe_fields scales it).
    base = moe_fields(init.fields, upcycling, _copies_per_token(init, overrides))
    return config_from_fields({**base, **{k: v for k, v in overrides.items() if k != "num_experts_per_tok"}})


def _upcycling(model: ModelArgs, init: InitFrom | None, overrides: dict, *, seed: int) -> Upcycling | None:
    """--upcycle_experts and its flags, checked against the --init_from model; None when not asked."""
    if model.upcycle_experts is None:
        if model.upcycle_noise or model.upcycle_reinit or model.upcycle_granularity != 1:
            raise ConfigError("--upcycle_noise, --upcycle_reinit and --upcycle_granularity need --upcycle_experts")
        return None
    E = model.upcycle_experts
    if init is None:
        raise ConfigError("--upcycle_experts needs --init_from DENSE: the dense model whose FFNs become the experts")
    if init.fields.get("num_local_experts", 0):
        raise ConfigError(
            f"--init_from {init.folder} already has experts (num_local_experts="
            f"{init.fields['num_local_experts']}): --upcycle_experts copies a dense model's FFNs"
        )
    Range(2, MAX_EXPERTS, why="expert ids are int32 in the expert-parallel dispatch").check("upcycle_experts", E)
    if "num_local_experts" in overrides:
        raise ConfigError("--num_experts and --upcycle_experts both set the expert count: pass --upcycle_experts")
    top_k = _copies_per_token(init, overrides)
    if not 1 <= top_k <= E:
        raise ConfigError(f"--top_k={top_k} is invalid with --upcycle_experts {E}: must be in [1, {E}]")
    if not 0 <= model.upcycle_noise <= 1:  # also refuses NaN and inf
        raise ConfigError(
            f"--upcycle_noise={model.upcycle_noise} is invalid: must be in [0, 1] (the std is relative "
            f"to each weight: at 1 the noise is already as large as the dense weights it perturbs)"
        )
    if not 0 <= model.upcycle_reinit < 1:
        raise ConfigError(f"--upcycle_reinit={model.upcycle_reinit} is invalid: must be in [0, 1)")
    G, width = model.upcycle_granularity, init.fields["intermediate_size"]
    if G < 1 or width % G:
        raise ConfigError(
            f"--upcycle_granularity={G} is invalid: must be >= 1 and divide the dense FFN width "
            f"(intermediate_size={width}) into equal slices"
        )
    shared = overrides.get("num_shared_experts", 0)
    if shared % G:
        raise ConfigError(
            f"--num_shared_experts={shared} is invalid with --upcycle_granularity {G}: must be a "
            f"multiple of {G}, so that the shared experts hold whole copies of the dense FFN"
        )
    return Upcycling(experts=E, noise=model.upcycle_noise, reinit=model.upcycle_reinit, seed=seed, granularity=G)


def _copies_per_token(init: InitFrom, overrides: dict) -> int:
    # --top_k, else the dense config's own field (our dense presets keep one), else one.
    return overrides.get("num_experts_per_tok", init.fields.get("num_experts_per_tok", 1))


def _resolve_init_from(path: str) -> Path:
    p = Path(path)
    for candidate in (p, p / "hf"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConfigError(f"--init_from {path}: no config.json there or in {p / 'hf'}; pass an hf/ export or a run folder")


def _settle_data(data: DataConfig, config: MoEConfig, init_from: Path | None) -> DataConfig:
    """`data` with its tokenizer, sequence length and tokenizing processes decided."""
    seq_len = data.seq_len or config.max_position_embeddings
    if seq_len > config.max_position_embeddings:
        raise ConfigError(
            f"--seq_len={seq_len} exceeds the model's context "
            f"(max_position_embeddings={config.max_position_embeddings})"
        )
    # A model continues with the tokenizer it was trained with, unless told otherwise: the folder's, in any form
    # AutoTokenizer reads (one that cannot be loaded is refused by `load_tokenizer` with one line, not replaced).
    has_own = init_from is not None and any((init_from / f).is_file() for f in TOKENIZER_FILES)
    tokenizer = data.tokenizer or (str(init_from) if has_own else "gpt2")
    return dataclasses.replace(data, tokenizer=tokenizer, seq_len=seq_len, num_proc=_num_proc(data.num_proc))


def _num_proc(asked: int | None) -> int | None:
    """--num_proc, at most the CPUs this process may use: more processes than cores only take turns on them, and
    each one is forked (1000 of them took 23-45 s for a corpus that tokenizes in 0.1 s)."""
    cpus = default_num_proc()
    if asked is None or asked <= cpus:
        return asked
    if os.environ.get("RANK", "0") == "0":
        print(
            f"warning: --num_proc {asked} is more than the {cpus} CPUs this process may use; using {cpus}",
            file=sys.stderr,
            flush=True,
        )
    return cpus


def _engine_spec(
    engine: EngineArgs, optim: OptimArgs, ds: DeepSpeedSettings | None, ep_size: int, max_steps: int
) -> EngineSpec:
    if ds is not None:
        micro, accum, clip, precision = ds.micro_batch_size, ds.grad_accum, ds.grad_clip, ds.precision
    else:
        micro, accum = engine.micro_batch_size or 8, engine.grad_accum or 1
        clip = 1.0 if engine.grad_clip is None else engine.grad_clip
        precision = engine.precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() else "fp32"
    return EngineSpec(
        micro_batch_size=micro,
        grad_accum=accum,
        grad_clip=clip,
        precision=precision,
        ep_size=ep_size,
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        adam_eps=optim.adam_eps,
        weight_decay=optim.weight_decay,
        warmup_steps=optim.warmup_steps,
        max_steps=max_steps,
        min_lr_ratio=optim.min_lr_ratio,
        dist_timeout_s=engine.dist_timeout,
        ds_config=ds.raw if ds else None,
        etp_size=ds.etp_size if ds else 1,
    )


# ---- the run folder's identity -------------------------------------------------------------


def run_record(plan: RunPlan, config: MoEConfig) -> dict:
    # EP size and world size may change between launches (the checkpoint is resharded); the
    # engine may only with --allow_engine_change; the model never.
    record = {"engine": plan.engine, "preset": plan.preset, "model_config": _comparable(config)}
    record["settings"] = settings_record(plan.settings, config)  # shown, never compared on resume
    record["lora"] = plan.lora.record() if plan.lora else None  # compared on resume: the trained parameters
    if plan.init is not None:  # what the model started from: the exporter's `--format auto` tries its class first
        record["init_from"] = {"path": str(plan.init.folder.resolve()), "format": plan.init.fmt}
        if plan.upcycling is not None:
            record["init_from"]["format"] = None  # the dense class is not the upcycled model's
            record["upcycle"] = plan.upcycling.record()
    return record


def _comparable(config: MoEConfig) -> dict:
    # Through JSON, so a fresh config compares equal to one read back from run.json.
    return json.loads(
        json.dumps({k: v for k, v in config.to_dict().items() if k not in VOLATILE_FIELDS}, sort_keys=True)
    )


def check_run_folder(plan: RunPlan, config: MoEConfig | None = None) -> None:
    """Refuse to resume a folder that holds a different run, and say how to start fresh.

    Without `config` (before the tokenizer is known) the tokenizer-derived fields are not compared.
    """
    path = plan.run_dir / RUN_RECORD
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    fresh = f"use a new --output_dir, or delete {plan.run_dir} to start over"
    upcycled = Upcycling.from_record(saved["upcycle"]) if saved.get("upcycle") else None
    if upcycled != plan.upcycling:
        raise ConfigError(
            f"{plan.run_dir} holds a run upcycled with {upcycled and upcycled.record()}; this command "
            f"asks {plan.upcycling and plan.upcycling.record()}. Resume with the same --upcycle_* "
            f"flags, or {fresh}"
        )
    _check_same_lora(plan, saved.get("lora"), fresh)
    if saved["engine"] != plan.engine and not plan.run.allow_engine_change:
        how = "add --deepspeed" if saved["engine"] == "deepspeed" else "drop --deepspeed"
        raise ConfigError(
            f"{plan.run_dir} holds a {saved['engine']} run; this command uses {plan.engine}. "
            f"To resume it as it was, {how}; to continue it on {plan.engine} (weights, Adam "
            f"moments and data position carried over), add --allow_engine_change; or start a "
            f"new run with --init_from {plan.run_dir / 'hf'}"
        )
    # Through MoEConfig, so a record written before a field existed compares with that field's default.
    old, new = _comparable(config_from_fields(saved["model_config"])), _comparable(config or plan.model_config)
    if config is None:
        skip = _FROM_TOKENIZER if plan.vocab_from_tokenizer else _FROM_TOKENIZER - {"vocab_size"}
        old, new = ({k: v for k, v in d.items() if k not in skip} for d in (old, new))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
        raise ConfigError(f"{plan.run_dir} holds a run of a different model ({changes}); {fresh}")


def _check_same_lora(plan: RunPlan, saved: dict | None, fresh: str) -> None:
    """A run resumes training what it trained: its adapters (the same rank, alpha, dropout and targets), or every
    weight. A record without the key was written before LoRA existed: full fine-tuning."""
    asked = plan.lora.record() if plan.lora else None
    if saved == asked:
        return

    def described(record: dict | None) -> str:
        if record is None:
            return "without LoRA (full fine-tuning)"
        return f"with LoRA rank {record['rank']}, alpha {record['alpha']:g}, dropout {record['dropout']:g}, " + (
            f"targets {','.join(record['targets'])}"
        )

    how = "the same --lora_* flags" if saved else "no --lora_* flags"
    raise ConfigError(
        f"{plan.run_dir} holds a run trained {described(saved)}; this command asks {described(asked)}. "
        f"Resume with {how}, or {fresh} (--init_from {plan.run_dir / 'hf'} starts LoRA from its weights)"
    )
