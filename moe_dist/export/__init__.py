"""Checkpoint formats and exports.

    formats.py   the files each engine writes and their key maps; `load_hf_state_dict`
    native.py    checkpoint -> native HF folder (`export_checkpoint`, `build_model`)
    reader.py    a checkpoint's weights one decoder layer at a time (what both exports stream)
    shard_writer.py  safetensors shards written a tensor at a time
    standard.py  our config and weights -> GPT-2 / Mixtral / Ernie 4.5 MoE, or the field a class cannot represent
    standard_export.py  checkpoint -> stock-class HF folder, checked by `stock_logits.py` in a fresh interpreter
    cli.py       `python -m moe_dist.export` / `moe-dist-export` (`--format native|gpt2|mixtral|ernie4_5_moe|auto`)

Importing this package does not import DeepSpeed: `formats` imports it only to read ZeRO shards.
"""

from ..checkpoint.formats import ExportError, load_hf_state_dict
from .cli import main
from .native import build_model, export_checkpoint
from .standard_export import export_standard

__all__ = ["ExportError", "build_model", "export_checkpoint", "export_standard", "load_hf_state_dict", "main"]
