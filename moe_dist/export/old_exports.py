"""Is a folder with no `.moe-dist.json` an untouched export from before records existed? (`output_guard`)

Those exports wrote no size or hash of their files anywhere (not in config.json, not in the stock model
card), so a file of theirs is recognised by its name and by what can be verified of it without one:

- `config.json`: reads as one of our exports (`model_type: moe_dist`) or a stock class we export to, and
  the weights below check out against it;
- the weights: `model.safetensors`, or `model.safetensors.index.json` and the shards it names; every header
  parses, every file is exactly its header plus the tensors it declares (safetensors refuses a truncated or
  extended one), and together they hold exactly the tensors, with their shapes, that an export of that
  config writes, each in the shard the index names;
- the model code (`moe_dist` exports only): the modules `auto_map` names and their relative imports,
  transitively: what `save_pretrained` copied, and what `trust_remote_code` runs;
- `generation_config.json`, `tokenizer_config.json`: JSON objects; `tokenizer.json`: a tokenizer the
  `tokenizers` library reads; `chat_template.jinja`: UTF-8 text. These are all a tokenizer save of
  transformers 5 writes for the fast tokenizers a run uses (moe-dist has required transformers 5 since its
  first commit), so `vocab.json`, `merges.txt`, `special_tokens_map.json` or `tokenizer.model` are not ours;
- `README.md` (stock-class exports only): our model card, opening as the exporter opens it for that class.

Any other entry (a link, a folder, another name) or a file failing its check cannot be proven ours, and the
folder is refused. What no check reaches (the text of the model code, the card below its opening, the
tokenizer's contents) is why exports now record each file's sha256.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer
from transformers.dynamic_module_utils import get_relative_import_files

from ..convert.sources import INDEX, SafetensorsFiles
from ..convert.standard_keys import key_pairs, our_tensor_names
from ..convert.stock_import import NATIVE, config_from_fields, read_config_json, read_init_config
from ..model.modeling import MoEForCausalLM
from .card import card_front_matter

# What a file that is not what it claims raises on reading (ExportError is a RuntimeError, as is a config
# that builds no model).
_UNREADABLE = (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError, SafetensorError)


def _json_object(path: Path) -> bool:
    return isinstance(json.loads(path.read_text()), dict)


def _text(path: Path) -> bool:
    path.read_text(encoding="utf-8")
    return True


def _tokenizer(path: Path) -> bool:
    try:
        Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - the Rust library raises a bare Exception for a file it cannot read
        return False
    return True


_FILE_CHECKS = {
    "generation_config.json": _json_object,
    "tokenizer_config.json": _json_object,
    "tokenizer.json": _tokenizer,
    "chat_template.jinja": _text,
}


def unproven(folder: Path) -> list[str]:
    """The entries of `folder` that an untouched export from before records cannot account for ([]: none)."""
    names = sorted(p.name for p in folder.iterdir())
    try:
        config_json = read_config_json(folder)
        init = read_init_config(folder)
        shapes = _tensor_shapes(config_from_fields(init.fields), init.fmt)
    except _UNREADABLE:  # no config.json and weights of an export: nothing here is provably one, those first
        return sorted(names, key=lambda n: not (n == "config.json" or n == INDEX or n.endswith(".safetensors")))
    weights = _weights(folder, shapes)
    extra = _model_code(folder, config_json) if init.fmt == NATIVE else _card(folder, init.fmt)
    # config.json is an export's only with the weights it describes: every export wrote both.
    proven = {
        *weights,
        *(["config.json"] if weights else []),
        *extra,
        *(name for name, check in _FILE_CHECKS.items() if _passes(check, folder / name)),
    }
    return [n for n in names if n not in proven or (folder / n).is_symlink()]


def _passes(check, path: Path) -> bool:
    try:
        return path.is_file() and check(path)
    except _UNREADABLE:
        return False


def _tensor_shapes(config, fmt: str) -> dict[str, tuple[int, ...]]:
    """Every tensor an export of `config` as `fmt` writes, with its shape (the model built on the meta device)."""
    with torch.device("meta"):
        state = MoEForCausalLM(config).state_dict()
    if fmt == NATIVE:
        return {name: tuple(state[name].shape) for name in our_tensor_names(config)}
    return {p.disk: tuple(p.to_disk([state[k] for k in p.ours]).shape) for p in key_pairs(config, fmt)}


def _weights(folder: Path, shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """The weight files, when together they hold exactly `shapes`, each tensor where the index says; else none."""
    try:
        weight_map = SafetensorsFiles(folder).weight_map
        found = {}
        for file in set(weight_map.values()):
            with safe_open(folder / file, "pt") as f:
                found.update({key: (file, tuple(f.get_slice(key).get_shape())) for key in f.keys()})
    except _UNREADABLE:
        return set()
    if set(weight_map) != set(shapes) or found != {k: (weight_map[k], shapes[k]) for k in shapes}:
        return set()
    return {*weight_map.values(), *([INDEX] if (folder / INDEX).is_file() else [])}


def _model_code(folder: Path, config_json: dict) -> set[str]:
    """The model code save_pretrained copied: the modules `auto_map` names and their relative imports."""
    refs = config_json.get("auto_map")
    refs = refs.values() if isinstance(refs, dict) else []
    modules = {f"{ref.split('.')[0]}.py" for ref in refs if isinstance(ref, str)}  # "modeling.MoEForCausalLM"
    try:
        return modules | {Path(f).name for m in modules for f in get_relative_import_files(folder / m)}
    except (OSError, ValueError):
        return set()


def _card(folder: Path, fmt: str) -> set[str]:
    """README.md when it is our model card for `fmt`: the exporter's opening, and the command it names."""
    try:
        text = (folder / "README.md").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return set()
    ours = text.startswith(card_front_matter(fmt)) and f" OUT --format {fmt}`." in text
    return {"README.md"} if ours else set()
