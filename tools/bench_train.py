"""Whole training step, dense vs. its MoE twins with the same active parameters: tokens/s and memory.

What is measured: the project's real step, `AccelerateEngine(EngineSpec).setup(model)` then
`engine.train_batch(...)` (forward, backward, grad clip, GuardedAdamW step, router bias update),
on random tokens (or `--train_file` blocks) of `--micro_batch_size` x `--seq_len`, bf16 autocast
on GPU and fp32 on CPU. Variants, all in one process: the dense preset (`tiny-dense`, or
`seed-baseline` at `--scale seed`) and, per `--experts` E, its top-1 MoE twin (`tiny-moe` /
`seed-moe-e{E}`: expert width = dense FFN width, so the same active parameters and FFN FLOPs)
at capacity factor 1.0 (the config default) and dropless (the accelerate trainer's default).
`--experts_impl` picks the expert kernels timed side by side, each forced: `grouped` (one
`grouped_mm` per projection; skipped where torch refuses it, `moe.grouped_refusal`) and `loop`
(one `FeedForward` per expert); variants are named `... grouped` / `... loop`. The header says
which one the model takes by default here (`moe.experts_impl`: the loop on CPU, grouped for
CUDA bf16 on sm90).

Why: a top-1 MoE does the dense model's FLOPs plus routing, so `/dense` is the price of routing,
dispatch and the optimizer over E times the FFN parameters. Goal context in GOAL below.

Vocabulary: at tiny scale 4096, the quick start's `train:4096` tokenizer (GPT-2's 50257 would
make the lm_head ~90% of tiny's FLOPs and hide the FFN); at seed scale the preset's 50257.

Method: after `--warmup` steps each, the variants are timed one step at a time in interleaved
rounds (A B C ... A B C ...), so a neighbour's load hits all alike; the table shows the median
over `--rounds` and `iqr` (interquartile range / median: the noise). `opt ms`: the median
`GuardedAdamW.step()` alone (after a forward+backward): AdamW's cost grows with all parameters,
not the active ones. `--profile`: per op, one MoE step's time minus dense's (torch.profiler).
CPU threads: on a shared machine one busy neighbour stalls every multi-threaded op; there,
`--threads 1` gives stable numbers, and the ratios differ from multi-threaded ones.
Memory: `state MB` is each variant's resident training state, counted from its tensors
(parameters + buffers + optimizer moments; gradients live only inside the step). `peak MB`: on
CUDA, the step's allocator high-water mark (`max_memory_allocated`, reset per variant) above what
was allocated before it, plus the variant's own state, so the other resident variants do not
count. On CPU a process has one RSS high-water mark and freed memory stays cached by malloc, so
variants in one process cannot be told apart: `--isolate` runs each variant alone in a fresh
process, resets Linux's peak-RSS counter (VmHWM, via /proc/self/clear_refs) once Python, torch
and the batch are loaded (`base MB`), and reports the variant's peak RSS above that base.

    python tools/bench_train.py --threads 2 --isolate --json bench_train.json  # tiny, CPU
    python tools/bench_train.py --scale seed --device cuda --json seed.json     # seed shape, GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from moe_dist.analysis import bench
from moe_dist.analysis.bench import claim_json, command_line, machine, require_device, sync, write_json
from moe_dist.analysis.costs import flops_per_token
from moe_dist.model.configuration import PRESETS, MoEConfig
from moe_dist.model.modeling import MoEForCausalLM
from moe_dist.model.moe import LocalExperts
from moe_dist.parallel.engines import AccelerateEngine, EngineSpec
from moe_dist.train.args import EngineArgs, OptimArgs, RunArgs

COMMAND = command_line("python")
GOAL = (
    "seed reference (seed shape, one GPU, bf16): E=8 top-1 0.26x dense tok/s (40.4k vs 158.1k), "
    "E=16 0.16x. Goals: seed shape on GPU >= 0.85x for E=8, >= 0.8x for E=16; tiny on CPU "
    ">= 0.92x / 0.85x at 1024 tokens/step, >= 0.97x / 0.95x at 4096"
)


def goal_ratios(args) -> dict[int, float]:
    """The /dense tok/s ratio set as the goal per expert count (GOAL), for this run's scale and tokens per step."""
    if args.scale == "seed":
        return {8: 0.85, 16: 0.8}
    return {8: 0.97, 16: 0.95} if args.micro_batch_size * args.seq_len >= 4096 else {8: 0.92, 16: 0.85}


MB = 2**20


def variants_to_run(args) -> list[tuple[str, int, float | None, str | None]]:
    """(name, experts, capacity factor, experts impl): dense, then per E its twin at capacity 1.0 and
    dropless, with each of `--experts_impl`."""
    every = [("dense", 0, None, None)] + [
        (f"e{E} {name} {impl}", E, cf, impl)
        for E in args.experts
        for name, cf in (("cf1", 1.0), ("dropless", None))
        for impl in args.experts_impl
    ]
    return [v for v in every if args.only in (None, v[0])]


def build_config(args, E: int, capacity_factor: float | None) -> MoEConfig:
    vocab = dict(vocab_size=args.vocab_size)
    if E == 0:
        return MoEConfig.from_preset("tiny-dense" if args.scale == "tiny" else "seed-baseline", **vocab)
    name = "tiny-moe" if args.scale == "tiny" else f"seed-moe-e{E}"
    name = name if name in PRESETS else "seed-moe-e8"  # the same block at any E
    return MoEConfig.from_preset(name, num_local_experts=E, capacity_factor=capacity_factor, **vocab)


def engine_spec(args) -> EngineSpec:
    # The training CLI's defaults: lr, betas, decay, schedule, timeout.
    o, max_steps, timeout = OptimArgs(), RunArgs(output_dir="-").max_steps, EngineArgs().dist_timeout
    return EngineSpec(
        micro_batch_size=args.micro_batch_size,
        grad_accum=1,
        grad_clip=1.0,  # as plan._engine_spec
        precision="bf16" if args.device.startswith("cuda") else "fp32",
        ep_size=1,
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        adam_eps=o.adam_eps,
        weight_decay=o.weight_decay,
        warmup_steps=o.warmup_steps,
        max_steps=max_steps,
        min_lr_ratio=o.min_lr_ratio,
        dist_timeout_s=timeout,
    )


def expert_paths(args) -> tuple[str, list[str]]:
    """The model's default expert path here, and the `--experts_impl` ones that can run."""
    config = build_config(args, max(args.experts), None)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32  # as engine_spec's precision
    return bench.expert_paths(
        torch.device(args.device), dtype, config.hidden_size, config.moe_intermediate_size, args.experts_impl
    )


class Variant:
    """One model behind its own engine, and its timings."""

    def __init__(self, args, name: str, E: int, capacity_factor: float | None, impl: str | None):
        self.name, self.E = name, E
        torch.manual_seed(args.seed)  # every variant starts from the same seed
        model = MoEForCausalLM(build_config(args, E, capacity_factor))
        for experts in (m for m in model.modules() if isinstance(m, LocalExperts)):
            experts.impl = impl
        self.impl = impl
        self.params_total, self.params_active = model.num_parameters(), model.num_active_parameters()
        self.engine = AccelerateEngine(engine_spec(args))
        self.engine.setup(model)
        self.device = self.engine.device
        self.seconds: list[float] = []
        self.opt_seconds: list[float] = []
        self.peak_mb: float | None = None  # CUDA only; see cuda_peak_mb

    def step(self, batches) -> None:
        self.engine.train_batch(batches)  # the trainer's whole optimizer step

    def optimizer_step_seconds(self, batches) -> float:
        """`GuardedAdamW.step()` alone, after a forward and backward (no clipping)."""
        for input_ids, labels in batches:
            self.engine.acc.backward(
                self.engine.wrapped(input_ids=input_ids.to(self.device), shift_labels=labels.to(self.device)).loss
            )
        sync(self.device)
        start = time.perf_counter()
        self.engine.guard.step()
        sync(self.device)
        self.engine.guard.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def state_bytes(self) -> int:
        """Parameters, buffers and optimizer moments: what stays allocated between steps."""
        model, opt = self.engine.model, self.engine.guard
        tensors = [*model.parameters(), *model.buffers()]
        tensors += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def cuda_peak_mb(self, batches) -> float:
        """This step's allocator high-water mark above the memory before it, plus this variant's state."""
        sync(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step(batches)
        sync(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - before + self.state_bytes()) / MB


def make_batches(args):
    """[(input_ids, shift_labels)]: one optimizer step of one micro-batch, as the trainer feeds it."""
    gen = torch.Generator().manual_seed(args.seed)
    if args.train_file:
        from moe_dist.train.data import DataConfig, build_tokenizer, load_text_splits, pack_blocks

        cfg = DataConfig(
            train_file=args.train_file,
            valid_file=args.train_file,
            seq_len=args.seq_len,
            tokenizer=f"train:{args.vocab_size}",
            cache_dir=tempfile.mkdtemp(prefix="bench_train_"),
        )
        texts = list(itertools.islice(load_text_splits(cfg)[0], 4000))  # plenty of blocks for a benchmark
        tokenizer = build_tokenizer(cfg.tokenizer, texts, None)
        blocks = torch.from_numpy(pack_blocks(texts, tokenizer, args.seq_len).astype("int64"))
        args.vocab_size = -(-len(tokenizer) // 64) * 64  # rounded up, as the trainer does
        block = blocks[torch.randperm(len(blocks), generator=gen)[: args.micro_batch_size]]
    else:
        block = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_len + 1), generator=gen)
    return [(block[:, :-1].contiguous(), block[:, 1:].contiguous())]


def reset_peak_rss() -> float | None:
    """Restart the kernel's peak-RSS counter (Linux >= 4.0); the current RSS in MB, the new base."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status_mb("VmRSS")


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def run(args, batches) -> list[Variant]:
    variants = [Variant(args, *v) for v in variants_to_run(args)]
    for v in variants:  # warm-up: allocator, kernels, optimizer state
        for _ in range(args.warmup):
            v.step(batches)
    for _ in range(args.rounds):  # interleaved: A B C ... A B C ...
        for v in variants:
            sync(v.device)
            start = time.perf_counter()
            v.step(batches)
            sync(v.device)
            v.seconds.append(time.perf_counter() - start)
    for _ in range(args.rounds):
        for v in variants:
            v.opt_seconds.append(v.optimizer_step_seconds(batches))
    for v in variants:
        v.peak_mb = v.cuda_peak_mb(batches) if v.device.type == "cuda" else None
    if args.profile:
        profile(variants, batches)
    return variants


def op_times(v: Variant, batches, steps: int = 3) -> dict[str, tuple[float, float]]:
    """op -> (self ms, calls) per step, over `steps` profiled steps (device time on CUDA, else CPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = v.device.type == "cuda"
    with torch_profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(steps):
            v.step(batches)
        sync(v.device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    out = {e.key: (getattr(e, key) / 1e3 / steps, e.count / steps) for e in prof.key_averages()}
    opt = [e.cpu_time_total for e in prof.key_averages() if e.key.startswith("Optimizer.step#")]
    return out | {"(optimizer step, CPU incl. children)": (sum(opt) / 1e3 / steps, 1)}


def profile(variants: list[Variant], batches) -> None:
    """Per op, the largest dropless MoE's self time minus dense's: where the extra time goes."""
    dense, moe = variants[0], [v for v in variants if "dropless" in v.name][-1]
    d, m = op_times(dense, batches), op_times(moe, batches)
    print(f"\n# profile: self ms per step (3 steps), {moe.name} minus dense, largest differences first")
    print("{:<46} {:>9} {:>9} {:>9} {:>8} {:>8}".format("op", "dense ms", "moe ms", "diff", "dense n", "moe n"))
    for op in sorted(d | m, key=lambda k: -abs(m.get(k, (0, 0))[0] - d.get(k, (0, 0))[0]))[:25]:
        (dt, dn), (mt, mn) = d.get(op, (0, 0)), m.get(op, (0, 0))
        print(f"{op[:46]:<46} {dt:9.2f} {mt:9.2f} {mt - dt:+9.2f} {dn:8.0f} {mn:8.0f}")
    total = [sum(t for k, (t, _) in x.items() if not k.startswith("(")) for x in (d, m)]
    print(f"# all ops: dense {total[0]:.1f} ms, moe {total[1]:.1f} ms per step (profiler overhead included)")


def isolated_peaks(args) -> dict[str, dict]:
    """CPU: each variant alone in a fresh process (this command plus --only NAME, one round): its peak RSS."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, *_ in variants_to_run(args):
            path = os.path.join(tmp, "child.json")
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    *args.argv,
                    "--warmup",
                    "1",
                    "--rounds",
                    "1",
                    "--only",
                    name,
                    "--json",
                    path,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            with open(path) as f:
                out[name] = json.load(f)
    return out


def report(args, variants: list[Variant], rss_base_mb: float) -> dict:
    tokens = args.micro_batch_size * args.seq_len
    dense_s = statistics.median(variants[0].seconds) if variants[0].E == 0 else None
    peaks = isolated_peaks(args) if args.isolate and args.device == "cpu" else {}
    rows = []
    for v in variants:
        med = statistics.median(v.seconds)
        q1, _, q3 = statistics.quantiles(v.seconds, n=4) if len(v.seconds) > 1 else [med] * 3
        child, stats = peaks.get(v.name, {}), v.engine.model.routing_stats().values()
        rows.append(
            dict(
                variant=v.name,
                experts=v.E,
                experts_impl=v.impl,
                params_total=v.params_total,
                params_active=v.params_active,
                step_ms=1e3 * med,
                tok_s=tokens / med,
                vs_dense=dense_s / med if dense_s else None,
                goal=goal_ratios(args).get(v.E),
                iqr=(q3 - q1) / med,
                opt_ms=1e3 * statistics.median(v.opt_seconds),
                state_mb=v.state_bytes() / MB,
                seconds=v.seconds,
                drop=statistics.mean(float(s["drop_fraction"]) for s in stats) if stats else None,
                peak_mb=v.peak_mb if v.peak_mb is not None else child.get("rss_peak_above_base_mb"),
                base_mb=child.get("rss_base_mb"),
            )
        )
    flops = flops_per_token(build_config(args, 0, None), context=args.seq_len)
    return dict(
        command=COMMAND,
        machine=machine(torch.device(args.device)),
        load_avg=os.getloadavg(),
        goal=GOAL,
        tokens_per_step=tokens,
        ffn_flop_share=flops["dense_ffn"] / flops["total"],
        args=vars(args),
        rows=rows,
        rss_base_mb=rss_base_mb,
        rss_peak_above_base_mb=None if rss_base_mb is None else _proc_status_mb("VmHWM") - rss_base_mb,
    )


def print_table(r: dict) -> None:
    a = r["args"]
    print(f"# command: {r['command']}\n# machine: {r['machine']}; load average {r['load_avg'][0]:.2f}\n# {r['goal']}")
    print(
        f"# scale {a['scale']}, vocab {a['vocab_size']}, {a['micro_batch_size']} x {a['seq_len']} = "
        f"{r['tokens_per_step']} tokens/step, {'bf16' if a['device'].startswith('cuda') else 'fp32'} on "
        f"{a['device']}; the FFN is {100 * r['ffn_flop_share']:.0f}% of dense forward FLOPs; median of "
        f"{a['rounds']} interleaved rounds; the model's default expert path here: {a['default_impl']}"
    )
    fmt = "{:<18} {:>7} {:>7} {:>8} {:>8} {:>6} {:>10} {:>5} {:>7} {:>8} {:>8} {:>8} {:>6}"
    print(
        fmt.format(
            "variant",
            "params",
            "active",
            "step ms",
            "tok/s",
            "/dense",
            "goal",
            "iqr",
            "opt ms",
            "state MB",
            "peak MB",
            "base MB",
            "drop%",
        )
    )
    for w in r["rows"]:
        ratio = f"{w['vs_dense']:.2f}x" if w["vs_dense"] else "-"
        goal = f">={w['goal']} {'ok' if w['vs_dense'] >= w['goal'] else 'MISS'}" if w["goal"] and w["vs_dense"] else ""
        num = lambda x, f=".0f": "-" if x is None else format(x, f)  # noqa: E731
        print(
            fmt.format(
                w["variant"],
                f"{w['params_total'] / 1e6:.1f}M",
                f"{w['params_active'] / 1e6:.1f}M",
                f"{w['step_ms']:.1f}",
                f"{w['tok_s']:,.0f}",
                ratio,
                goal,
                f"{100 * w['iqr']:.0f}%",
                f"{w['opt_ms']:.1f}",
                f"{w['state_mb']:.0f}",
                num(w["peak_mb"]),
                num(w["base_mb"]),
                num(None if w["drop"] is None else 100 * w["drop"], ".1f"),
            )
        )
    if not a["device"].startswith("cuda") and not a["isolate"]:
        print("# peak MB on CPU needs --isolate: RSS is one high-water mark per process, shared by every variant")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=["tiny", "seed"], help="tiny-* or seed-* presets (default: seed on cuda)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument(
        "--vocab_size",
        type=int,
        help="default: 4096 at tiny (the quick start's train:4096 tokenizer), the preset's 50257 (gpt2) at seed",
    )
    p.add_argument("--seq_len", type=int, help="default: the preset's context (tiny 128, seed 256)")
    p.add_argument("--micro_batch_size", type=int, help="sequences per step (default: tiny 8, seed 32)")
    p.add_argument(
        "--train_file", help="time on packed blocks of this text (a train:VOCAB_SIZE BPE) instead of random tokens"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    p.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds of one step each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--experts_impl",
        nargs="+",
        choices=["grouped", "loop"],
        default=["grouped", "loop"],
        help="expert kernels to time side by side: grouped GEMM (where torch has one) and/or the loop",
    )
    p.add_argument("--isolate", action="store_true", help="CPU: peak RSS of each variant in a fresh process")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one dense and one MoE step")
    p.add_argument("--only", help=argparse.SUPPRESS)  # one variant: the --isolate child
    p.add_argument("--json", help="write every number (and per-round timings) here")
    args = p.parse_args(argv)
    args.scale = args.scale or ("seed" if args.device.startswith("cuda") else "tiny")
    seed = args.scale == "seed"
    args.vocab_size = args.vocab_size or (MoEConfig.vocab_size if seed else 4096)
    args.seq_len = args.seq_len or PRESETS["seed-baseline" if seed else "tiny-dense"]["max_position_embeddings"]
    args.micro_batch_size = args.micro_batch_size or (32 if seed else 8)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what an --isolate child repeats
    if args.only:  # an --isolate child measures, and neither recurses nor profiles
        args.isolate = args.profile = False
    if min(args.rounds, args.micro_batch_size, args.threads) < 1 or args.warmup < 0:
        p.error("--rounds, --micro_batch_size and --threads must be >= 1, --warmup >= 0")
    require_device(args.device, p.error)
    args.default_impl, args.experts_impl = expert_paths(args)
    return args


def main(argv=None):
    args = parse_args(argv)
    claim_json(args.json, "bench_train")  # before any work: never over a file we did not write
    torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and torch.device(args.device).index is not None:
        # The engine's Accelerator places a single process on torch.device("cuda"), i.e. the
        # current device: make that the one asked for (--device cuda:N), not cuda:0.
        torch.cuda.set_device(torch.device(args.device))
    batches = make_batches(args)
    rss_base_mb = reset_peak_rss() if args.only else None  # an --isolate child: its variant's peak only
    result = report(args, run(args, batches), rss_base_mb)
    if not args.only:
        print_table(result)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
