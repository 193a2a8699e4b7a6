"""Packed conversation rows against padding to the longest in a batch, side by side on one long-tailed length set.

What: `--conversations` synthetic conversations (random token ids; lengths drawn from a seeded lognormal of median
`--median` and shape `--sigma`, clipped to [`--min_len`, seq_len + 1]; the first third of each is the unsupervised
prompt, the rest the supervised reply). The same pieces (`moe_dist.train.packing.piece`) go through forward +
backward of `tiny-moe` two ways:

- packed: `pack_conversations` (best-fit decreasing) into rows of `--seq_len`, `--rows` rows per forward, with
  position ids restarting per conversation and the real-token mask, as fine-tuning trains;
- padded: `--micro_batch_size` conversations per forward in file order, each batch padded on the right to its
  longest (labels -100 and the real-token mask 0 on padding; right padding under a causal mask is never seen by a
  real token, so no attention mask is needed).

Each round times one pass over every conversation by each method, the order alternating between rounds; after
`--warmup` untimed rounds, the medians give supervised and real tokens/s per method and their ratio. No optimizer
step: every round sees the same weights.

    python tools/bench_packing.py --json docs/bench/packing/bench_packing.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from moe_dist.analysis.bench import claim_json, command_line, machine, write_json
from moe_dist.model.configuration import MoEConfig
from moe_dist.model.modeling import IGNORE_INDEX, MoEForCausalLM
from moe_dist.train.conversations import Example
from moe_dist.train.packing import INPUTS, LABELS, REAL, pack_conversations, packed_tensors, piece

METHODS = ("packed", "padded")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=512, help="how many conversations")
    p.add_argument("--median", type=float, default=96, help="median conversation length in tokens")
    p.add_argument("--sigma", type=float, default=0.9, help="lognormal shape: larger is a longer tail")
    p.add_argument("--min_len", type=int, default=8, help="shortest conversation in tokens")
    p.add_argument("--seq_len", type=int, default=512, help="packed row length; longer conversations are cut to it")
    p.add_argument("--rows", type=int, default=4, help="packed rows per forward")
    p.add_argument("--micro_batch_size", type=int, default=8, help="conversations per padded forward")
    p.add_argument("--vocab_size", type=int, default=50304, help="GPT-2's, rounded up to 64 as training does")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, each method once per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the numbers here")
    return p.parse_args(argv)


def synthetic_examples(args) -> list[Example]:
    """Seeded long-tailed conversations: lognormal lengths, random ids, the first third unsupervised."""
    rng = np.random.default_rng(args.seed)
    lengths = rng.lognormal(np.log(args.median), args.sigma, args.conversations)
    lengths = np.clip(lengths.round().astype(int), args.min_len, args.seq_len + 1)
    examples = []
    for n in lengths:
        supervised = np.arange(n) >= n // 3
        examples.append(Example(rng.integers(0, args.vocab_size, n, dtype=np.int64), supervised))
    return examples


def packed_batches(examples: list[Example], args) -> list[dict]:
    rows, _ = pack_conversations(examples, args.seq_len, truncate=True, label="bench")
    batches = []
    for first in range(0, len(rows), args.rows):
        ids, labels, positions, real = packed_tensors(rows, np.arange(first, min(first + args.rows, len(rows))))
        batches.append(dict(input_ids=ids, shift_labels=labels, position_ids=positions, real_tokens=real))
    return batches


def padded_batches(examples: list[Example], args) -> list[dict]:
    pieces = [piece(ex.input_ids, ex.supervised, args.seq_len) for ex in examples]
    pieces = [p for p in pieces if p is not None]  # as packing drops them: the same conversations both ways
    batches = []
    for first in range(0, len(pieces), args.micro_batch_size):
        group = pieces[first : first + args.micro_batch_size]
        longest = max(p.shape[1] for p in group)
        block = np.zeros((len(group), 4, longest), dtype=np.int64)
        block[:, LABELS] = IGNORE_INDEX
        for i, p in enumerate(group):
            block[i, :, : p.shape[1]] = p
        t = torch.from_numpy(block)
        batches.append(
            dict(input_ids=t[:, INPUTS], shift_labels=t[:, LABELS].contiguous(), real_tokens=t[:, REAL].bool())
        )
    return batches


def counts(batches: list[dict]) -> dict:
    slots = sum(b["input_ids"].numel() for b in batches)
    real = sum(int(b["real_tokens"].sum()) for b in batches)
    supervised = sum(int((b["shift_labels"] != IGNORE_INDEX).sum()) for b in batches)
    return dict(forwards=len(batches), slots=slots, real=real, supervised=supervised, real_fraction=real / slots)


def one_pass(model, batches: list[dict]) -> float:
    """Seconds for forward + backward over every batch (CPU: each backward returns when it is done)."""
    start = time.perf_counter()
    for batch in batches:
        model(**batch, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(model, batches: dict[str, list[dict]], args) -> dict[str, list[float]]:
    seconds = {m: [] for m in METHODS}
    for r in range(args.warmup + args.rounds):
        for method in METHODS if r % 2 == 0 else METHODS[::-1]:  # alternate, so neither always runs first
            s = one_pass(model, batches[method])
            if r >= args.warmup:
                seconds[method].append(s)
        print(f"round {r + 1}/{args.warmup + args.rounds}{' (warmup)' if r < args.warmup else ''}", flush=True)
    return seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    claim_json(args.json, "bench_packing")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    examples = synthetic_examples(args)
    lengths = np.array([len(ex.input_ids) for ex in examples])
    batches = {"packed": packed_batches(examples, args), "padded": padded_batches(examples, args)}
    config = MoEConfig.from_preset("tiny-moe", vocab_size=args.vocab_size, max_position_embeddings=args.seq_len)
    model = MoEForCausalLM(config).train()
    where = machine(torch.device("cpu"))
    print(f"# command: {command_line('python')}\n# machine: {where}")
    percentiles = {f"p{q}": float(np.percentile(lengths, q)) for q in (0, 10, 50, 90, 99, 100)}
    print(f"# {len(examples)} conversations, lengths {percentiles}, mean {lengths.mean():.1f}", flush=True)
    seconds = measure(model, batches, args)
    results = {}
    for method in METHODS:
        c = counts(batches[method])
        median = statistics.median(seconds[method])
        results[method] = dict(
            c,
            seconds=seconds[method],
            median_s=median,
            supervised_tok_s=c["supervised"] / median,
            real_tok_s=c["real"] / median,
        )
    print(f"{'method':8s}{'forwards':>10s}{'real fraction':>15s}{'supervised tok/s':>18s}{'real tok/s':>12s}")
    for method, r in results.items():
        print(
            f"{method:8s}{r['forwards']:10d}{r['real_fraction']:15.3f}{r['supervised_tok_s']:18,.0f}"
            f"{r['real_tok_s']:12,.0f}"
        )
    speedup = results["packed"]["supervised_tok_s"] / results["padded"]["supervised_tok_s"]
    print(f"packed / padded supervised tokens/s: {speedup:.2f}")
    write_json(
        args.json,
        {
            "command": command_line("python"),
            "machine": where,
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "lengths": {**percentiles, "mean": float(lengths.mean())},
            "methods": results,
            "packed_over_padded": speedup,
        },
    )


if __name__ == "__main__":
    main()
