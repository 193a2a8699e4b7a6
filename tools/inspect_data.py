"""Show what fine-tuning trains on: each conversation's tokens and which of them are supervised, before packing.

    python tools/inspect_data.py --train_file data/conversations/valid.jsonl \\
        --chat_template data/conversations/chatml.jinja --json examples.json

Writes `{"examples": [{"input_ids": [...], "supervised": [0, 1, ...]}, ...]}` (one entry per conversation, in file
order) and prints the first few rendered conversations with each supervised stretch wrapped in [[...]].
The tokenizer is --tokenizer, else the --init_from folder's (or its hf/'s), else the bundled GPT-2, as training
picks it; the chat template is --chat_template FILE, else the tokenizer's own. Bad input: one line on stderr and
exit status 2, as the trainer's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_dist.analysis.bench import claim_json, write_json
from moe_dist.train.conversations import load_examples
from moe_dist.train.data import TOKENIZER_FILES, load_tokenizer
from moe_dist.train.data_prep import DataError


def tokenizer_source(tokenizer: str | None, init_from: str | None) -> str:
    """--tokenizer, else the --init_from folder (or its hf/) when it holds a tokenizer, else GPT-2."""
    if tokenizer:
        return tokenizer
    for folder in [Path(init_from), Path(init_from) / "hf"] if init_from else []:
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return str(folder)
    return "gpt2"


def marked(tokenizer, input_ids, supervised) -> str:
    """The decoded conversation with every run of supervised tokens wrapped in [[...]]."""
    pieces, run, inside = [], [], False
    for token, flag in zip(input_ids.tolist(), supervised.tolist()):
        if flag != inside:
            pieces.append(tokenizer.decode(run) + ("[[" if flag else "]]"))
            run, inside = [], flag
        run.append(token)
    pieces.append(tokenizer.decode(run) + ("]]" if inside else ""))
    return "".join(pieces)


def main(argv=None) -> int:
    args = parse_args(argv)
    claim_json(args.json, "inspect_data", keys=("examples",))
    try:
        tokenizer = load_tokenizer(tokenizer_source(args.tokenizer, args.init_from))
        examples = load_examples(args.train_file, "train_file", tokenizer, args.chat_template)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for number, example in enumerate(examples[: args.show], 1):
        share = f"{int(example.supervised.sum())} of {len(example.input_ids)} tokens supervised"
        print(f"--- example {number} ({share})\n{marked(tokenizer, example.input_ids, example.supervised)}")
    supervised = sum(int(e.supervised.sum()) for e in examples)
    total = sum(len(e.input_ids) for e in examples)
    print(f"# {len(examples)} conversations, {total:,} tokens, {supervised:,} supervised ({supervised / total:.1%})")
    write_json(
        args.json,
        {
            "examples": [
                {"input_ids": e.input_ids.tolist(), "supervised": e.supervised.astype(int).tolist()} for e in examples
            ]
        },
    )
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train_file", required=True, help="conversations: .jsonl or .jsonl.gz")
    p.add_argument("--tokenizer", help="a tokenizer name or folder (default: --init_from's, else gpt2)")
    p.add_argument("--init_from", help="a model or run folder whose tokenizer to use")
    p.add_argument("--chat_template", help="a Jinja chat template file (default: the tokenizer's own)")
    p.add_argument("--json", help="write every example's input_ids and supervised mask here")
    p.add_argument("--show", type=int, default=3, help="how many examples to print")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
