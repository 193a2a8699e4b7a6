"""Our training step against the stock transformers class's, on the same weights: tokens/s side by side.

What: per shape, a random `Qwen3MoeForCausalLM` (the released fine-grained MoE family), and our model
converted from it exactly (`--init_from`'s path: `convert.stock_import.converted_model`). Each variant runs
forward, backward and a fused AdamW step on the same random tokens, dropless, router losses off:
- `stock grouped_mm`: transformers' default experts implementation (`grouped_mm`);
- `stock eager`: its per-expert loop;
- `ours <impl>`: our `LocalExperts` with each of `--experts_impl` forced (`loop`, `grouped`), and which one
  our model takes here by default (`moe.experts_impl`).
Shapes, the two kinds of released MoE scaled down: `fine` (many narrow experts, as in Qwen3-MoE) d 256,
64 experts of width 64, top-8; `coarse` (few wide experts, as in Mixtral) d 512, 8 experts of width 1024,
top-2; both 2 layers, 8 x 256 = 2048 tokens, vocab 1024, 8 heads of 32 (2 KV heads).

Method: after `--warmup` steps each, the variants are timed one step at a time in interleaved rounds
(A B C ... A B C ...), so a neighbour's load hits all alike; the table gives the median over `--rounds`,
`iqr` (interquartile range / median), and each variant's ratio to the stock class's fastest path.

    python tools/bench_stock.py --threads 2 --rounds 10 --json docs/bench/bench_stock.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moe_dist.analysis.bench import claim_json, command_line, expert_paths, machine, write_json
from moe_dist.model.moe import LocalExperts

SHAPES = {
    "fine": dict(hidden_size=256, num_experts=64, moe_intermediate_size=64, num_experts_per_tok=8),
    "coarse": dict(hidden_size=512, num_experts=8, moe_intermediate_size=1024, num_experts_per_tok=2),
}


def stock_model(shape: dict, folder: Path, seed: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=4 * shape["hidden_size"],
        max_position_embeddings=256,
        norm_topk_prob=True,
        router_aux_loss_coef=0.0,
        **shape,
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    model.save_pretrained(folder)
    return model


def our_model(folder: Path, impl: str):
    from moe_dist import MoEConfig
    from moe_dist.convert.stock_import import converted_model, read_init_config

    init = read_init_config(folder)
    model = converted_model(init, MoEConfig(**init.fields))
    for experts in (m for m in model.modules() if isinstance(m, LocalExperts)):
        experts.impl = impl
    return model


class Variant:
    def __init__(self, name: str, model, ids: torch.Tensor):
        self.name, self.model, self.ids = name, model.train(), ids
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        self.seconds: list[float] = []

    def step(self) -> float:
        start = time.perf_counter()
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def run_shape(name: str, shape: dict, args) -> list[dict]:
    ids = torch.randint(1024, (8, 256), generator=torch.Generator().manual_seed(args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        stock = stock_model(shape, Path(tmp), args.seed)
        variants = []
        for impl in ("grouped_mm", "eager"):
            model = stock if impl == "grouped_mm" else stock_model(shape, Path(tmp) / "eager", args.seed)
            model.set_experts_implementation(impl)
            variants.append(Variant(f"stock {impl}", model, ids))
        default, runnable = expert_paths(
            torch.device("cpu"), torch.float32, shape["hidden_size"], shape["moe_intermediate_size"], args.experts_impl
        )
        variants += [
            Variant(f"ours {impl}" + (" (default)" if impl == default else ""), our_model(Path(tmp), impl), ids)
            for impl in runnable
        ]
    for v in variants:
        for _ in range(args.warmup):
            v.step()
    for _ in range(args.rounds):
        for v in variants:
            v.seconds.append(v.step())
    tokens = ids.numel()
    rows = [
        {
            "shape": name,
            "variant": v.name,
            "tok_s": tokens / statistics.median(v.seconds),
            "step_ms": 1000 * statistics.median(v.seconds),
            "iqr": _iqr(v.seconds),
            "seconds": v.seconds,
        }
        for v in variants
    ]
    best_stock = max(r["tok_s"] for r in rows if r["variant"].startswith("stock"))
    for r in rows:
        r["vs_stock_best"] = r["tok_s"] / best_stock
    return rows


def _iqr(xs: list[float]) -> float:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return (q[2] - q[0]) / statistics.median(xs)


def main(argv=None) -> None:
    args = parse_args(argv)
    claim_json(args.json, "bench_stock")
    torch.set_num_threads(args.threads)
    print(f"# command: {command_line('python')}\n# machine: {machine(torch.device('cpu'))}")
    rows = []
    for name in args.shapes:
        rows += run_shape(name, SHAPES[name], args)
        print(f"{'shape':7s} {'variant':26s} {'tok/s':>9s} {'step ms':>8s} {'iqr':>5s} {'x stock best':>12s}")
        for r in (r for r in rows if r["shape"] == name):
            print(
                f"{r['shape']:7s} {r['variant']:26s} {r['tok_s']:9,.0f} {r['step_ms']:8.1f} {r['iqr']:5.0%} "
                f"{r['vs_stock_best']:12.2f}",
                flush=True,
            )
    write_json(
        args.json,
        {
            "command": command_line("python"),
            "machine": machine(torch.device("cpu")),
            "shapes": {k: SHAPES[k] for k in args.shapes},
            "rows": rows,
        },
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--experts_impl", nargs="+", choices=["grouped", "loop"], default=["loop", "grouped"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every number (and per-round timings) here")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
