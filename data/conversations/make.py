"""Write train.jsonl and valid.jsonl here: story-telling conversations made from the bundled TinyStories sample.

    python data/conversations/make.py

The user gives a story's opening sentence and asks for the story; the assistant continues the first paragraph.
Some conversations have a system turn, some go on for a second turn (the user asks what happened next, the
assistant tells the next paragraph), and some are prompt/completion records. Stories are taken in the sample's
order and every choice comes from a seeded generator, so the files are the same on every run.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parent / "tinystories"
COUNTS = {"train": 1500, "valid": 100}
SEED = 20240613
MAX_PARAGRAPH = 400  # characters: keeps the files a few hundred KB
SYSTEM = (
    "You are a storyteller for small children. Use simple words.",
    "You write short, happy stories.",
    "Continue the story the user starts, in the same style.",
)
ASKS = (
    "Tell me a story that begins like this: {opening}",
    "Write a short story. Start with: {opening}",
    "Can you continue this story? {opening}",
    "{opening} What happens next?",
)
NEXT = ("What happened next?", "Go on, please.", "And then?", "Tell me more.")
# The opening sentence: up to the first full stop, exclamation or question mark that ends a sentence.
_SENTENCE_END = re.compile(r"[.!?][\"”’]?\s")


def stories(split: str) -> list[list[str]]:
    """Each story of the bundled split as its paragraphs (one per line, no blank lines: its SOURCE.md)."""
    with gzip.open(SAMPLE / f"{split}.txt.gz", "rt", encoding="utf-8") as f:
        return [s.strip().split("\n") for s in f.read().split("\n<|endoftext|>\n") if s.strip()]


def split_opening(paragraph: str) -> tuple[str, str] | None:
    """(opening sentence, rest of the paragraph), or None when the paragraph is one sentence."""
    end = _SENTENCE_END.search(paragraph)
    if end is None or not paragraph[end.end() :].strip():
        return None
    return paragraph[: end.end()].strip(), paragraph[end.end() :].strip()


def record(paragraphs: list[str], rng: random.Random) -> dict | None:
    """One conversation from a story, or None when the story does not fit."""
    parts = split_opening(paragraphs[0])
    if parts is None or any(len(p) > MAX_PARAGRAPH for p in paragraphs[:2]):
        return None
    opening, rest = parts
    kind = rng.random()
    if kind < 0.15:
        return {"prompt": f"Continue the story: {opening}", "completion": rest}
    messages = [{"role": "user", "content": rng.choice(ASKS).format(opening=opening)}]
    messages.append({"role": "assistant", "content": rest})
    if kind < 0.45:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM)})
    if len(paragraphs) > 1 and rng.random() < 0.35:
        messages += [{"role": "user", "content": rng.choice(NEXT)}, {"role": "assistant", "content": paragraphs[1]}]
    return {"messages": messages}


def main() -> None:
    rng = random.Random(SEED)
    for split, count in COUNTS.items():
        records = [r for r in (record(p, rng) for p in stories(split)) if r is not None][:count]
        with open(HERE / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        print(f"{split}.jsonl: {len(records)} conversations")


if __name__ == "__main__":
    main()
