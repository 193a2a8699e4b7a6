"""The model card (README.md) of a stock-class export: which class loads it, how the model was trained.

Its opening (`card_front_matter`) also tells our card from a user's README in an export written before
output records existed (`old_exports`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..convert.upcycle import Upcycling
from ..model.modeling import MoEForCausalLM


def card_front_matter(fmt: str) -> str:
    """The model card's opening; it also tells our card from a user's README in an export from before records
    (`old_exports`)."""
    return "\n".join(
        ["---", "library_name: transformers", "pipeline_tag: text-generation", f"tags: [moe-dist, {fmt}]", "---", ""]
    )


def model_card(ckpt: Path, model: MoEForCausalLM, fmt: str, class_name: str, diff: float) -> str:
    """README.md: which class loads the folder, how the model was trained (as far as the run folder records it)."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    summary, record = (
        {} if run is None or not (run / name).is_file() else json.loads((run / name).read_text())
        for name in ("summary.json", "run.json")
    )
    preset = summary.get("model") or record.get("preset") or "unknown"
    engine = summary.get("engine") or record.get("engine") or "unknown"
    # run.json records the latest launch's command and data source; runs from before it did not.
    command = record.get("command") or (
        f"moe-dist-train --model {preset}" + (" --deepspeed <config>" if engine == "deepspeed" else "") + " ..."
    )
    data = record.get("data") or "not recorded in this run folder"
    ppl = summary.get("final_val_ppl")
    lines = [
        card_front_matter(fmt),
        f"# {preset} (moe-dist export)",
        "",
        (
            f"Loads with the stock `transformers.{class_name}` (`model_type: {fmt}`): "
            "`AutoModelForCausalLM.from_pretrained(folder)`, no custom code, no `trust_remote_code`."
        ),
        f"Exported from `{ckpt}` with `python -m moe_dist.export {ckpt} OUT --format {fmt}`.",
        "",
        "## Training",
        "",
        f"- Command (latest launch): `{command}`",
        f"- Data: {data}; tokenised by the tokenizer saved in this folder",
        *(
            [
                f"- Started from `{record['init_from']['path']}`"
                + (
                    f", upcycled to {Upcycling.from_record(record['upcycle']).describe()} per routed layer (sparse "
                    f"upcycling; noise {record['upcycle']['noise']:g}, "
                    f"re-initialised channels {record['upcycle']['reinit']:g})"
                    if record.get("upcycle")
                    else f" ({record['init_from']['format']})"
                )
            ]
            if record.get("init_from")
            else []
        ),
        (
            f"- Engine: {engine}, expert-parallel size {summary.get('ep_size', 'unknown')}, "
            f"world size {summary.get('world_size', 'unknown')}, {summary.get('steps', 'unknown')} steps"
        ),
        f"- Validation perplexity: {ppl:.3f} (final), {summary.get('best_val_ppl', float('nan')):.3f} (best)"
        if ppl is not None
        else "- Validation perplexity: not recorded (no summary.json beside the checkpoint)",
        "",
        "## Model",
        "",
        f"- {model.num_parameters():,} parameters, {model.num_active_parameters():,} active per token",
        f"- Exactness: max |logit difference| against the moe-dist model on a fixed batch, fp32: {diff:.2e}",
    ]
    return "\n".join(lines) + "\n"
