"""How data/gpt2/ was made: GPT-2's byte-level BPE, from the copy OpenAI ships with Whisper, checked against tiktoken.

    pip download --no-deps openai-whisper==20250625        # the sdist holds whisper/assets/gpt2.tiktoken
    tar xzf openai_whisper-20250625.tar.gz openai_whisper-20250625/whisper/assets/gpt2.tiktoken
    pip install tiktoken                                    # only for this script's check
    python data/gpt2/make_tokenizer.py openai_whisper-20250625/whisper/assets/gpt2.tiktoken NEW_FOLDER  # new or empty

`gpt2.tiktoken` lists GPT-2's 50,256 byte-level tokens with their ranks, which are GPT-2's token ids;
`<|endoftext|>` is id 50256. The vocabulary and merges are recovered from the ranks with transformers' own
`TikTokenConverter.extract_vocab_merges_from_model`, then given to transformers' own `GPT2Tokenizer`
(byte-level BPE, ByteLevel pre-tokenizer with GPT-2's regex, no prefix space), as
`AutoTokenizer.from_pretrained("gpt2")` builds it. The script refuses to write unless the result encodes the
bundled TinyStories sample and a set of edge cases exactly as tiktoken does with the same file (tiktoken's
`gpt2` encoding is GPT-2's tokenizer).
"""

import gzip
import sys
from pathlib import Path

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EDGE_CASES = [
    "Hello world",
    " leading space",
    "tabs\tand\nnewlines\n\n",
    "Numbers 123 4567 89",
    "é ü ß 中文 😀",
    "<|endoftext|>",
    "don't it's we're I'm you'll he'd",
    "   many   spaces   ",
    "a\r\nb",
    "",
]


def main(tiktoken_file: str, out: str) -> None:
    if Path(out).exists() and any(Path(out).iterdir()):
        sys.exit(
            f"error: {out} is not empty; write into a new or empty folder (this script removes the vocab.json "
            f"and merges.txt it writes there, and must not touch files of yours)"
        )
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from transformers import GPT2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab, merges = TikTokenConverter(vocab_file=tiktoken_file).extract_vocab_merges_from_model(tiktoken_file)
    vocab["<|endoftext|>"] = len(vocab)
    # transformers' own GPT-2 construction (models/gpt2/tokenization_gpt2.py): BPE with these vocab and
    # merges, ByteLevel pre-tokenizer and decoder, no prefix space.
    ours = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=1024)
    reference = tiktoken.Encoding(
        "gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(tiktoken_file),
        special_tokens={"<|endoftext|>": 50256},
    )
    sample = Path(__file__).resolve().parents[1] / "tinystories" / "train.txt.gz"
    texts = EDGE_CASES + gzip.open(sample, "rt", encoding="utf-8").read().split("<|endoftext|>")
    for text in texts:
        theirs = reference.encode(text, allowed_special="all")
        if ours.encode(text) != theirs:
            sys.exit(f"differs from tiktoken on {text[:60]!r}: {ours.encode(text)[:20]} vs {theirs[:20]}")
    assert len(ours) == 50257 and ours.eos_token_id == 50256
    written = [Path(f) for f in ours.save_pretrained(out)]
    for path in written:  # tokenizer.json holds the vocabulary and merges: drop only copies this call wrote
        if path.name in ("vocab.json", "merges.txt"):
            path.unlink()
    print(f"{len(texts)} texts encode as tiktoken does; wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
