"""Load an exported folder with the stock transformers class and write its fp32 logits on a fixed batch.

    python -I stock_logits.py FOLDER CLASS_NAME INPUT_IDS.pt LOGITS.pt

Run by the exporter in a fresh interpreter: torch and transformers only, no moe_dist and no
trust_remote_code, the way a serving stack that knows only standard architectures loads the folder.
Exit 2 with one line when the folder does not load as CLASS_NAME with every weight in place.
"""

import sys


def main(folder: str, class_name: str, ids_path: str, logits_path: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if type(model).__name__ != class_name or problems:
        print(f"{folder} loads as {type(model).__name__} (expected {class_name}); {problems}", file=sys.stderr)
        return 2
    if any(m == "moe_dist" or m.startswith("moe_dist.") for m in sys.modules):
        print("moe_dist was imported while loading the export: it is not standalone", file=sys.stderr)
        return 2
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.load(ids_path, weights_only=True), use_cache=False).logits
    torch.save(logits.float(), logits_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
