"""Checkpoint formats and exports.

    formats.py   the files each engine writes and their key maps; `load_hf_state_dict`
    native.py    checkpoint -> native HF folder (`export_checkpoint`, `build_model`)
    cli.py       `python -m moe_dist.export` / `moe-dist-export`

Importing this package does not import DeepSpeed: `formats` imports it only to read ZeRO shards.
"""

from .cli import main
from .formats import ExportError, load_hf_state_dict
from .native import build_model, export_checkpoint

__all__ = ["ExportError", "build_model", "export_checkpoint", "load_hf_state_dict", "main"]
