"""Checkpoint -> Hugging Face folder: config, one consolidated model.safetensors, tokenizer.

    python -m moe_dist.export CHECKPOINT_OR_RUN OUT_DIR [--tokenizer DIR] [--dtype fp32|bf16]
    (console script: moe-dist-export)

A run folder means its latest checkpoint. Exit status 2: the checkpoint cannot be exported (the
message names the file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .formats import ExportError
from .native import DTYPES, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder (checkpoints/stepNNNNNNNN) or a run folder")
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: <run>/tokenizer when found)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="weight dtype of the export (default fp32); from the fp32 masters of a bf16 run")
    args = parser.parse_args(argv)
    ckpt = _resolve_checkpoint(Path(args.checkpoint))
    tokenizer = args.tokenizer or next((str(p) for p in (ckpt.parent.parent / "tokenizer",) if p.is_dir()), None)
    try:
        out = export_checkpoint(ckpt, args.out_dir, tokenizer_dir=tokenizer, dtype=args.dtype)
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
