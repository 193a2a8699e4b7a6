"""`--init_from` a folder of a stock transformers class: what it is, our config for it, and the exactness check.

`read_init_config(folder)` says what the folder holds: our own export (`model_type: moe_dist`) or one of the
stock classes of `standard.STANDARD_FORMATS`, and our `MoEConfig` fields for it. Anything else, or a field
our model cannot reproduce, is an `ExportError` whose message is one line naming the field and its value,
raised before any model is built. `check_import` then compares the stock class and the converted model on a
fixed batch in fp32, the exporter's check run the other way: above `TOLERANCE` the import is refused. Each model
runs its own forward with one decoder layer read at a time (`stock_stream`), so the check's memory is the
embeddings, the head and a layer, whatever the depth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from ..checkpoint.formats import ExportError
from ..model.configuration import MoEConfig
from ..model.modeling import MoEForCausalLM
from ..model.routing import Router
from .sources import NativeSource, SafetensorsFiles, StockSource, check_safetensors, has_safetensors
from .standard import CLASS_NAMES, STANDARD_FORMATS, TOLERANCE, Unrepresentable, stock_config, to_ours
from .stock_stream import NotStreamable, stock_logits, stream_logits
from .upcycle import UpcycleSource, Upcycling

NATIVE = "native"
# Fields that differ between saves without making them different models.
VOLATILE_FIELDS = {"transformers_version", "architectures", "auto_map", "_name_or_path", "dtype", "torch_dtype"}


@dataclass(frozen=True)
class InitFrom:
    folder: Path
    fmt: str  # "native" (our export) or a stock format
    fields: dict  # our MoEConfig fields for it


def read_init_config(folder: Path) -> InitFrom:
    """What `folder` holds and our config fields for it; `ExportError` (one line) when we cannot import it."""
    config_json = read_config_json(folder, f"--init_from {folder}: ")
    model_type = config_json.get("model_type")
    if model_type != MoEConfig.model_type and model_type not in STANDARD_FORMATS:
        raise ExportError(
            f"--init_from {folder}: model_type={model_type!r} is not supported; supported: "
            f"{MoEConfig.model_type} (our exports), {', '.join(STANDARD_FORMATS)}"
        )
    if not has_safetensors(folder):
        raise ExportError(
            f"--init_from {folder}: no model.safetensors or model.safetensors.index.json "
            f"(only safetensors checkpoints are read)"
        )
    try:
        if model_type == MoEConfig.model_type:
            init = InitFrom(folder, NATIVE, MoEConfig.from_dict(config_json).to_dict())
        else:
            fields = to_ours(stock_config(config_json))
            if fields.get("num_local_experts"):
                fields["router_aux_loss"] = _stock_router_loss(config_json)
            config_from_fields(fields)  # our model's own checks, while the folder can still be named
            init = InitFrom(folder, model_type, fields)
    except Unrepresentable as e:
        raise ExportError(
            f"--init_from {folder}: {CLASS_NAMES[model_type]} field {e} cannot be represented by moe-dist's model"
        ) from None
    # A field of the wrong type or out of range; ArithmeticError: transformers' own checks divide by fields
    # (hidden_size % num_attention_heads) before they check them.
    except (TypeError, ValueError, ArithmeticError, StrictDataclassError) as e:
        raise ExportError(f"--init_from {folder}: config.json: {' '.join(str(e).split())}") from None
    try:
        check_safetensors(folder)
        if init.fmt == NATIVE:
            _check_weights_fit(init)
    except ExportError as e:
        raise ExportError(f"--init_from {folder}: {e}") from None
    return init


def _stock_router_loss(config_json: dict) -> str:
    """The stock MoE classes add `router_aux_loss_coef * load_balancing_loss_func(...)` to the training loss
    only when `output_router_logits` is true (it is false in the released Mixtral and Qwen3-MoE configs)."""
    return "stock" if config_json.get("output_router_logits") is True else "none"


def _check_weights_fit(init: InitFrom) -> None:
    """Our export holds exactly the tensors its config.json gives the model, in their shapes, read from the headers:
    a config.json edited away from its weights is refused before the run writes anything. (A stock folder is held
    to its logits by `check_import`.)"""
    with torch.device("meta"):
        model = MoEForCausalLM(init_config(init))
    files = SafetensorsFiles(init.folder)
    for name, param in model.named_parameters():
        if name not in files or files.shape(name) != tuple(param.shape):
            held = f"shape {files.shape(name)}" if name in files else "no such tensor"
            raise ExportError(f"{name}: the weights hold {held}, but config.json makes {tuple(param.shape)}")
    extra = sorted(set(files.weight_map) - set(model.state_dict()))
    if extra:
        raise ExportError(
            f"the weights hold {len(extra)} tensor(s) that config.json's model has no place for (first: {extra[0]!r})"
        )


def read_config_json(folder: Path, prefix: str = "") -> dict:
    """`folder`'s config.json as a dict; `ExportError` starting with `prefix` when it is not a JSON object."""
    path = folder / "config.json"
    try:
        config_json = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ExportError(f"{prefix}cannot read config.json ({type(e).__name__}: {e})") from None
    if not isinstance(config_json, dict):
        raise ExportError(
            f"{prefix}config.json holds a JSON {type(config_json).__name__}, not an object of config fields"
        )
    return config_json


def config_from_fields(fields: dict) -> MoEConfig:
    """A `MoEConfig` of `fields`, leaving out what is not a field of ours or only records how it was saved."""
    return MoEConfig(
        **{k: v for k, v in fields.items() if k in MoEConfig.__dataclass_fields__ and k not in VOLATILE_FIELDS}
    )


def init_config(init: InitFrom) -> MoEConfig:
    """The config of the model `init` holds, as it is (no command-line changes)."""
    return config_from_fields(init.fields)


def weight_source(init: InitFrom, config: MoEConfig, upcycling: Upcycling | None = None):
    """The tensors of `init` under our names, for a model of `config` (upcycled from it, with `upcycling`)."""
    if upcycling is not None:
        return UpcycleSource(weight_source(init, init_config(init)), config, upcycling)
    return NativeSource(init.folder) if init.fmt == NATIVE else StockSource(init.folder, init.fmt, config)


def converted_model(init: InitFrom, config: MoEConfig) -> MoEForCausalLM:
    """Our whole model, in fp32, with `init`'s weights (the one-process form of `parallel.sharded_load`)."""
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    model.load_weights(weight_source(init, config))
    return model.float().eval()


def check_import(init: InitFrom, config: MoEConfig) -> float:
    """Max |logits(stock class) - logits(converted)| on a fixed batch in fp32; refused above TOLERANCE.

    Both forwards run with one decoder layer in memory at a time (`stock_stream`): the check holds the
    embeddings, head and one layer, not the two whole models."""
    ids = torch.randint(
        config.vocab_size, (2, min(16, config.max_position_embeddings)), generator=torch.Generator().manual_seed(0)
    )
    try:
        ours = streamed_logits(config, weight_source(init, config), ids)
    except ValueError as e:  # a tensor whose shape is not the one config.json gives it
        raise ExportError(f"--init_from {init.folder}: {e}") from None
    try:
        theirs = stock_logits(init.folder, ids, CLASS_NAMES[init.fmt])
    except NotStreamable as e:
        raise ExportError(f"--init_from {init.folder}: {e}") from None
    diff = (theirs - ours).abs().max().item()
    if not diff <= TOLERANCE:  # also refuses NaN
        raise ExportError(
            f"--init_from {init.folder}: the converted model does not reproduce "
            f"{CLASS_NAMES[init.fmt]}: max |logit difference| {diff:.3g} > {TOLERANCE:g} in fp32"
        )
    return diff


def streamed_logits(config: MoEConfig, source, ids: torch.Tensor) -> torch.Tensor:
    """Our model's fp32 logits on `ids`, its decoder layers read one at a time from `source` (`read`, `has`, and
    `close`, which lets go of what was read: between layers, the files' mapped pages or the layer it holds)."""
    with torch.device("meta"):
        model = MoEForCausalLM(config).float()
    layers = model.model.layers
    model.model.layers = nn.ModuleList()  # the rest (embeddings, norm, head, RoPE) as the training load fills it
    model.load_weights(source)
    model.model.layers = layers
    source.close()

    def load(i: int, layer: nn.Module) -> None:
        prefix = f"model.layers.{i}"
        layer.to_empty(device="cpu")
        for name, param in layer.named_parameters(prefix=prefix):
            tensor = source.read(name)
            if tensor.shape != param.shape:
                raise ValueError(
                    f"{name}: the checkpoint holds shape {tuple(tensor.shape)}, the model {tuple(param.shape)}"
                )
            param.copy_(tensor)
        for name, router in layer.named_modules(prefix=prefix):
            if isinstance(router, Router):  # the selection bias, zero when the stock class has none
                router.load_sum.zero_()
                bias = f"{name}.score_bias"
                router.score_bias.copy_(source.read(bias) if source.has(bias) else torch.zeros_like(router.score_bias))
        source.close()

    return stream_logits(model.eval(), layers, load, ids)
