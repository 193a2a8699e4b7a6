"""A model's own forward with one decoder layer in memory at a time: the import and export checks in bounded memory.

`stream_logits(model, layers, load, ids)` runs `model(ids)` as it is, with a hook that materialises a decoder
layer (`load(i, layer)`) just before the layer runs and returns it to the meta device once it has run, so the
process holds the embeddings, the head and one layer, whatever the depth. The forward is the class's own
(masks, rotary embeddings, layer types): nothing of it is re-implemented here.

`stock_logits(folder, ids)` does it for a stock transformers folder: the class is built on the meta device by
`from_config`, and each layer's tensors are read from the folder's safetensors and put in place by the class's
own loader (`convert_and_load_state_dict_in_model`, with the class's weight conversions: per-expert hub tensors
fused into its 3-D experts, renamed prefixes), as `from_pretrained` does for the whole model.

This file imports only torch, transformers and safetensors: the exporter runs it, by path, in an interpreter
without moe_dist (`export/stock_logits.py`).
"""

from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# A decoder layer's tensors on disk: `model.layers.3.` (and `transformer.h.3.`, GPT-2's released `h.3.`).
LAYER_KEY = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
INDEX = "model.safetensors.index.json"


class NotStreamable(ValueError):
    """The model's layers cannot be run one at a time; the message says why."""


def stream_logits(model: nn.Module, layers: nn.ModuleList, load: Callable[[int, nn.Module], None], ids) -> torch.Tensor:
    """`model(input_ids=ids).logits` in fp32, each of `layers` filled by `load(i, layer)` only while it runs."""
    position = {id(layer): i for i, layer in enumerate(layers)}

    def before(layer, args):
        load(position[id(layer)], layer)

    def after(layer, args, output):
        layer.to("meta")  # frees the layer's tensors before the next one is read
        _return_freed_memory()

    handles = [
        h for layer in layers for h in (layer.register_forward_pre_hook(before), layer.register_forward_hook(after))
    ]
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits.float()
    finally:
        for handle in handles:
            handle.remove()


def _return_freed_memory() -> None:
    """Hand the freed layer back to the OS. glibc keeps freed heap memory, and its mmap threshold rises with
    each large free, so the next layer's tensors come from a heap that then only grows: measured at 12 layers
    (d 512, 32 experts), 1.5 GB peak RSS for ours without this, 0.53 GB with it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator's business
        pass


def stock_logits(
    folder: str | Path, ids: torch.Tensor, class_name: str | None = None, *, strict: bool = False
) -> torch.Tensor:
    """The fp32 logits of `folder`'s stock class on `ids`, one decoder layer in memory at a time.

    `NotStreamable` when the class's layers are not one list, or a tensor the class needs is not in the folder
    (`from_pretrained` would leave it at a random initialisation); with `strict` (an export of ours) also when
    the folder holds a tensor the class has no place for, or one of another shape.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if class_name is not None and type(model).__name__ != class_name:
        raise NotStreamable(f"{folder} loads as {type(model).__name__} (expected {class_name})")
    layers = _decoder_layers(model)
    keys = _layer_keys(folder, len(layers))
    loader = _Loader(model, folder, strict)
    _materialise_buffers(model)
    loader.load(keys[None])
    model.tie_weights()  # the loader gave the embedding a new tensor: a tied head shares it again
    _check_loaded(model, skip={id(p) for p in layers.parameters()})

    def load_layer(i: int, layer: nn.Module) -> None:
        loader.load(keys.get(i, []))
        _check_loaded(layer)

    return stream_logits(model.eval(), layers, load_layer, ids)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = model.base_model
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if not isinstance(layers, nn.ModuleList):
        raise NotStreamable(f"{type(model).__name__} keeps its decoder layers in no `layers` or `h` list")
    return layers


def _layer_keys(folder: Path, depth: int) -> dict[int | None, list[str]]:
    """The folder's tensor names by decoder layer (None: the embeddings, final norm and head)."""
    by_layer: dict[int | None, list[str]] = {None: []}
    for key in _weight_map(folder):
        match = LAYER_KEY.search(key)
        layer = int(match[1]) if match and int(match[1]) < depth else None
        by_layer.setdefault(layer, []).append(key)
    return by_layer


def _weight_map(folder: Path) -> dict[str, str]:
    if (folder / INDEX).is_file():
        return json.loads((folder / INDEX).read_text())["weight_map"]
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def _materialise_buffers(model: nn.Module) -> None:
    """Buffers a checkpoint does not hold (RoPE frequencies) computed as `from_pretrained` computes them: by the
    class's `_init_weights`, on modules that hold no parameter of their own."""
    for module in model.modules():
        if module._buffers and not module._parameters:
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)


class _Loader:
    """Reads a set of the folder's tensors and puts them in place through the class's own weight conversions."""

    def __init__(self, model: nn.Module, folder: Path, strict: bool):
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.model, self.folder, self.strict = model, folder, strict
        self.weight_map = _weight_map(folder)
        self.mapping = get_model_conversion_mapping(model)

    def load(self, keys: list[str]) -> None:
        from safetensors import safe_open
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging

        files, shown = {}, logging.is_progress_bar_enabled()
        try:  # each file is mapped only while its tensors are read: mapped pages would count as the process's
            for file in sorted({self.weight_map[k] for k in keys}):
                files[file] = safe_open(self.folder / file, "pt")
            state = {k: files[self.weight_map[k]].get_slice(k) for k in keys}
            config = LoadStateDictConfig(dtype=torch.float32, weight_mapping=self.mapping)
            logging.disable_progress_bar()  # a bar per layer says nothing
            info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
        finally:
            files.clear()
            if shown:
                logging.enable_progress_bar()
        wrong = sorted(info.unexpected_keys | info.mismatched_keys) if self.strict else []
        if wrong:
            raise NotStreamable(f"{type(self.model).__name__} has no place for the folder's tensor {wrong[0]!r}")


def _check_loaded(module: nn.Module, skip: set[int] = frozenset()) -> None:
    """Every parameter of `module` (but those in `skip`, by id) came from the folder."""
    for name, param in module.named_parameters():
        if param.is_meta and id(param) not in skip:
            raise NotStreamable(f"the folder holds no tensor for {type(module).__name__}'s {name}")
