"""Checkpoint -> Hugging Face folder: config, one consolidated model.safetensors, tokenizer.

Reads either engine's checkpoint at any EP size. From DeepSpeed it takes the dense weights
from `mp_rank_00_model_states.pt` and every expert from its `layer_{L}_expert_{E}` file,
whose keys carry global expert ids (`zero_to_fp32` ignores those files, DeepSpeed #4497).
Every file is read with `torch.load(weights_only=True)`: no pickle code runs.

    python -m moe_dist.export CHECKPOINT_DIR OUT_DIR [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..model.configuration import MoEConfig
from ..model.modeling import MoEForCausalLM
from ..parallel.expert_parallel import ds_to_hf_key


class ExportError(RuntimeError):
    pass


def load_hf_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model's weights under their HF names, whichever engine wrote `ckpt`."""
    accelerate_weights = ckpt / "accelerate" / "model.safetensors"
    if accelerate_weights.is_file():
        return load_file(accelerate_weights)
    dense = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if not dense:
        raise ExportError(f"{ckpt} is not a moe-dist checkpoint: no accelerate/model.safetensors and no "
                          f"mp_rank_*_model_states.pt")
    state = dict(_load(dense[0])["module"])
    for expert_file in sorted(ckpt.glob("layer_*_expert_*_model_states.pt")):
        state.update(_load(expert_file))
    return {ds_to_hf_key(k): v for k, v in state.items()}


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupted files raise many different types
        raise ExportError(f"cannot read checkpoint file {path} ({type(e).__name__}: {e})") from None


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
    model = build_model(ckpt)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder (checkpoints/stepNNNNNNNN) or a run folder")
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: <run>/tokenizer when found)")
    args = parser.parse_args(argv)
    ckpt = _resolve_checkpoint(Path(args.checkpoint))
    tokenizer = args.tokenizer or next((str(p) for p in (ckpt.parent.parent / "tokenizer",) if p.is_dir()), None)
    try:
        out = export_checkpoint(ckpt, args.out_dir, tokenizer_dir=tokenizer)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} -> {out}")
    return 0


def _resolve_checkpoint(path: Path) -> Path:
    """A run folder or a `checkpoints/` folder means its latest committed checkpoint."""
    for root in (path / "checkpoints", path):
        latest = root / "latest"
        if latest.is_file():
            return root / latest.read_text().strip()
    return path
