"""Data preparation at scale: each phase's time and throughput, and peak memory, at --num_proc 1 and all cores.

What: the bundled TinyStories sample's training text repeated `--repeat` times (40 times, as in the
stored measurement, is 274 MB and 329,201 stories), prepared as the trainer's main rank does
(`moe_dist.train.data_prep`): reading, training a `train:N` byte-level BPE, tokenizing into the raw token
file with `num_proc` processes, and packing into the block cache. Each `--num_proc` value runs in a fresh
process (so its peak RSS is its own), in interleaved rounds; each phase's median is printed side by side
with the ratio to `--num_proc 1`.
Peak RSS: the preparing process's, and the largest worker's (a forked worker's RSS also counts the pages it
shares with its parent).

    python tools/bench_data.py --repeat 40 --rounds 1 --json docs/bench/bench_data.json
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moe_dist.analysis.bench import claim_json, command_line, write_json
from moe_dist.train.data import BUNDLED_SAMPLE, build_tokenizer
from moe_dist.train.data_prep import (
    StoryReader,
    default_num_proc,
    one_thread_tokenizers,
    pack_file,
    token_dtype,
    tokenize_to_file,
)

PHASES = ("read", "tokenizer", "tokenize", "pack", "total")


def measure(corpus: Path, num_proc: int, vocab: int, seq_len: int) -> dict:
    """One preparation of `corpus` (in this process); phase seconds, counts and peak RSS."""
    out = {"num_proc": num_proc}
    start = time.perf_counter()
    reader = StoryReader(str(corpus), label="corpus")
    with one_thread_tokenizers() if num_proc == 1 else contextlib.nullcontext():  # as data._build_on_main
        tokenizer = build_tokenizer(f"train:{vocab}", reader, None)
    out["read"], out["tokenizer"] = reader.seconds, time.perf_counter() - start - reader.seconds
    with tempfile.TemporaryDirectory(dir=corpus.parent) as tmp:
        raw, npy = Path(tmp) / "tokens.bin", Path(tmp) / "blocks.npy"
        done = tokenize_to_file(
            reader, tokenizer, raw, num_proc=num_proc, dtype=token_dtype(len(tokenizer)), label="train", show=False
        )
        out["tokenize"], out["stories"], out["tokens"] = done["seconds"], done["stories"], done["tokens"]
        t0 = time.perf_counter()
        out["blocks"] = pack_file(raw, npy, seq_len, token_dtype(len(tokenizer)))
        out["pack"] = time.perf_counter() - t0
    out["total"] = time.perf_counter() - start
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_worker_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


def build_corpus(folder: Path, repeat: int) -> Path:
    with gzip.open(BUNDLED_SAMPLE / "train.txt.gz", "rb") as f:
        text = f.read()
    corpus = folder / f"train{repeat}.txt"
    with open(corpus, "wb") as f:
        for _ in range(repeat):
            f.write(text if text.endswith(b"\n") else text + b"\n")
            f.write(b"<|endoftext|>\n")
    return corpus


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child), args.num_proc[0], args.vocab, args.seq_len)))
        return
    claim_json(args.json, "bench_data", keys=("command", "runs"))
    procs = sorted(set(args.num_proc or [1, default_num_proc()]))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_corpus(Path(tmp), args.repeat)
        size = corpus.stat().st_size
        print(
            f"# command: {command_line('python')}\n"
            f"# corpus: the bundled sample x {args.repeat}, {size / 2**20:.0f} MiB; "
            f"{os.cpu_count()} logical CPUs, {default_num_proc()} available to this process",
            flush=True,
        )
        runs = []
        for r in range(args.rounds):
            for n in procs:
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        str(corpus),
                        "--num_proc",
                        str(n),
                        "--vocab",
                        str(args.vocab),
                        "--seq_len",
                        str(args.seq_len),
                    ],
                    capture_output=True,
                    text=True,
                    env=dict(os.environ, TOKENIZERS_PARALLELISM="true"),
                )
                if proc.returncode != 0:
                    sys.exit(f"error: the --num_proc {n} run failed:\n{proc.stderr[-3000:]}")
                runs.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "round": r})
                print(f"round {r + 1}/{args.rounds}, num_proc {n}: {runs[-1]['total']:.1f} s", flush=True)
    table = summarize(runs, procs)
    print(f"{'phase':10s}" + "".join(f"{f'num_proc {n} (s)':>17s}" for n in procs) + f"{'ratio':>8s}")
    for phase in PHASES:
        cells = [table[n][phase] for n in procs]
        print(f"{phase:10s}" + "".join(f"{c:17.1f}" for c in cells) + f"{cells[-1] / cells[0]:8.2f}")
    for n in procs:
        t = table[n]
        print(
            f"num_proc {n}: {t['stories'] / t['tokenize']:,.0f} stories/s and {t['tokens'] / t['tokenize']:,.0f} "
            f"tokens/s tokenizing; peak RSS {t['peak_rss_mb']:,.0f} MB "
            f"(largest worker {t['peak_worker_rss_mb']:,.0f} MB)"
        )
    write_json(
        args.json,
        {
            "command": command_line("python"),
            "corpus_bytes": size,
            "repeat": args.repeat,
            "cpus": os.cpu_count(),
            "available_cpus": default_num_proc(),
            "runs": runs,
            "median": {str(n): table[n] for n in procs},
        },
    )


def summarize(runs: list[dict], procs: list[int]) -> dict:
    keys = [*PHASES, "stories", "tokens", "blocks"]
    table = {n: {k: statistics.median(r[k] for r in runs if r["num_proc"] == n) for k in keys} for n in procs}
    for n in procs:
        for k in ("peak_rss_mb", "peak_worker_rss_mb"):
            table[n][k] = max(r[k] for r in runs if r["num_proc"] == n)
    return table


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=40, help="copies of the bundled training sample")
    p.add_argument("--num_proc", type=int, nargs="+", help="default: 1 and the CPUs available")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", help="write every number here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
