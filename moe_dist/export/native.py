"""Checkpoint -> native Hugging Face folder: config, the weights (`model.safetensors`, or shards of at most
`--max_shard_size` with `model.safetensors.index.json`, as `save_pretrained` writes them), the model code for
`trust_remote_code`, tokenizer.

Reads either engine's checkpoint at any EP size (see `formats`): experts saved by every EP rank
come together under their global ids, so the export is the EP=1 model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from huggingface_hub.serialization._base import parse_size_to_int
from transformers.utils import GENERATION_CONFIG_NAME

from ..checkpoint.formats import ExportError
from ..model.configuration import MoEConfig
from ..model.modeling import MoEForCausalLM
from ..output_guard import check_replace, replace_dir
from .reader import CheckpointReader
from .shard_writer import Planned, write_shards

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXPORT = "export"  # the output kind of an export folder (output_guard)
MAX_SHARD_SIZE = "50GB"  # save_pretrained's default: a folder that loads like any hub folder


def shard_size(text: str) -> int:
    """`--max_shard_size` in bytes: a number with KB, MB, GB or TB as `save_pretrained` takes it, or bytes."""
    try:
        size = int(text) if text.strip().isdigit() else parse_size_to_int(text)
    except (ValueError, OverflowError):  # OverflowError: "infGB"
        size = 0
    if size <= 0:
        raise ExportError(f"--max_shard_size {text!r} is not a size such as 50GB, 500MB or 1000000 (bytes)")
    return size


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
    """The full model (all experts, EP=1 layout) from a checkpoint folder, in `dtype` (fp32 | bf16), in memory at
    once (the exports stream it instead: `CheckpointReader`).

    From a DeepSpeed run the weights are its fp32 masters (ZeRO-1/2 shards): in a bf16 run the
    module weights it also saves are those masters rounded to bf16.
    """
    config = read_config(ckpt)
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    try:
        model.load_weights(CheckpointReader(ckpt, config))
    except ValueError as e:  # a tensor of another shape than config.json gives it
        raise ExportError(f"{ckpt}: weights do not match its config.json ({e})") from None
    return model.to(DTYPES[dtype]).eval()


def folder_tensors(model: MoEForCausalLM) -> list[Planned]:
    """What a native folder holds, as `save_pretrained` writes `model` (on the meta device, in the export dtype):
    its state dict, a tied head saved once, as the embedding."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return [Planned(k, v.dtype, tuple(v.shape)) for k, v in state.items()]


def read_config(ckpt: Path) -> MoEConfig:
    if not (ckpt / "config.json").is_file():
        raise ExportError(f"{ckpt} is not a moe-dist checkpoint: it has no config.json")
    return MoEConfig.from_pretrained(ckpt)


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
    config = read_config(ckpt)
    # Before touching out_dir: a bad checkpoint leaves the old export. Weights are read a layer at a time.
    reader = CheckpointReader(ckpt, config, DTYPES[dtype])
    with torch.device("meta"):
        model = MoEForCausalLM(config).to(DTYPES[dtype])
    tensors = folder_tensors(model)

    def write(staging: Path) -> None:
        # Config, generation config and model code as save_pretrained writes them; the weights streamed.
        model.save_pretrained(staging, state_dict={})
        write_shards(tensors, staging, shard_size(str(max_shard_size)), lambda t: reader.read(t.name))
        reader.close()
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(staging)
            settings = Path(tokenizer_dir) / GENERATION_CONFIG_NAME
            if settings.is_file():  # the started-from folder's, kept beside the run's tokenizer (its stop ids)
                shutil.copyfile(settings, staging / GENERATION_CONFIG_NAME)

    write_export_dir(out_dir, write)
    return out_dir
