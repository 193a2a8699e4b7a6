"""Expert collectives: microbenchmark, and their share of a real training step (EP all-to-all, ETP all-gather
and reduce-scatter).

    deepspeed --num_gpus 2 tools/profile_alltoall.py --deepspeed ds_configs/cpu_ep2.json --model tiny-moe --out DIR
    deepspeed --num_gpus 4 tools/profile_alltoall.py --deepspeed ds_configs/cpu_ep2_etp2.json --out DIR

The model, process groups and engine are built as the trainer builds them (`plan_run`,
`DeepSpeedEngine.setup`: expert parallelism, and expert tensor parallelism (ETP) where
the JSON's `"moe"` has `etp_size` > 1, parameter groups, `deepspeed.initialize`), with
`"wall_clock_breakdown": true` added to the DeepSpeed config. Then, on every rank:

1. Microbenchmark, per collective the MoE layers run, on the group they run it over:
   `deepspeed.comm.all_to_all_single` (the call DeepSpeed's `_AllToAll` makes; it forwards to
   `torch.distributed.all_to_all_single`) on the expert-parallel group (`ep_size_N`, or under
   ETP the P ranks with the same slice), and the ETP layer's own all-gather and reduce-scatter
   (`expert_tensor_parallel._all_gather` / `_reduce_scatter`) on the ETP group. With more ranks
   than one group every group runs at once, as in training. For each message size (the full
   buffer: what each rank sends to the all-to-all, the all-gather's output, the
   reduce-scatter's input): `--warmup` untimed calls, then `--repeats` timed ones, each after a
   barrier and between device syncs. A call lasts until its slowest rank is done (max over the
   group); the table shows the median call. algbw = size / time, busbw = algbw x (n-1)/n, as
   nccl-tests defines them for all three.
2. Training step. `--warmup_steps`, then `--steps` timed calls of the trainer's own
   `engine.train_batch` on random tokens. DeepSpeed's MOELayer calls the module-level name
   `sharded_moe._AllToAll`, and the ETP layer its `GatherRows` / `ReduceScatterRows`; probes
   put autograd Functions there that run the originals' forward and backward between device
   syncs, so every expert collective, forward and backward, is timed and its bytes counted.
   DeepSpeed's own `1st_a2a` / `2nd_a2a` layer timers cover the forward all-to-all only and
   are reported beside the probe's forward time as a cross-check. Bytes are compared with
   `moe_dist.analysis.comm_cost.step_alltoall_bytes` and `step_etp_bytes`.

Caveats: a collective's time includes waiting for the slowest rank to arrive; the syncs around
each one remove any overlap a GPU step had, so the share is that of exposed communication.
Outputs in `--out`: report.md, alltoall.json, alltoall.png (written by rank 0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moe_dist.analysis.bench import claim_dir, command_line, is_our_json, machine, write_json
from moe_dist.analysis.comm_cost import (
    algorithm_bandwidth,
    bus_bandwidth,
    step_alltoall_bytes,
    step_etp_bytes,
)
from moe_dist.model.modeling import MoEForCausalLM
from moe_dist.parallel.engines import make_engine
from moe_dist.train.args import EngineArgs, ModelArgs, RunArgs
from moe_dist.train.data import DataConfig
from moe_dist.train.plan import plan_run

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SIZES = [4 << 10 << i for i in range(15)]  # 4 KiB, 8 KiB, ..., 64 MiB


OUTPUTS = ["report.md", "alltoall.json", "alltoall.png"]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--deepspeed", required=True, help="DeepSpeed JSON, as for launch/train.py (moe.ep_size or moe.etp_size >= 2)"
    )
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
        self.calls: list[tuple[str, str, int, float]] = []  # (collective, direction, bytes, seconds)
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
        self.calls.append(("a2a", direction, x.nbytes, time.perf_counter() - start))
        return y

    def __enter__(self):
        self.module._AllToAll = self.timed
        return self

    def __exit__(self, *exc):
        self.module._AllToAll = self.original


class EtpProbe:
    """While installed, times and sizes every ETP all-gather and reduce-scatter, both directions.

    `expert_tensor_parallel` calls its autograd Functions `GatherRows` (all-gather forward,
    reduce-scatter backward) and `ReduceScatterRows` (the mirror image) by their module-level
    names; the probe puts Functions there that run the originals' forward and backward between
    device syncs. Bytes are the full buffer of each call: the all-gather's output, the
    reduce-scatter's input (what `etp_bytes_per_layer` counts).
    """

    def __init__(self, calls: list, sync):
        from moe_dist.parallel import expert_tensor_parallel as etp

        self.module, self.calls, self.sync = etp, calls, sync
        self.originals = {"GatherRows": etp.GatherRows, "ReduceScatterRows": etp.ReduceScatterRows}
        self.timed = {
            "GatherRows": self._timed(etp.GatherRows, forward="ag", backward="rs"),
            "ReduceScatterRows": self._timed(etp.ReduceScatterRows, forward="rs", backward="ag"),
        }

    def _timed(self, original, *, forward: str, backward: str):
        probe = self

        class Timed(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, group, sent):
                return probe.run(forward, "fwd", lambda: original.forward(ctx, x, group, sent), x)

            @staticmethod
            def backward(ctx, grad):
                return probe.run(backward, "bwd", lambda: original.backward(ctx, grad), grad)

        return Timed

    def run(self, op: str, direction: str, call, x: torch.Tensor):
        self.sync()
        start = time.perf_counter()
        out = call()
        self.sync()
        gathered = out[0] if isinstance(out, tuple) else out
        self.calls.append((op, direction, (gathered if op == "ag" else x).nbytes, time.perf_counter() - start))
        return out

    def __enter__(self):
        for name, fn in self.timed.items():
            setattr(self.module, name, fn)
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(self.module, name, fn)


COLLECTIVES = {"a2a": "all-to-all", "ag": "ETP all-gather", "rs": "ETP reduce-scatter"}


def _collective_call(op: str, out: torch.Tensor, x: torch.Tensor, group) -> None:
    """One call of the collective the training step makes: DeepSpeed's all-to-all, the ETP layer's own
    all-gather and reduce-scatter (`expert_tensor_parallel._all_gather` / `_reduce_scatter`)."""
    import deepspeed.comm as ds_dist

    from moe_dist.parallel import expert_tensor_parallel as etp

    if op == "a2a":
        ds_dist.all_to_all_single(out, x, group=group)
    elif op == "ag":
        etp._all_gather(x, group)
    else:
        etp._reduce_scatter(x, group)


def bench_collective(op: str, group, args, dtype, device, sync) -> list[dict]:
    """Median time per message size of `op` on `group`; `bytes` is the full buffer (the all-gather's output)."""
    n, rows = dist.get_world_size(group), []
    for size in args.sizes:
        numel = size // dtype.itemsize // n * n  # a whole row per rank for the gather and scatter
        full = torch.randn(numel, dtype=dtype, device=device)
        x = full[: numel // n].clone() if op == "ag" else full
        out = torch.empty_like(full)
        for _ in range(args.warmup):
            _collective_call(op, out, x, group)
        seconds = []
        for _ in range(args.repeats):
            dist.barrier(group=group)
            sync()
            start = time.perf_counter()
            _collective_call(op, out, x, group)
            sync()
            seconds.append(time.perf_counter() - start)
        slowest = torch.tensor(seconds, dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)  # a collective ends with its last rank
        t = statistics.median(slowest.tolist())
        algbw = algorithm_bandwidth(full.nbytes, t)
        rows.append(
            {"bytes": full.nbytes, "median_us": t * 1e6, "algbw_gbs": algbw, "busbw_gbs": bus_bandwidth(algbw, n)}
        )
    return rows


def _step_row(calls: list, step_s: float, ds_a2a_ms: float) -> dict:
    row = {"step_ms": step_s * 1e3, "ds_timer_fwd_a2a_ms": ds_a2a_ms}
    for op in COLLECTIVES:
        for d in ("fwd", "bwd"):
            mine = [c for c in calls if c[:2] == (op, d)]
            row.update(
                {
                    f"{op}_{d}_ms": 1e3 * sum(c[3] for c in mine),
                    f"{op}_{d}_bytes": sum(c[2] for c in mine),
                    f"{op}_{d}_calls": len(mine),
                }
            )
    return row


def profile_steps(engine, plan, calls: list, args, sync) -> dict:
    """This rank's per-step times (ms), bytes and calls per collective and direction, and DeepSpeed's a2a timers."""
    spec, seq, vocab = plan.spec, plan.data.seq_len, engine.model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed * 1000 + engine.rank)
    layers = engine.ds.moe_layers
    rows = []
    for step in range(args.warmup_steps + args.steps):
        blocks = [
            torch.randint(0, vocab, (spec.micro_batch_size, seq + 1), generator=gen) for _ in range(spec.grad_accum)
        ]
        calls.clear()
        # DeepSpeed's layer timers accumulate (elapsed(reset=False)); the step's share is the difference.
        ds_before = sum(layer.time_falltoall + layer.time_salltoall for layer in layers)
        sync()
        start = time.perf_counter()
        engine.train_batch([(b[:, :-1], b[:, 1:]) for b in blocks])
        sync()
        step_s = time.perf_counter() - start
        ds_a2a = sum(layer.time_falltoall + layer.time_salltoall for layer in layers) - ds_before
        if step >= args.warmup_steps:
            rows.append(_step_row(calls, step_s, ds_a2a))
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith("_ms")}
    comm = {op: med[f"{op}_fwd_ms"] + med[f"{op}_bwd_ms"] for op in COLLECTIVES}
    med["rest_ms"] = med["step_ms"] - sum(comm.values())
    med["a2a_share"] = comm["a2a"] / med["step_ms"]
    med["etp_share"] = (comm["ag"] + comm["rs"]) / med["step_ms"]
    return {"rank": engine.rank, "median": med, "steps": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bw, bar) = plt.subplots(1, 2, figsize=(11, 4))
    for op, rows in result["microbenchmark"].items():
        x = [r["bytes"] for r in rows]
        bw.plot(x, [r["algbw_gbs"] for r in rows], "o-", label=f"{COLLECTIVES[op]} algbw (bytes / time)")
        bw.plot(x, [r["busbw_gbs"] for r in rows], "s--", label=f"{COLLECTIVES[op]} busbw (algbw x (n-1)/n)")
    for op, per_call in result["bytes"]["per_call_measured"].items():
        if per_call:
            bw.axvline(
                per_call,
                ls=":",
                color="gray",
                label=f"step's {COLLECTIVES[op]}, mean call ({per_call / 2**20:.2f} MiB)",
            )
    s = result["setup"]
    bw.set(
        xscale="log",
        xlabel="full buffer per rank (bytes)",
        ylabel="GB/s",
        title=f"EP {s['ep_size']} x ETP {s['etp_size']} groups ({s['backend']})",
    )
    bw.legend(fontsize=7)
    ranks = result["step"]
    labels = [f"rank {r['rank']}" for r in ranks]
    left = [0.0] * len(ranks)
    parts = [(f"{op}_{d}_ms", f"{op} {d}") for op in COLLECTIVES for d in ("fwd", "bwd")] + [("rest_ms", "rest")]
    for key, name in parts:
        width = [r["median"][key] for r in ranks]
        if any(width):
            bar.barh(labels, width, left=left, label=name)
            left = [a + b for a, b in zip(left, width)]
    bar.set(xlabel="ms per training step (median)", title=f"{s['model']} step breakdown")
    bar.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report_md(result: dict) -> str:
    s, a = result["setup"], result["args"]
    lines = [
        f"# Expert collectives profile: {s['model']}, EP={s['ep_size']} x ETP={s['etp_size']}",
        "",
        f"`{result['command']}`",
        "",
        (
            f"Machine: {s['machine']}; backend {s['backend']}, world {s['world_size']}, dtype {s['dtype']}, "
            f"{s['tokens_per_micro_batch']} tokens per micro-batch x {s['micro_batches']}."
        ),
        "",
    ]
    if s["device"] == "cpu":
        lines += [
            (
                "**CPU run:** gloo over shared memory/loopback on a shared host. These numbers say nothing "
                "about NVLink or NCCL; only the byte counts carry over to GPUs."
            ),
            "",
        ]
    lines += [
        "## Microbenchmark",
        "",
        (
            f"Each collective on the group the MoE layers use (the all-to-all on the "
            f"expert-parallel group, the ETP all-gather and reduce-scatter on the ETP group): median of "
            f"{a['repeats']} calls after {a['warmup']} warm-up calls, each call timed on its slowest rank. Bytes = the "
            "full buffer (all-to-all: what each rank sends; all-gather: the gathered output; reduce-scatter: the "
            "input). algbw = bytes / time; busbw = algbw x (n-1)/n (nccl-tests, doc/PERFORMANCE.md)."
        ),
        "",
        "| collective | bytes per rank | median (us) | algbw (GB/s) | busbw (GB/s) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {COLLECTIVES[op]} | {r['bytes']:,} | {r['median_us']:,.1f} | {r['algbw_gbs']:.3f} | {r['busbw_gbs']:.3f} |"
        for op, rows in result["microbenchmark"].items()
        for r in rows
    ]
    lines += [
        "",
        f"## Training step (median of {a['steps']} steps after {a['warmup_steps']}, random tokens)",
        "",
        (
            "a2a = the probe's time inside DeepSpeed's `_AllToAll`; ag / rs = inside the ETP layer's all-gather and "
            "reduce-scatter; each between device syncs, waiting for the other ranks included. DeepSpeed's own "
            "`1st_a2a` + `2nd_a2a` timers (forward only) enclose the forward a2a probe. Rest = step minus every "
            "collective: attention, experts, ZeRO gradient reduction, optimizer."
        ),
        "",
        (
            "| rank | step (ms) | a2a fwd | a2a bwd | ag fwd | ag bwd | rs fwd | rs bwd (ms) | rest (ms) | a2a share "
            "| ETP share | DeepSpeed 1st+2nd_a2a (ms) |"
        ),
        "|---:|" + "---:|" * 11,
    ]
    for r in result["step"]:
        m = r["median"]
        cells = " | ".join(f"{m[f'{op}_{d}_ms']:.2f}" for op in COLLECTIVES for d in ("fwd", "bwd"))
        lines.append(
            f"| {r['rank']} | {m['step_ms']:.1f} | {cells} | {m['rest_ms']:.1f} | {100 * m['a2a_share']:.1f}% "
            f"| {100 * m['etp_share']:.1f}% | {m['ds_timer_fwd_a2a_ms']:.2f} |"
        )
    return "\n".join(lines + [""] + bytes_section(result)) + "\n"


def bytes_section(result: dict) -> list[str]:
    b = result["bytes"]
    lines = [
        "## Bytes per rank per step",
        "",
        "Measured: the probes' sum of full buffers (rank 0, first timed step)"
        + (
            ", the same on every timed step and rank."
            if b["same_every_step_and_rank"]
            else "; it varies by step or rank: see alltoall.json."
        ),
        "",
        "| collective | direction | calls | measured bytes | analytic bytes | equal |",
        "|---|---|---:|---:|---:|---|",
    ]
    for op, counts in b["analytic"].items():
        for d, direction in (("fwd", "forward"), ("bwd", "backward")):
            analytic = counts[direction] if counts else None
            if not b["measured"][f"{op}_{d}_calls"] and not analytic:
                continue
            lines.append(
                f"| {COLLECTIVES[op]} | {direction} | {b['measured'][f'{op}_{d}_calls']} | "
                f"{b['measured'][f'{op}_{d}_bytes']:,} | {f'{analytic:,}' if analytic is not None else '-'} | "
                f"{'yes' if b['equal'][op] else 'NO'} |"
            )
    lines += [
        "",
        (
            "Analytic: all-to-all 2 x MoE layers x micro-batches x E x C x d x bytes, C the capacity of the "
            "ETP group's gathered tokens (`moe_dist.analysis.comm_cost.step_alltoall_bytes`); ETP "
            "`expert_tensor_parallel.etp_bytes_per_layer` x MoE layers x micro-batches "
            "(`comm_cost.step_etp_bytes`)."
        ),
    ]
    lines += [f"Note: {note}" for note in b["notes"]]
    return lines


def _measured_counts(first: dict) -> dict:
    return {k: first[k] for k in first if k.endswith(("_bytes", "_calls"))}


def analytic_counts(plan) -> tuple[dict, list[str]]:
    """Per collective, forward and backward bytes per step from `comm_cost` (None where not defined), and why not."""
    dtype_bytes, spec = DTYPES[plan.spec.precision].itemsize, plan.spec
    shape = {
        "micro_batches": spec.grad_accum,
        "tokens_per_micro_batch": spec.micro_batch_size * plan.data.seq_len,
        "dtype_bytes": dtype_bytes,
    }
    out, notes = {"a2a": None, "ag": None, "rs": None}, []
    if spec.ep_size > 1:
        try:
            out["a2a"] = step_alltoall_bytes(plan.model_config, etp_size=spec.etp_size, **shape)
        except ValueError as e:  # dropless: the capacity is data-dependent
            notes.append(str(e))
    if spec.etp_size > 1:
        etp = step_etp_bytes(plan.model_config, etp_size=spec.etp_size, **shape)
        out["ag"] = {d: etp[f"all_gather_{d}"] for d in ("forward", "backward")}
        out["rs"] = {d: etp[f"reduce_scatter_{d}"] for d in ("forward", "backward")}
    return out, notes


def byte_counts(plan, ranks: list[dict]) -> dict:
    """The probes' bytes per step (first timed step of rank 0) against the analytic counts."""
    first = ranks[0]["steps"][0]
    measured = _measured_counts(first)
    constant = all(_measured_counts(s) == measured for r in ranks for s in r["steps"])
    analytic, notes = analytic_counts(plan)
    equal = {
        op: bool(analytic[op])
        and constant
        and (measured[f"{op}_fwd_bytes"], measured[f"{op}_bwd_bytes"])
        == (analytic[op]["forward"], analytic[op]["backward"])
        for op in COLLECTIVES
    }
    per_call = {op: measured[f"{op}_fwd_bytes"] // max(measured[f"{op}_fwd_calls"], 1) for op in COLLECTIVES}
    return {
        "measured": measured,
        "analytic": analytic,
        "equal": equal,
        "notes": notes,
        "per_call_measured": per_call,
        "same_every_step_and_rank": constant,
    }


def build(args):
    """Plan, engine and model exactly as `launch/train.py` builds them, plus DeepSpeed's a2a timers."""
    import transformers

    plan = plan_run(
        ModelArgs(
            model=args.model, capacity_factor=args.capacity_factor, dropless=args.dropless, vocab_size=args.vocab_size
        ),
        # Token ids are drawn at random below the vocabulary, so no tokenizer is read: name one of exactly that
        # size, or the planner weighs the default GPT-2 one (50,257 tokens) against a smaller --vocab_size.
        DataConfig(seq_len=args.seq_len, tokenizer=f"train:{args.vocab_size}" if args.vocab_size else "gpt2"),
        RunArgs(output_dir=args.out, seed=args.seed, max_steps=args.warmup_steps + args.steps),
        EngineArgs(deepspeed=args.deepspeed),
    )
    if max(plan.spec.ep_size, plan.spec.etp_size) < 2 or not plan.model_config.is_moe:
        sys.exit(
            "error: needs an MoE model and moe.ep_size >= 2 or moe.etp_size >= 2 (with neither, no expert "
            "collective runs)"
        )
    plan.spec.ds_config = {**plan.spec.ds_config, "wall_clock_breakdown": True}
    engine = make_engine("deepspeed", plan.spec)
    transformers.set_seed(args.seed)  # as the trainer: identical weights on every rank before sharding
    engine.setup(MoEForCausalLM(plan.model_config))
    return plan, engine


def collective_groups(engine, plan) -> dict:
    """The process group of each collective the MoE layers run: EP all-to-all, ETP all-gather / reduce-scatter."""
    groups = {}
    if plan.spec.ep_size > 1:
        groups["a2a"] = engine.ds.moe_layers[0].ep_group  # the group the MoE layers exchange tokens over
    if plan.spec.etp_size > 1:
        etp_group = next(m.etp_group for m in engine.model.modules() if hasattr(m, "etp_group"))
        groups.update(ag=etp_group, rs=etp_group)
    return groups


def main(argv=None) -> None:
    from deepspeed.accelerator import get_accelerator

    args = parse_args(argv)
    # Before any process group: every rank checks --out, rank 0 records our three names there.
    claim_dir(
        args.out,
        "profile_alltoall",
        OUTPUTS,
        what="--out",
        main=os.environ.get("RANK", "0") == "0",
        legacy=lambda d: is_our_json(d / "alltoall.json", ("command", "setup")),
    )
    plan, engine = build(args)
    sync, dtype = get_accelerator().synchronize, DTYPES[plan.spec.precision]
    groups = collective_groups(engine, plan)
    micro = {op: bench_collective(op, group, args, dtype, engine.device, sync) for op, group in groups.items()}
    calls: list = []
    with AllToAllProbe(sync) as a2a, EtpProbe(calls, sync):
        a2a.calls = calls  # one list: every collective of the step in call order
        mine = profile_steps(engine, plan, calls, args, sync)
    ranks = [None] * engine.world_size
    dist.all_gather_object(ranks, mine)
    if engine.is_main:
        backend = dist.get_backend(next(iter(groups.values())))
        write_outputs(args, plan, engine, backend, micro, ranks)
    engine.close()


def write_outputs(args, plan, engine, backend: str, micro, ranks) -> None:
    # The launcher adds --local_rank to each rank's argv; the command a user types has none.
    command = command_line(
        "deepspeed", "--num_gpus", str(engine.world_size), argv=[a for a in sys.argv if "--local_rank" not in a]
    )
    setup = {
        "model": args.model,
        "ep_size": plan.spec.ep_size,
        "etp_size": plan.spec.etp_size,
        "world_size": engine.world_size,
        "backend": backend,
        "dtype": plan.spec.precision,
        "device": engine.device.type,
        "tokens_per_micro_batch": plan.spec.micro_batch_size * plan.data.seq_len,
        "micro_batches": plan.spec.grad_accum,
        "capacity_factor": plan.model_config.capacity_factor,
        "machine": machine(engine.device),
    }
    result = {
        "command": command,
        "setup": setup,
        "microbenchmark": micro,
        "step": ranks,
        "args": {k: v for k, v in vars(args).items() if k != "local_rank"},
        "bytes": byte_counts(plan, ranks),
    }
    out = Path(args.out)
    write_json(out / "alltoall.json", result)
    (out / "report.md").write_text(report_md(result))
    plot(result, out / "alltoall.png")
    print(report_md(result))


if __name__ == "__main__":
    main()
