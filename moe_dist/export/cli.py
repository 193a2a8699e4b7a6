"""Checkpoint -> Hugging Face folder: config, weights (sharded like save_pretrained's), tokenizer.

    python -m moe_dist.export CHECKPOINT_OR_RUN OUT_DIR [--tokenizer DIR] [--dtype fp32|bf16]
                              [--format native|gpt2|llama|qwen3|mixtral|qwen3_moe|olmoe|ernie4_5_moe|auto]
                              [--max_shard_size 50GB] [--merge]
    (console script: moe-dist-export)

A run folder means its latest checkpoint. `native` (the default) needs `import moe_dist` or
trust_remote_code to load; the standard formats load with the stock transformers class and are checked
for exactness before the folder appears. OUT_DIR must be new, empty, or an earlier export of ours, which is
replaced whole and atomically; a folder holding anything else is refused. Exit status 2: OUT_DIR is refused,
or the checkpoint cannot be exported in that format (the message names the file, or the field and the formats
that can represent it), or --max_shard_size is not a size, or --merge is missing for a LoRA run (or given for
another), and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..checkpoint.formats import ExportError, read_lora
from ..convert.standard import STANDARD_FORMATS, blocking_field, fitting_formats
from ..convert.stock_import import read_config_json
from ..model.configuration import MoEConfig
from ..output_guard import OutputRefused
from .native import DTYPES, MAX_SHARD_SIZE, check_export_dir, export_checkpoint, read_config, shard_size
from .standard_export import export_standard

FORMATS = ("native", *STANDARD_FORMATS, "auto")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder (checkpoints/stepNNNNNNNN) or a run folder")
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: <run>/tokenizer when found)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="weight dtype of the export (default fp32); from the fp32 masters of a bf16 run",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="native",
        help="native (moe_dist model code) or a stock transformers class; auto: the class the "
        "run started from (--init_from), else the first that represents the model exactly, "
        "else native",
    )
    parser.add_argument(
        "--max_shard_size",
        default=MAX_SHARD_SIZE,
        help=f"largest weights file (default {MAX_SHARD_SIZE}, as save_pretrained); a bigger model is written as "
        "model-0000i-of-0000n.safetensors with model.safetensors.index.json. KB, MB, GB, TB, or bytes",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="a LoRA run (--lora_rank): fold scale * B @ A into each adapted weight, exported in any format",
    )
    args = parser.parse_args(argv)
    ckpt = _resolve_checkpoint(Path(args.checkpoint))
    tokenizer = args.tokenizer or next((str(p) for p in (ckpt.parent.parent / "tokenizer",) if p.is_dir()), None)
    try:
        args.max_shard_size = shard_size(args.max_shard_size)
        check_export_dir(args.out_dir)  # before any work: OUT_DIR is new, empty, or our own earlier export
        _check_ours(ckpt)
        _check_merge(ckpt, args.merge)
        formats = _auto_formats(ckpt) if args.format == "auto" else [args.format]
        for fmt in formats[:-1]:  # auto only: a class can still be ruled out by the weights or the logits check
            try:
                return _export(ckpt, args, fmt, tokenizer)
            except ExportError as e:
                print(f"--format auto: {e}; trying the next format")
        return _export(ckpt, args, formats[-1], tokenizer)
    except (ExportError, OutputRefused) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _export(ckpt: Path, args: argparse.Namespace, fmt: str, tokenizer: str | None) -> int:
    if fmt == "native":
        out = export_checkpoint(
            ckpt, args.out_dir, tokenizer_dir=tokenizer, dtype=args.dtype, max_shard_size=args.max_shard_size
        )
        print(f"exported {ckpt} -> {out}")
    else:
        diff = export_standard(
            ckpt, args.out_dir, fmt, tokenizer_dir=tokenizer, dtype=args.dtype, max_shard_size=args.max_shard_size
        )
        print(f"exported {ckpt} -> {args.out_dir} as {fmt} (max |logit difference| {diff:.2e} in fp32)")
    return 0


def _auto_formats(ckpt: Path) -> list[str]:
    """`--format auto`: the standard classes whose fields fit, in order (the class the run started from
    first, as its run.json records it), then native."""
    config = read_config(ckpt)
    record = ckpt.parent.parent / "run.json"
    source = json.loads(record.read_text()).get("init_from", {}).get("format") if record.is_file() else None
    fitting = fitting_formats(config, first=source)
    if fitting:
        print(f"--format auto: trying {', '.join(fitting)}, then native")
    else:
        why = "; ".join(f"{f}: {k}={v!r}" for f in STANDARD_FORMATS for k, v in [blocking_field(config, f)])
        print(f"--format auto: no standard class represents this model ({why}); exporting native")
    return [*fitting, "native"]


def _check_ours(ckpt: Path) -> None:
    """Refuse a folder that is not a moe-dist checkpoint, such as a stock model given as RUN, naming what it is."""
    config = read_config_json(ckpt, f"{ckpt} is not a moe-dist run or checkpoint: ")
    model_type = config.get("model_type")
    if model_type != MoEConfig.model_type:
        raise ExportError(
            f"{ckpt} is not a moe-dist run or checkpoint: its config.json has model_type="
            f"{model_type!r}; RUN is a run folder or checkpoints/stepNNNNNNNN of ours (to train from "
            f"this folder, pass it to launch/train.py --init_from)"
        )
    try:
        MoEConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise ExportError(f"{ckpt / 'config.json'}: {' '.join(str(e).split())}") from None


def _check_merge(ckpt: Path, merge: bool) -> None:
    """--merge is the user's word that the export holds the LoRA adapters folded into the base weights."""
    lora = read_lora(ckpt)
    if lora and not merge:
        raise ExportError(
            f"{ckpt} holds LoRA adapters (rank {lora['rank']}, targets {','.join(lora['targets'])}): pass --merge "
            f"to fold them into the weights (W + alpha/r * B @ A)"
        )
    if merge and not lora:
        raise ExportError(f"--merge: {ckpt} holds no LoRA adapters (its run trained without --lora_rank)")


def _resolve_checkpoint(path: Path) -> Path:
    """A run folder or a `checkpoints/` folder means its latest committed checkpoint."""
    for root in (path / "checkpoints", path):
        latest = root / "latest"
        if latest.is_file():
            return root / latest.read_text().strip()
    return path
