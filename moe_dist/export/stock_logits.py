"""Load an exported folder with the stock transformers class and write its fp32 logits on a fixed batch.

    python -I stock_logits.py FOLDER CLASS_NAME INPUT_IDS.pt LOGITS.pt

Run by the exporter in a fresh interpreter: torch and transformers only, no moe_dist and no
trust_remote_code, the way a serving stack that knows only standard architectures loads the folder.
The class runs its own forward one decoder layer in memory at a time (`convert/stock_stream.py`, loaded
by path so that the moe_dist package is not imported), with its own loader's weight conversions, so the
check holds the embeddings, the head and one layer. Exit 2 with one line when the folder does not load as
CLASS_NAME with every weight in place and none left over.
"""

import importlib.util
import sys
from pathlib import Path

_STOCK_STREAM = Path(__file__).resolve().parent.parent / "convert" / "stock_stream.py"


def main(folder: str, class_name: str, ids_path: str, logits_path: str) -> int:
    import torch

    spec = importlib.util.spec_from_file_location("stock_stream", _STOCK_STREAM)
    stream = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stream)
    try:
        logits = stream.stock_logits(folder, torch.load(ids_path, weights_only=True), class_name, strict=True)
    except stream.NotStreamable as e:
        print(f"{folder}: {e}", file=sys.stderr)
        return 2
    if any(m == "moe_dist" or m.startswith("moe_dist.") for m in sys.modules):
        print("moe_dist was imported while loading the export: it is not standalone", file=sys.stderr)
        return 2
    torch.save(logits, logits_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
