"""Forward+backward throughput of one FFN layer: dense vs. our MoE vs. DeepSpeed's stock MoE.

What is measured: tokens/s of one training step (forward, loss, backward) of a single FFN
layer on a [T, d] input that requires grad, as inside a transformer. Variants:

- `dense`: the GPT-2 MLP, `FeedForward(d, ff, "gelu", bias=True)`;
- `moe`: our `MoEBlock` (router + sort-based `LocalExperts`) at E experts, top-k, capacity
  factor 1.0 in training mode, every expert the same `FeedForward` as the dense layer; and
  `moe-dropless` (capacity_factor=None) for top-1. `--experts_impl` picks the expert kernels,
  each forced, same weights: `grouped` (one `grouped_mm` per projection; skipped where torch
  refuses it, `moe.grouped_refusal`) and/or `loop` (one `FeedForward` per expert), named
  `moe-grouped` / `moe-loop` (`moe-dropless-...`). The header says which one the model takes
  by default here (`moe.experts_impl`: the loop on CPU, grouped for CUDA bf16 on sm90);
- `ds`: `deepspeed.moe.layer.MoE(ep_size=1, capacity_factor=1.0)` wrapping the same expert,
  its gate and experts loaded with our block's weights; `l_aux` joins the loss as a trainer's.

Why: with expert width = dense width, top-1 does the dense layer's FLOPs (plus routing),
so `moe / dense` shows the routing and dispatch overhead (goal: >= 0.9 at >= 8192 tokens),
and `moe / ds` compares us with the layer DeepSpeed users would otherwise take. Top-2 does
twice the expert FLOPs, so ~0.5x dense is its ceiling. At capacity factor 1.0 our block
skips dropped routes (a few % fewer FLOPs than dense); `moe-dropless` is the exact-FLOPs
comparison. DeepSpeed pads every expert to capacity, so its FLOPs are fixed.

Method: all variants live in one process and are timed in interleaved rounds (each round
times every variant once, `--iters` steps each) after warm-up. The table shows the median
round (`--stat best`: the fastest, which resists neighbours on a shared machine) and `iqr`,
the interquartile range of the rounds relative to the median (noise). `drop%`: routes
dropped by capacity in the last step. `stack ms`: the grouped path keeps per-expert weights
and stacks them every forward; the time of that copy alone (all projections of one layer,
forward; its backward, splitting the gradient, is not counted), and its share of the step.

    python tools/bench_moe.py --tokens 2048 8192 --experts 8 16 --top_k 1 2 --json bench.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from moe_dist.analysis.bench import claim_json, command_line, expert_paths, machine, require_device, sync, write_json
from moe_dist.model import moe
from moe_dist.model.configuration import MoEConfig
from moe_dist.model.moe import FeedForward, MoEBlock

COMMAND = command_line("python")


def build_ours(d, ff, E, k, cf) -> MoEBlock:
    config = MoEConfig.from_preset(
        "tiny-moe",
        hidden_size=d,
        intermediate_size=ff,
        num_local_experts=E,
        num_experts_per_tok=k,
        capacity_factor=cf,
        expert_bias=True,
    )
    block = MoEBlock(config, layer_idx=0)
    torch.nn.init.normal_(block.router.weight, std=config.initializer_range)  # as modeling._init_weights
    return block


def build_deepspeed(ours: MoEBlock, d, ff, E, k):
    """DeepSpeed's stock layer, holding the same gate and expert weights as `ours`.

    At ep_size=1 it runs in a plain process: the all-to-alls are skipped and no process
    group is needed (no init_distributed, no launcher env vars; checked with 0.19.8).
    """
    from deepspeed.moe.layer import MoE  # lazily: importing deepspeed is slow and logs

    layer = MoE(
        hidden_size=d, expert=FeedForward(d, ff, "gelu", bias=True), num_experts=E, ep_size=1, k=k, capacity_factor=1.0
    )
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for theirs, mine in zip(layer.deepspeed_moe.experts.deepspeed_experts, ours.experts):
            theirs.load_state_dict(mine.state_dict())
    return layer


class Variant:
    """One layer, the step that trains it, and its timings."""

    def __init__(self, name, E, k, module, kind, impl=None):
        self.name, self.E, self.k, self.module, self.kind = name, E, k, module, kind
        if impl:
            module.experts.impl = impl
        self.impl = impl  # "grouped" | "loop" for our block, None for the others
        self.stack_s: float | None = None  # grouped only: see stack_seconds
        self.rounds: dict[int, list[float]] = {}  # tokens -> seconds per step, one per round
        self.drop: dict[int, float | None] = {}

    def step(self, x_TD: torch.Tensor, g_TD: torch.Tensor) -> None:
        self.module.zero_grad(set_to_none=True)
        x_TD.grad = None
        if self.kind == "dense":
            out, aux = self.module(x_TD), 0.0
        elif self.kind == "ours":
            out, aux = self.module(x_TD)
        else:
            out, aux, _ = self.module(x_TD)
        ((out * g_TD).sum() + aux).backward()

    def drop_fraction(self, T: int) -> float | None:
        if self.kind == "ours":
            return float(self.module.router.stats["drop_fraction"])
        if self.kind == "ds":  # exp_counts is counted before drops; the buffer holds E * C slots
            counts = self.module.deepspeed_moe.exp_counts.float()
            cap = max(int(-(-T * self.k // self.E)), 4)  # ceil(T*k/E * 1.0), min_capacity 4
            return float((counts - counts.clamp(max=cap)).sum() / (T * self.k))
        return None


def build_variants(args) -> list[Variant]:
    d, ff = args.d_model, args.ffn
    _, impls = expert_paths(torch.device(args.device), getattr(torch, args.dtype), d, ff, args.experts_impl)
    variants = [Variant("dense", 0, 1, FeedForward(d, ff, "gelu", bias=True), "dense")]
    for E in args.experts:
        for k in args.top_k:
            ours = build_ours(d, ff, E, k, 1.0)
            for kind, cf in [("moe", 1.0)] + [("moe-dropless", None)] * (k == 1):
                for impl in impls:
                    block = build_ours(d, ff, E, k, cf)
                    block.load_state_dict(ours.state_dict())
                    name = f"{kind}-{impl} E{E} k{k}"
                    variants.append(Variant(name, E, k, block, "ours", impl))
            if not args.no_deepspeed:
                variants.append(Variant(f"ds E{E} k{k}", E, k, build_deepspeed(ours, d, ff, E, k), "ds"))
    return variants


def stack_seconds(v: Variant, dtype: torch.dtype, device: torch.device, reps: int = 5) -> float:
    """The per-forward weight stacking of the grouped path alone: median seconds over `reps` tries."""
    experts, names = v.module.experts, ["up_proj", "gate_proj", "down_proj"]
    names = [n for n in names if getattr(experts[0], n) is not None]
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        stacks = [experts.stacked(n, dtype) for n in names]
        sync(device)
        times.append(time.perf_counter() - t0)
        del stacks
    return statistics.median(times)


def run(args) -> list[Variant]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    variants = build_variants(args)
    for v in variants:
        v.module.to(device=device, dtype=dtype).train()
    for T in args.tokens:
        x_TD = torch.randn(T, args.d_model, device=device, dtype=dtype, requires_grad=True)
        g_TD = torch.randn(T, args.d_model, device=device, dtype=dtype) / T
        for v in variants:  # warm-up: allocator, kernels, DeepSpeed's lazy state
            for _ in range(args.warmup):
                v.step(x_TD, g_TD)
            v.rounds[T] = []
        for _ in range(args.repeats):
            for v in variants:
                sync(device)
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    v.step(x_TD, g_TD)
                sync(device)
                v.rounds[T].append((time.perf_counter() - t0) / args.iters)
        for v in variants:
            v.drop[T] = v.drop_fraction(T)
    for v in variants:
        v.stack_s = stack_seconds(v, dtype, device) if v.impl == "grouped" else None
    return variants


def report(args, variants: list[Variant]) -> dict:
    stat = statistics.median if args.stat == "median" else min  # seconds per step over the rounds
    rows = []
    by_name = {v.name: v for v in variants}
    for T in args.tokens:
        dense = T / stat(by_name["dense"].rounds[T])
        for v in variants:
            tok_s = T / stat(v.rounds[T])
            ds = by_name.get(f"ds E{v.E} k{v.k}")
            ds_tok_s = T / stat(ds.rounds[T]) if ds is not None and v.kind == "ours" else None
            q1, _, q3 = statistics.quantiles(v.rounds[T], n=4) if len(v.rounds[T]) > 1 else [v.rounds[T][0]] * 3
            iqr = (q3 - q1) / statistics.median(v.rounds[T])  # noise: interquartile range of the rounds
            loop = by_name.get(v.name.replace("-grouped ", "-loop ")) if v.impl == "grouped" else None
            rows.append(
                dict(
                    variant=v.name,
                    tokens=T,
                    experts_impl=v.impl,
                    tok_s=tok_s,
                    vs_dense=tok_s / dense,
                    vs_ds=tok_s / ds_tok_s if ds_tok_s else None,
                    vs_loop=stat(loop.rounds[T]) / stat(v.rounds[T]) if loop else None,
                    drop=v.drop[T],
                    iqr=iqr,
                    median_tok_s=T / statistics.median(v.rounds[T]),
                    best_tok_s=T / min(v.rounds[T]),
                    seconds=v.rounds[T],
                    stack_ms=1e3 * v.stack_s if v.stack_s else None,
                    stack_share=v.stack_s / stat(v.rounds[T]) if v.stack_s else None,
                )
            )
    fmt = "{:<27} {:>6} {:>11} {:>7} {:>6} {:>6} {:>6} {:>6} {:>13}"
    print(fmt.format("variant", "tokens", "tok/s", "/dense", "/ds", "/loop", "drop%", "iqr", "stack ms (%)"))
    ratio = lambda x: f"{x:.2f}x" if x else "-"  # noqa: E731
    for r in rows:
        stack = f"{r['stack_ms']:.2f} ({100 * r['stack_share']:.1f}%)" if r["stack_ms"] else "-"
        print(
            fmt.format(
                r["variant"],
                r["tokens"],
                f"{r['tok_s']:,.0f}",
                ratio(r["vs_dense"]),
                ratio(r["vs_ds"]),
                ratio(r["vs_loop"]),
                f"{100 * r['drop']:.1f}" if r["drop"] is not None else "-",
                f"{100 * r['iqr']:.0f}%",
                stack,
            )
        )
    load_avg = os.getloadavg()  # read as the run ends: neighbours on a shared machine, and our own threads
    print(f"# load average {load_avg[0]:.2f} (1 min) at the end of the run")
    return dict(
        command=COMMAND,
        machine=machine(torch.device(args.device)),
        load_avg=load_avg,
        default_impl=default_impl(args),
        args=vars(args),
        rows=rows,
    )


def default_impl(args) -> str:
    """The expert path the model takes here unless forced (`moe.experts_impl`)."""
    return moe.experts_impl(torch.device(args.device), getattr(torch, args.dtype), args.d_model, args.ffn)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d_model", type=int, default=128, help="model width (tiny-* presets: 128)")
    p.add_argument("--ffn", type=int, default=512, help="dense FFN width = expert width")
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192], help="tokens per step")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16])
    p.add_argument("--top_k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds")
    p.add_argument(
        "--stat",
        choices=["median", "best"],
        default="median",
        help="round statistic for tok/s and ratios; 'best' (fastest round) resists a shared machine",
    )
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--iters", type=int, default=3, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant per token count")
    p.add_argument("--dtype", choices=["fp32", "bf16", "float32", "bfloat16"], default="fp32")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_deepspeed", action="store_true", help="skip DeepSpeed's stock layer")
    p.add_argument(
        "--experts_impl",
        nargs="+",
        choices=["grouped", "loop"],
        default=["grouped", "loop"],
        help="expert kernels to time side by side: grouped GEMM (where torch has one) and/or the loop",
    )
    p.add_argument("--json", help="write every number (and per-round timings) here")
    args = p.parse_args(argv)
    args.dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(args.dtype, args.dtype)
    return args


def main(argv=None):
    args = parse_args(argv)
    claim_json(args.json, "bench_moe")  # before any work: never over a file we did not write
    if args.threads:
        torch.set_num_threads(args.threads)
    require_device(args.device)
    print(f"# command: {COMMAND}")
    print(f"# machine: {machine(torch.device(args.device))}")
    print(
        f"# d_model={args.d_model} ffn={args.ffn} dtype={args.dtype} device={args.device}; "
        f"{args.stat} of {args.repeats} interleaved rounds x {args.iters} fwd+bwd steps; "
        f"the model's default expert path here: {default_impl(args)}"
    )
    write_json(args.json, report(args, run(args)))


if __name__ == "__main__":
    main()
