"""Expert all-to-all: microbenchmark, and its share of a real training step.

    deepspeed --num_gpus 2 tools/profile_alltoall.py --deepspeed ds_configs/cpu_ep2.json --model tiny-moe --out DIR

The model, process groups and engine are built as the trainer builds them (`plan_run`,
`DeepSpeedEngine.setup`: expert parallelism, parameter groups, `deepspeed.initialize`), with
`"wall_clock_breakdown": true` added to the DeepSpeed config. Then, on every rank:

1. Microbenchmark. `deepspeed.comm.all_to_all_single` (the call DeepSpeed's `_AllToAll` makes;
   it forwards to `torch.distributed.all_to_all_single`) on the MoE layers' own expert-parallel
   group (`ep_size_N`; with world > ep_size every EP group runs at once, as in training), for each
   message size (bytes each rank sends, its whole buffer): `--warmup` untimed calls, then
   `--repeats` timed ones, each after a barrier and between device syncs. A call lasts until
   its slowest rank is done (max over the group); the table shows the median call.
   algbw = size / time, busbw = algbw x (n-1)/n, as nccl-tests defines them for all-to-all.
2. Training step. `--warmup_steps`, then `--steps` timed calls of the trainer's own
   `engine.train_batch` on random tokens. DeepSpeed's MOELayer calls the module-level name
   `sharded_moe._AllToAll`; a probe puts an autograd Function there whose forward and backward
   both run DeepSpeed's `_AllToAll.forward` between device syncs, so every expert all-to-all,
   forward and backward, is timed and its input bytes counted. DeepSpeed's own `1st_a2a` /
   `2nd_a2a` layer timers cover the forward only and are reported beside the probe's forward
   time as a cross-check. Bytes are compared with `moe_dist.analysis.comm_cost.step_alltoall_bytes`.

Caveats: an all-to-all's time includes waiting for the slowest rank to arrive; the syncs around
each one remove any overlap a GPU step had, so the share is that of exposed communication.
Outputs in `--out`: report.md, alltoall.json, alltoall.png (written by rank 0).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moe_dist.analysis.bench import command_line, machine, write_json
from moe_dist.analysis.comm_cost import algorithm_bandwidth, bus_bandwidth, step_alltoall_bytes
from moe_dist.model.modeling import MoEForCausalLM
from moe_dist.parallel.engines import make_engine
from moe_dist.train.args import EngineArgs, ModelArgs, RunArgs
from moe_dist.train.data import DataConfig
from moe_dist.train.plan import plan_run

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SIZES = [4 << 10 << i for i in range(15)]  # 4 KiB, 8 KiB, ..., 64 MiB


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deepspeed", required=True, help="DeepSpeed JSON, as for launch/train.py (moe.ep_size >= 2)")
    p.add_argument("--model", default="tiny-moe", help="preset name")
    p.add_argument("--capacity_factor", type=float, help="override the preset's training capacity factor")
    p.add_argument("--dropless", action="store_true", help="no capacity limit (no analytic byte count then)")
    p.add_argument("--vocab_size", type=int, help="override the preset's vocabulary")
    p.add_argument("--seq_len", type=int, help="tokens per sequence (default: the model's context)")
    p.add_argument("--sizes", type=parse_size, nargs="+", default=DEFAULT_SIZES, help="bytes per rank, e.g. 4K 64M")
    p.add_argument("--warmup", type=int, default=10, help="untimed all-to-alls per size")
    p.add_argument("--repeats", type=int, default=20, help="timed all-to-alls per size (median taken)")
    p.add_argument("--warmup_steps", type=int, default=2, help="untimed training steps")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (median taken)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for report.md, alltoall.json, alltoall.png")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return p.parse_args(argv)


class AllToAllProbe:
    """While installed, times and sizes every `_AllToAll` of DeepSpeed's MoE layers, both directions."""

    def __init__(self, sync):
        from deepspeed.moe import sharded_moe

        self.module, self.original, self.sync = sharded_moe, sharded_moe._AllToAll, sync
        self.calls: list[tuple[str, int, float]] = []  # (direction, input bytes, seconds)
        probe = self

        class TimedAllToAll(torch.autograd.Function):
            @staticmethod
            def forward(ctx, group, x):
                ctx.group = group
                return probe.exchange("fwd", ctx, group, x)

            @staticmethod
            def backward(ctx, grad):  # as DeepSpeed's: the same all-to-all on the gradient
                return None, probe.exchange("bwd", ctx, ctx.group, grad)

        self.timed = TimedAllToAll

    def exchange(self, direction: str, ctx, group, x: torch.Tensor) -> torch.Tensor:
        self.sync()
        start = time.perf_counter()
        y = self.original.forward(ctx, group, x)
        self.sync()
        self.calls.append((direction, x.nbytes, time.perf_counter() - start))
        return y

    def __enter__(self):
        self.module._AllToAll = self.timed
        return self

    def __exit__(self, *exc):
        self.module._AllToAll = self.original


def bench_alltoall(group, args, dtype, device, sync) -> list[dict]:
    import deepspeed.comm as ds_dist

    n, rows = dist.get_world_size(group), []
    for size in args.sizes:
        x = torch.randn(size // dtype.itemsize, dtype=dtype, device=device)
        out = torch.empty_like(x)
        for _ in range(args.warmup):
            ds_dist.all_to_all_single(out, x, group=group)
        seconds = []
        for _ in range(args.repeats):
            dist.barrier(group=group)
            sync()
            start = time.perf_counter()
            ds_dist.all_to_all_single(out, x, group=group)
            sync()
            seconds.append(time.perf_counter() - start)
        slowest = torch.tensor(seconds, dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)  # a collective ends with its last rank
        t = statistics.median(slowest.tolist())
        algbw = algorithm_bandwidth(x.nbytes, t)
        rows.append(dict(bytes=x.nbytes, median_us=t * 1e6, algbw_gbs=algbw, busbw_gbs=bus_bandwidth(algbw, n)))
    return rows


def profile_steps(engine, plan, probe, args, sync) -> dict:
    """This rank's per-step times (ms), a2a bytes and calls per direction, and DeepSpeed's a2a timers."""
    spec, seq, vocab = plan.spec, plan.data.seq_len, engine.model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed * 1000 + engine.rank)
    layers = engine.ds.moe_layers
    rows = []
    for step in range(args.warmup_steps + args.steps):
        blocks = [torch.randint(0, vocab, (spec.micro_batch_size, seq + 1), generator=gen)
                  for _ in range(spec.grad_accum)]
        probe.calls.clear()
        # DeepSpeed's layer timers accumulate (elapsed(reset=False)); the step's share is the difference.
        ds_before = sum(layer.time_falltoall + layer.time_salltoall for layer in layers)
        sync()
        start = time.perf_counter()
        engine.train_batch([(b[:, :-1], b[:, 1:]) for b in blocks])
        sync()
        row = dict(step_ms=(time.perf_counter() - start) * 1e3,
                   ds_timer_fwd_a2a_ms=sum(layer.time_falltoall + layer.time_salltoall for layer in layers) - ds_before)
        for d in ("fwd", "bwd"):
            calls = [c for c in probe.calls if c[0] == d]
            row.update({f"a2a_{d}_ms": 1e3 * sum(c[2] for c in calls), f"a2a_{d}_bytes": sum(c[1] for c in calls),
                        f"a2a_{d}_calls": len(calls)})
        if step >= args.warmup_steps:
            rows.append(row)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith("_ms")}
    med["rest_ms"] = med["step_ms"] - med["a2a_fwd_ms"] - med["a2a_bwd_ms"]
    med["a2a_share"] = (med["a2a_fwd_ms"] + med["a2a_bwd_ms"]) / med["step_ms"]
    return dict(rank=engine.rank, median=med, steps=rows)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bw, bar) = plt.subplots(1, 2, figsize=(11, 4))
    rows = result["microbenchmark"]
    x = [r["bytes"] for r in rows]
    bw.plot(x, [r["algbw_gbs"] for r in rows], "o-", label="algbw (bytes sent / time)")
    bw.plot(x, [r["busbw_gbs"] for r in rows], "s--", label="busbw (algbw x (n-1)/n)")
    per_call = result["bytes"]["per_call_measured"]
    bw.axvline(per_call, color="gray", ls=":", label=f"training step's message ({per_call / 2**20:.2f} MiB)")
    bw.set(xscale="log", xlabel="message size per rank (bytes)", ylabel="GB/s",
           title=f"all_to_all_single, {result['setup']['ep_size']} ranks ({result['setup']['backend']})")
    bw.legend(fontsize=8)
    ranks = result["step"]
    labels = [f"rank {r['rank']}" for r in ranks]
    left = [0.0] * len(ranks)
    for key, name in (("a2a_fwd_ms", "a2a fwd"), ("a2a_bwd_ms", "a2a bwd"), ("rest_ms", "rest")):
        width = [r["median"][key] for r in ranks]
        bar.barh(labels, width, left=left, label=name)
        left = [a + b for a, b in zip(left, width)]
    bar.set(xlabel="ms per training step (median)", title=f"{result['setup']['model']} step breakdown")
    bar.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report_md(result: dict) -> str:
    s, a = result["setup"], result["args"]
    lines = [f"# Expert all-to-all profile: {s['model']}, EP={s['ep_size']}", "", f"`{result['command']}`", "",
             f"Machine: {s['machine']}; backend {s['backend']}, world {s['world_size']}, dtype {s['dtype']}, "
             f"{s['tokens_per_micro_batch']} tokens per micro-batch x {s['micro_batches']}.", ""]
    if s["device"] == "cpu":
        lines += ["**CPU run:** gloo over shared memory/loopback on a shared host. These numbers say nothing "
                  "about NVLink or NCCL; only the byte counts carry over to GPUs.", ""]
    lines += ["## Microbenchmark", "", f"`all_to_all_single` on the MoE layers' expert-parallel group: median of "
              f"{a['repeats']} calls after {a['warmup']} warm-up calls, each call timed on its slowest rank. "
              "algbw = bytes each rank sends / time; busbw = algbw x (n-1)/n (nccl-tests, src/alltoall.cu).", "",
              "| bytes per rank | median (us) | algbw (GB/s) | busbw (GB/s) |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['bytes']:,} | {r['median_us']:,.1f} | {r['algbw_gbs']:.3f} | {r['busbw_gbs']:.3f} |"
              for r in result["microbenchmark"]]
    lines += ["", f"## Training step (median of {a['steps']} steps after {a['warmup_steps']}, random tokens)", "",
              "a2a = the probe's time inside DeepSpeed's `_AllToAll`, between device syncs, waiting for the other "
              "rank included. DeepSpeed's own `1st_a2a` + `2nd_a2a` timers (forward only) enclose the forward "
              "probe. Rest = step minus both a2a directions: attention, experts, ZeRO gradient reduction, "
              "optimizer.", "",
              "| rank | step (ms) | a2a fwd (ms) | a2a bwd (ms) | rest (ms) | a2a share | DeepSpeed 1st+2nd_a2a (ms) |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["step"]:
        m = r["median"]
        lines.append(f"| {r['rank']} | {m['step_ms']:.1f} | {m['a2a_fwd_ms']:.2f} | {m['a2a_bwd_ms']:.2f} "
                     f"| {m['rest_ms']:.1f} | {100 * m['a2a_share']:.1f}% | {m['ds_timer_fwd_a2a_ms']:.2f} |")
    return "\n".join(lines + [""] + bytes_section(result)) + "\n"


def bytes_section(result: dict) -> list[str]:
    b, analytic = result["bytes"], result["bytes"]["analytic"]
    if analytic:
        verdict = "equal" if b["equal"] else "NOT equal"
        formula = (f"C={analytic['capacity']}, {analytic['per_call']:,} per call, {analytic['forward']:,} per "
                   f"direction; {verdict} to the measurement.")
    else:
        formula = b["analytic_note"]
    near = min(result["microbenchmark"], key=lambda r: abs(math.log(r["bytes"] / b["per_call_measured"])))
    step_us = [1e3 * r["median"]["a2a_fwd_ms"] / max(b["forward_calls"], 1) for r in result["step"]]
    return ["## Bytes per rank per step", "",
            f"Measured (probe, sum of input nbytes): forward {b['forward_measured']:,} in {b['forward_calls']} "
            f"calls, backward {b['backward_measured']:,} in {b['backward_calls']} calls"
            + (", the same on every timed step and rank." if b["same_every_step_and_rank"] else
               " (rank 0, first timed step; it varies: see alltoall.json)."),
            f"Analytic 2 x layers x micro-batches x E x C x d x bytes: {formula}",
            "Of each call's bytes, (n-1)/n leave the rank; the rest is the rank's own slice.", "",
            f"A forward all-to-all in the step took {', '.join(f'{t:,.0f}' for t in step_us)} us per call (by "
            f"rank); the microbenchmark at {near['bytes']:,} bytes took {near['median_us']:,.0f} us. The gap is "
            "waiting for the slower rank (and, on a shared host, for a core), which the benchmark's barrier hides."]


def byte_counts(plan, ranks: list[dict]) -> dict:
    """The probe's bytes per step (first timed step of rank 0) against the analytic count."""
    first = ranks[0]["steps"][0]
    keys = ("a2a_fwd_bytes", "a2a_bwd_bytes", "a2a_fwd_calls", "a2a_bwd_calls")
    constant = all(s[k] == first[k] for r in ranks for s in r["steps"] for k in keys)
    dtype_bytes = DTYPES[plan.spec.precision].itemsize
    try:
        analytic, note = step_alltoall_bytes(plan.model_config, micro_batches=plan.spec.grad_accum,
                                             tokens_per_micro_batch=plan.spec.micro_batch_size * plan.data.seq_len,
                                             dtype_bytes=dtype_bytes), None
    except ValueError as e:  # dropless: the capacity is data-dependent
        analytic, note = None, str(e)
    equal = bool(analytic) and constant and (first["a2a_fwd_bytes"], first["a2a_bwd_bytes"]) == (
        analytic["forward"], analytic["backward"])
    return dict(forward_measured=first["a2a_fwd_bytes"], backward_measured=first["a2a_bwd_bytes"],
                forward_calls=first["a2a_fwd_calls"], backward_calls=first["a2a_bwd_calls"],
                per_call_measured=first["a2a_fwd_bytes"] // max(first["a2a_fwd_calls"], 1),
                same_every_step_and_rank=constant, analytic=analytic, analytic_note=note, equal=equal)


def build(args):
    """Plan, engine and model exactly as `launch/train.py` builds them, plus DeepSpeed's a2a timers."""
    import transformers

    plan = plan_run(ModelArgs(model=args.model, capacity_factor=args.capacity_factor, dropless=args.dropless,
                              vocab_size=args.vocab_size),
                    DataConfig(seq_len=args.seq_len),
                    RunArgs(output_dir=args.out, seed=args.seed, max_steps=args.warmup_steps + args.steps),
                    EngineArgs(deepspeed=args.deepspeed))
    if plan.spec.ep_size < 2 or not plan.model_config.is_moe:
        sys.exit("error: needs an MoE model and moe.ep_size >= 2 (with EP=1 no all-to-all runs)")
    plan.spec.ds_config = {**plan.spec.ds_config, "wall_clock_breakdown": True}
    engine = make_engine("deepspeed", plan.spec)
    transformers.set_seed(args.seed)  # as the trainer: identical weights on every rank before sharding
    engine.setup(MoEForCausalLM(plan.model_config))
    return plan, engine


def main(argv=None) -> None:
    from deepspeed.accelerator import get_accelerator

    args = parse_args(argv)
    plan, engine = build(args)
    sync = get_accelerator().synchronize
    group = engine.ds.moe_layers[0].ep_group  # the group the MoE layers exchange tokens over
    micro = bench_alltoall(group, args, DTYPES[plan.spec.precision], engine.device, sync)
    with AllToAllProbe(sync) as probe:
        mine = profile_steps(engine, plan, probe, args, sync)
    ranks = [None] * engine.world_size
    dist.all_gather_object(ranks, mine)
    if engine.is_main:
        write_outputs(args, plan, engine, dist.get_backend(group), micro, ranks)
    engine.close()


def write_outputs(args, plan, engine, backend: str, micro, ranks) -> None:
    # The launcher adds --local_rank to each rank's argv; the command a user types has none.
    command = command_line("deepspeed", "--num_gpus", str(engine.world_size),
                           argv=[a for a in sys.argv if "--local_rank" not in a])
    setup = dict(model=args.model, ep_size=plan.spec.ep_size, world_size=engine.world_size,
                 backend=backend, dtype=plan.spec.precision, device=engine.device.type,
                 tokens_per_micro_batch=plan.spec.micro_batch_size * plan.data.seq_len,
                 micro_batches=plan.spec.grad_accum, capacity_factor=plan.model_config.capacity_factor,
                 machine=machine(engine.device))
    result = dict(command=command, setup=setup, microbenchmark=micro, step=ranks,
                  args={k: v for k, v in vars(args).items() if k != "local_rank"}, bytes=byte_counts(plan, ranks))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "alltoall.json", result)
    (out / "report.md").write_text(report_md(result))
    plot(result, out / "alltoall.png")
    print(report_md(result))


if __name__ == "__main__":
    main()
