"""Checkpoint -> native Hugging Face folder: config, one consolidated model.safetensors, the model
code for `trust_remote_code`, tokenizer.

Reads either engine's checkpoint at any EP size (see `formats`): experts saved by every EP rank
come together under their global ids, so the export is the EP=1 model.
"""

from __future__ import annotations

from pathlib import Path

from ..atomic_io import write_dir_atomic
from ..model.configuration import MoEConfig
from ..model.modeling import MoEForCausalLM
from .formats import ExportError, load_hf_state_dict


def build_model(ckpt: Path) -> MoEForCausalLM:
    """The full model (all experts, EP=1 layout) from a checkpoint folder."""
    if not (ckpt / "config.json").is_file():
        raise ExportError(f"{ckpt} is not a moe-dist checkpoint: it has no config.json")
    config = MoEConfig.from_pretrained(ckpt)
    model = MoEForCausalLM(config)
    try:
        model.load_state_dict(load_hf_state_dict(ckpt), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:2]
        raise ExportError(f"{ckpt}: weights do not match its config.json ({' '.join(first)})") from None
    return model.eval()


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None) -> Path:
    """Write `out_dir` (config, model.safetensors, model code for trust_remote_code, tokenizer) atomically."""
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    model = build_model(ckpt)  # before touching out_dir: a bad checkpoint leaves the old export

    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(staging)

    write_dir_atomic(out_dir, write)
    return out_dir
