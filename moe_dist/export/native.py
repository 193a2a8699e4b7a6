"""Checkpoint -> native Hugging Face folder: config, the weights (`model.safetensors`, or shards of at most
`--max_shard_size` with `model.safetensors.index.json`, as `save_pretrained` writes them), the model code for
`trust_remote_code`, tokenizer.

Reads either engine's checkpoint at any EP size (see `formats`): experts saved by every EP rank
come together under their global ids, so the export is the EP=1 model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int
from safetensors.torch import save_file
from transformers.utils import GENERATION_CONFIG_NAME

from ..checkpoint.formats import ExportError, load_hf_state_dict, zero_shards
from ..model.configuration import MoEConfig
from ..model.modeling import MoEForCausalLM
from ..output_guard import check_replace, replace_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXPORT = "export"  # the output kind of an export folder (output_guard)
MAX_SHARD_SIZE = "50GB"  # save_pretrained's default: a folder that loads like any hub folder
INDEX = "model.safetensors.index.json"


def shard_size(text: str) -> int:
    """`--max_shard_size` in bytes: a number with KB, MB, GB or TB as `save_pretrained` takes it, or bytes."""
    try:
        size = int(text) if text.strip().isdigit() else parse_size_to_int(text)
    except (ValueError, OverflowError):  # OverflowError: "infGB"
        size = 0
    if size <= 0:
        raise ExportError(f"--max_shard_size {text!r} is not a size such as 50GB, 500MB or 1000000 (bytes)")
    return size


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: int) -> None:
    """`tensors` as `save_pretrained` lays them out: one `model.safetensors` when they fit in `max_shard_size`,
    else `model-0000i-of-0000n.safetensors` and the index naming each tensor's file. A shard is written and
    dropped before the next is gathered, so the writer holds no second copy of the model."""
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n].contiguous() for n in names}, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def check_export_dir(out_dir: str | Path) -> None:
    """Refuse, before any work, an OUT_DIR that holds anything but our own earlier export (see output_guard)."""
    check_replace(out_dir, EXPORT, unproven=_not_from_an_old_export, what="OUT_DIR")


def write_export_dir(out_dir: str | Path, write_fn) -> None:
    """Fill a staging folder through `write_fn(staging)` and swap it in for `out_dir` whole (output_guard)."""
    replace_dir(out_dir, EXPORT, write_fn, unproven=_not_from_an_old_export, what="OUT_DIR")


def _not_from_an_old_export(folder: Path) -> list[str]:
    # Lazily: old_exports reads configs through stock_import, which imports the exporters, and so this module.
    from .old_exports import unproven

    return unproven(folder)


def build_model(ckpt: Path, dtype: str = "fp32") -> MoEForCausalLM:
    """The full model (all experts, EP=1 layout) from a checkpoint folder, in `dtype` (fp32 | bf16).

    From a DeepSpeed run the weights are its fp32 masters (ZeRO-1/2 shards): in a bf16 run the
    module weights it also saves are those masters rounded to bf16.
    """
    model = MoEForCausalLM(read_config(ckpt))
    state = _fp32_weights(ckpt, model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the embedding; safetensors saves a shared tensor once
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:2]
        raise ExportError(f"{ckpt}: weights do not match its config.json ({' '.join(first)})") from None
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ExportError(
            f"{ckpt}: weights do not match its config.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.to(DTYPES[dtype]).eval()


def read_config(ckpt: Path) -> MoEConfig:
    if not (ckpt / "config.json").is_file():
        raise ExportError(f"{ckpt} is not a moe-dist checkpoint: it has no config.json")
    return MoEConfig.from_pretrained(ckpt)


def _fp32_weights(ckpt: Path, model: MoEForCausalLM) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under HF names; a DeepSpeed ZeRO-1/2 run's from its fp32 masters."""
    state_file = ckpt / "trainer_state.json"
    saved = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if saved.get("engine") != "deepspeed" or not zero_shards(ckpt):
        return load_hf_state_dict(ckpt)  # accelerate keeps fp32 parameters; ZeRO-0 has no masters on disk
    # Lazily: the parallel stack imports this package's formats, and importing the exporter stays light.
    from ..parallel.portable import read_state

    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    return read_state(
        ckpt, engine="deepspeed", ep_size=saved["ep_size"], num_experts=model.config.num_local_experts, shapes=shapes
    ).weights


def export_checkpoint(
    ckpt: str | Path,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    dtype: str = "fp32",
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> Path:
    """Write `out_dir` (config, weights, model code for trust_remote_code, tokenizer) atomically."""
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    check_export_dir(out_dir)
    model = build_model(ckpt, dtype)  # before touching out_dir: a bad checkpoint leaves the old export

    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(staging)
            settings = Path(tokenizer_dir) / GENERATION_CONFIG_NAME
            if settings.is_file():  # the started-from folder's, kept beside the run's tokenizer (its stop ids)
                shutil.copyfile(settings, staging / GENERATION_CONFIG_NAME)

    write_export_dir(out_dir, write)
    return out_dir
