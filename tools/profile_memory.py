"""Per-rank training memory of a preset at every GPU scale: predicted, measured where run, and whether it fits.

What: for each DeepSpeed JSON (default `ds_configs/ep{1,2,4,8}.json`) on N ranks (N =
its `moe.ep_size` x `moe.etp_size`, or `--world_size`), the per-rank bytes of weights, gradients,
optimizer state, activations and DeepSpeed's gradient bucket predicted by
`moe_dist.analysis.costs.memory_bytes` (its docstring lists the assumptions; expert tensor
parallelism, `"moe": {"ep_size": P, "etp_size": T}`, slices each expert over T ranks), the
per-rank training FLOPs of one step (`moe_dist.analysis.costs.flops_per_rank`), and a verdict
on N GPUs of `--gpu_mem_gib` each (`moe_dist.analysis.costs.fit_verdict`).

Measured (`--measure CONFIG ...`): the tool launches itself on N ranks through the `deepspeed`
launcher (`--worker`). Each rank builds the trainer's plan, model and engine exactly as
`launch/train.py` does (`plan_run`, `DeepSpeedEngine.setup`: EP or EP x ETP sharding, parameter
groups, `deepspeed.initialize`), runs `--max_steps` steps of the trainer's `engine.train_batch`
on random tokens (the shapes, not the text, set the memory), then times `--timed_steps` more.
Per rank it records:
- `allocated_mb_per_rank`: the allocator's peak of live tensor bytes, which is what the
  prediction counts. On GPU `torch.cuda.max_memory_allocated`. On CPU torch has no such
  counter, so the worker runs everything from before the model is built under
  `torch.profiler` with `profile_memory=True` and takes the peak of the running sum of its
  allocation and free events (the CPU allocator reports every tensor storage to it).
- `measured_mb` (max over ranks of `moe_dist.train.metrics.peak_memory_mb`: the CUDA
  allocator's peak on GPU, the process's peak RSS on CPU, which also holds the interpreter
  and libraries, ~0.36 GB after importing torch, DeepSpeed and transformers);
- on GPU, `reserved_mb_per_rank` (allocated plus the caching allocator's cache) and
  `nvml_used_mb_per_rank` (the whole GPU: the CUDA context and NCCL buffers too); null on CPU.
- `tok_s`: tokens of one optimizer step over all ranks / the median time of a timed step
  (each step's time is its slowest rank's). The profiler is off by then.
On GPU the verdict is judged on the largest rank's reserved peak plus `--cuda_context_mb` (or its
NVML reading, if larger); on CPU on the peak RSS. `--rounds R` launches every measured config
R times, interleaved (A B C A B C ...), so a busy neighbour slows all of them alike; `tok_s` is
the median over rounds, memory the largest.

Writes `report.md`, `memory.png` (stacked predicted bars per config, measured beside them)
and `memory.json` to `--output_dir`.

    python tools/profile_memory.py --preset seed-moe-e16 --output_dir docs/memory
    python tools/profile_memory.py --preset tiny-moe --vocab_size 512 --seq_len 32 \
        --measure ds_configs/cpu_ep2.json ds_configs/cpu_ep2_etp2.json --output_dir /tmp/mem
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe_dist.analysis.bench import claim_dir, command_line, is_our_json, machine, write_json
from moe_dist.analysis.costs import (
    GiB,
    fit_verdict,
    flops_per_rank,
    memory_bytes,
    reduce_bucket_elements,
)
from moe_dist.model import moe
from moe_dist.model.configuration import MoEConfig
from moe_dist.parallel.ds_config import load_deepspeed_config
from moe_dist.parallel.expert_parallel import (
    ExpertParallelError,
    validate_expert_parallel,
)
from moe_dist.parallel.expert_tensor_parallel import validate_expert_tensor_parallel
from moe_dist.parallel.process_group import LauncherError, deepspeed_launcher, free_port

ROOT = Path(__file__).resolve().parents[1]  # the checkout: ds_configs/, launch/train.py
PARTS = ("weights", "gradients", "optimizer", "activations", "buffers")
MB = 2**20


def _validate(config: MoEConfig, ds, world: int) -> None:
    if ds.etp_size == 1:
        validate_expert_parallel(num_experts=config.num_local_experts, ep_size=ds.ep_size, world_size=world)
    else:
        validate_expert_tensor_parallel(
            num_experts=config.num_local_experts,
            ep_size=ds.ep_size,
            etp_size=ds.etp_size,
            intermediate_size=config.moe_intermediate_size,
            world_size=world,
        )


def predict(config: MoEConfig, ds_path: str, world: int, args, experts_impl: str = "grouped") -> dict:
    """One row: the config's settings, the predicted bytes and FLOPs per rank (or why it cannot run), the verdict.

    `experts_impl`: the expert path at EP = ETP = 1 (`moe.experts_impl`); "grouped", the single-GPU
    bf16 path, for a prediction, and what the run took for a measured row."""
    ds = load_deepspeed_config(ds_path, world_size=world)
    seq = args.seq_len or config.max_position_embeddings
    row = {
        "config": Path(ds_path).stem,
        "path": os.path.relpath(ds_path, ROOT),
        "world_size": world,
        "ep_size": ds.ep_size,
        "etp_size": ds.etp_size,
        "zero_stage": ds.zero_stage,
        "precision": ds.precision,
        "micro_batch": ds.micro_batch_size,
        "grad_accum": ds.grad_accum,
        "seq_len": seq,
        "measured_mb": None,
        "allocated_mb_per_rank": None,
        "reserved_mb_per_rank": None,
        "nvml_used_mb_per_rank": None,
        "judged_mb": None,
        "tok_s": None,
    }
    try:
        _validate(config, ds, world)
    except ExpertParallelError as e:
        return {**row, "predicted": None, "train_flops_per_rank_step": None, "verdict": f"invalid: {e}"}
    row["predicted"] = memory_bytes(
        config,
        zero_stage=ds.zero_stage,
        ep_size=ds.ep_size,
        etp_size=ds.etp_size,
        world_size=world,
        precision=ds.precision,
        micro_batch=ds.micro_batch_size,
        seq_len=seq,
        grad_ckpt=args.grad_ckpt,
        reduce_bucket=reduce_bucket_elements(ds.raw),
        experts_impl=experts_impl,
    )
    flops = flops_per_rank(
        config, tokens_per_rank=ds.micro_batch_size * seq, seq_len=seq, ep_size=ds.ep_size, etp_size=ds.etp_size
    )
    row["train_flops_per_rank_step"] = flops["train"] * ds.grad_accum
    row["verdict"] = fit_verdict(row["predicted"]["total"], gpu_mem_gib=args.gpu_mem_gib)
    return row


# ---- measuring: the parent launches, each rank runs `worker` ---------------------------------------


def measure(ds_path: str, ranks: int, args) -> tuple[dict, MoEConfig]:
    """One launch of `worker` on `ranks` ranks: its gathered measurements and the model config it built."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))  # ranks share the cores
    try:
        launcher, launcher_env = deepspeed_launcher(ranks, env)
    except LauncherError as e:
        sys.exit(f"error: {e}")
    env.update(launcher_env)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            *launcher,
            "--master_port",
            str(free_port()),
            str(Path(__file__).resolve()),
            "--worker",
            tmp,
            "--measure",
            ds_path,
            "--preset",
            args.preset,
            "--max_steps",
            str(args.max_steps),
            "--timed_steps",
            str(args.timed_steps),
            "--seed",
            str(args.seed),
            "--output_dir",
            tmp,
            *(["--seq_len", str(args.seq_len)] if args.seq_len else []),
            *(["--vocab_size", str(args.vocab_size)] if args.vocab_size else []),
            *(["--grad_ckpt"] if args.grad_ckpt else []),
        ]
        print(f"measuring {ds_path} on {ranks} ranks: {shlex.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-4000:]
            sys.exit(f"measured run for {ds_path} failed (exit {proc.returncode}):\n{tail}")
        return json.loads((Path(tmp) / "measured.json").read_text()), MoEConfig.from_pretrained(tmp)


class CpuAllocatorPeak:
    """Peak of the CPU tensor bytes allocated while active and still alive, from torch.profiler's memory events.

    With `profile_memory=True` torch's CPU allocator reports every allocation and free made while
    profiling (c10 `ProfiledCPUMemoryReporter`); frees of storages made before are not reported, so
    the running sum is the live bytes allocated since `__enter__`.
    """

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        self.profiler.__exit__(*exc)
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in self.profiler.profiler.kineto_results.events() if e.name() == "[memory]"
        )
        live = self.peak = 0
        for _, nbytes in events:
            live += nbytes
            self.peak = max(self.peak, live)


def _random_batches(plan, rank: int, seed: int):
    spec, seq, vocab = plan.spec, plan.data.seq_len, plan.model_config.vocab_size
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    while True:
        blocks = [
            torch.randint(0, vocab, (spec.micro_batch_size, seq + 1), generator=gen) for _ in range(spec.grad_accum)
        ]
        yield [(b[:, :-1], b[:, 1:]) for b in blocks]


def _build_and_step(plan, args):
    """The trainer's model and engine (`trainer._build_model`, `engine.setup`), then `--max_steps` steps."""
    import transformers

    from moe_dist.model.modeling import MoEForCausalLM
    from moe_dist.parallel.engines import make_engine

    engine = make_engine("deepspeed", plan.spec)
    transformers.set_seed(args.seed)  # as the trainer: identical weights on every rank before sharding
    model = MoEForCausalLM(plan.model_config)
    if plan.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine.setup(model)
    batches = _random_batches(plan, engine.rank, args.seed)
    for _ in range(args.max_steps):
        engine.train_batch(next(batches))
    return engine, batches


def worker(args) -> None:
    """One rank of a measured run (under the deepspeed launcher); rank 0 writes `measured.json` to `--worker`."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from moe_dist.train.args import EngineArgs, ModelArgs, RunArgs
    from moe_dist.train.data import DataConfig
    from moe_dist.train.metrics import peak_memory_mb
    from moe_dist.train.plan import plan_run

    plan = plan_run(
        ModelArgs(model=args.preset, vocab_size=args.vocab_size, grad_ckpt=args.grad_ckpt),
        # Random token ids, no tokenizer read: name one of exactly --vocab_size tokens (as profile_alltoall).
        DataConfig(seq_len=args.seq_len, tokenizer=f"train:{args.vocab_size}" if args.vocab_size else "gpt2"),
        RunArgs(output_dir=str(Path(args.worker) / "run"), seed=args.seed, max_steps=args.max_steps + args.timed_steps),
        EngineArgs(deepspeed=args.measure[0]),
    )
    cpu = not torch.cuda.is_available()
    if cpu:
        with CpuAllocatorPeak() as allocator:
            engine, batches = _build_and_step(plan, args)
    else:
        engine, batches = _build_and_step(plan, args)
    memory = peak_memory_mb(engine.device)
    sync, seconds = get_accelerator().synchronize, []
    for _ in range(args.timed_steps):
        sync()
        start = time.perf_counter()
        engine.train_batch(next(batches))
        sync()
        seconds.append(time.perf_counter() - start)
    mine = {
        "allocated_mb": allocator.peak / MB if cpu else memory["torch_peak_mb"],
        "reserved_mb": None if cpu else memory["torch_reserved_peak_mb"],
        "nvml_mb": memory.get("nvml_used_mb"),
        "peak_mem_mb": memory["peak_mem_mb"],
        "step_s": seconds,
    }
    ranks = [None] * engine.world_size
    dist.all_gather_object(ranks, mine)
    if engine.is_main:
        plan.model_config.save_pretrained(args.worker)
        write_json(Path(args.worker) / "measured.json", _gathered(ranks, plan, engine))
    engine.close()


def _gathered(ranks: list[dict], plan, engine) -> dict:
    """Per-rank lists, in the fields the trainer's summary.json uses, plus the step time and tok/s."""
    step_s = [max(r["step_s"][i] for r in ranks) for i in range(len(ranks[0]["step_s"]))]  # each step's slowest rank
    tokens = engine.world_size * plan.spec.micro_batch_size * plan.spec.grad_accum * plan.data.seq_len
    median = statistics.median(step_s) if step_s else None
    return {
        "peak_mem_mb": max(r["peak_mem_mb"] for r in ranks),
        "allocated_mb_per_rank": [r["allocated_mb"] for r in ranks],
        "peak_reserved_mb_per_rank": [r["reserved_mb"] for r in ranks if r["reserved_mb"] is not None],
        "nvml_used_mb_per_rank": [r["nvml_mb"] for r in ranks if r["nvml_mb"] is not None],
        "step_s": step_s,
        "tokens_per_step": tokens,
        "tok_s": tokens / median if median else None,
        "machine": machine(engine.device),
        "experts_impl": _experts_impl(engine),
    }


def _experts_impl(engine) -> str:
    """The path `LocalExperts` took in this run (what `_stacked_expert_bytes` needs at EP = ETP = 1)."""
    experts = [m for m in engine.model.modules() if isinstance(m, moe.LocalExperts)]
    if not experts:
        return "loop"  # a dense model: nothing stacked
    up = experts[0][0].up_proj
    return experts[0].impl or moe.experts_impl(engine.device, up.weight.dtype, up.in_features, up.out_features)


def measured_fields(summary: dict, args) -> dict:
    """Per-rank allocated / reserved / NVML (the last two null on CPU), and the bytes the verdict is judged on."""
    gpu = bool(summary.get("peak_reserved_mb_per_rank"))  # written by CUDA runs only
    reserved = summary.get("peak_reserved_mb_per_rank") if gpu else None
    nvml = (summary.get("nvml_used_mb_per_rank") or None) if gpu else None
    if gpu:  # the cache, the CUDA context and NCCL buffers count: allocated alone does not fit a GPU
        judged = max(r + args.cuda_context_mb for r in reserved)
        judged = max(judged, max(nvml)) if nvml else judged
    else:
        judged = summary["peak_mem_mb"]  # peak RSS on CPU
    return {
        "measured_mb": summary["peak_mem_mb"],
        "allocated_mb_per_rank": summary.get("allocated_mb_per_rank"),
        "reserved_mb_per_rank": reserved,
        "nvml_used_mb_per_rank": nvml,
        "judged_mb": judged,
    }


def _world(path: str, args) -> int:
    ds = load_deepspeed_config(path, world_size=1)
    return args.world_size or ds.ep_size * ds.etp_size


def measured_row(path: str, world: int, runs: list[tuple[dict, MoEConfig]], args) -> dict:
    """A measured config's row: predicted with the config its run built, measured over every round."""
    summaries, run_config = [s for s, _ in runs], runs[0][1]
    row = predict(run_config, path, world, args, experts_impl=summaries[0]["experts_impl"])
    row.update(config=f"{row['config']} (run)", **measured_fields(max(summaries, key=lambda s: s["peak_mem_mb"]), args))
    row["allocated_mb_per_rank"] = [max(rank) for rank in zip(*(s["allocated_mb_per_rank"] for s in summaries))]
    row["allocated_mb"] = max(row["allocated_mb_per_rank"])
    row["predicted_over_allocated"] = row["predicted"]["total"] / (row["allocated_mb"] * MB) - 1
    row["tok_s_rounds"] = [s["tok_s"] for s in summaries]
    row["tok_s"] = statistics.median(row["tok_s_rounds"]) if all(row["tok_s_rounds"]) else None
    row["step_s_rounds"] = [s["step_s"] for s in summaries]
    row["machine"] = summaries[0]["machine"]
    row["verdict"] = fit_verdict(max(row["judged_mb"] * MB, row["predicted"]["total"]), gpu_mem_gib=args.gpu_mem_gib)
    return row


def build_rows(args) -> list[dict]:
    config = MoEConfig.from_preset(args.preset, **({"vocab_size": args.vocab_size} if args.vocab_size else {}))
    rows = [predict(config, path, _world(path, args), args) for path in args.ds_configs]
    runs = {path: [] for path in args.measure}
    for _ in range(args.rounds):  # interleaved: A B C, A B C, ...
        for path in args.measure:
            runs[path].append(measure(path, _world(path, args), args))
    rows += [measured_row(path, _world(path, args), runs[path], args) for path in args.measure]
    return rows


def _unit(rows: list[dict]) -> tuple[str, float]:
    largest = max(
        [r["predicted"]["total"] for r in rows if r["predicted"]]
        + [r["measured_mb"] * MB for r in rows if r["measured_mb"]]
        + [1]
    )
    return ("GiB", GiB) if largest >= GiB else ("MiB", MB)


def write_report(rows: list[dict], args, out: Path) -> None:
    name, scale = _unit(rows)
    lines = [
        f"# Per-rank training memory: `{args.preset}`",
        "",
        f"Command: `{command_line()}`",
        "",
        (
            f"Predicted by `moe_dist.analysis.costs.memory_bytes` (AdamW; bf16 keeps an fp32 master; ZeRO-1 shards the "
            f"optimizer state, ZeRO-2 also the gradients; experts are split over `ep_size` ranks and each sliced over "
            f"`etp_size`; activations after Korthikanti et al. 2022, adapted for MoE"
            f"{', with activation checkpointing' if args.grad_ckpt else ''}; buffers: DeepSpeed's contiguous gradient "
            f"bucket). Verdict on N x {args.gpu_mem_gib:g} GiB: `fits` leaves 10% headroom, `tight` uses more; a "
            f"measured row is judged on the larger of predicted and measured. Allocated = the largest rank's allocator "
            f"peak of live tensors (CUDA's `max_memory_allocated`; on CPU the running sum of torch.profiler's memory "
            f"events), what the prediction counts. Measured = max over ranks of `peak_mem_mb` (CUDA allocator peak "
            f"on GPU, process peak RSS on CPU); on GPU the verdict uses the reserved peak plus "
            f"{args.cuda_context_mb:g} MiB of CUDA context and NCCL buffers (or NVML's reading, if larger), "
            f"and `memory.json` has allocated, reserved "
            f"and NVML-used per rank. tok/s: all ranks' tokens per step / the median step"
            f"{f' (median of {args.rounds} interleaved launches)' if args.rounds > 1 else ''}."
        ),
        "",
        "| config | ranks | ep | etp | ZeRO | precision | micro-batch x seq | "
        + " | ".join(PARTS)
        + f" | predicted ({name}) | allocated ({name}) | predicted / allocated | measured ({name}) | tok/s "
        f"| verdict on N x {args.gpu_mem_gib:g} GiB |",
        "|" + "---|" * (14 + len(PARTS)),
    ]
    for r in rows:
        p = r["predicted"]
        cells = [f"{p[k] / scale:.2f}" for k in (*PARTS, "total")] if p else ["-"] * (len(PARTS) + 1)
        measured = f"{r['measured_mb'] * MB / scale:.2f}" if r["measured_mb"] else "-"
        allocated = f"{r['allocated_mb'] * MB / scale:.2f}" if r.get("allocated_mb") else "-"
        ratio = f"{1 + r['predicted_over_allocated']:.3f}" if r.get("allocated_mb") else "-"
        tok_s = f"{r['tok_s']:,.0f}" if r["tok_s"] else "-"
        lines.append(
            f"| {r['config']} | {r['world_size']} | {r['ep_size']} | {r['etp_size']} | {r['zero_stage']} | "
            f"{r['precision']} | {r['micro_batch']} x {r['seq_len']} | {' | '.join(cells)} | {allocated} | "
            f"{ratio} | {measured} | {tok_s} | {r['verdict']} |"
        )
    lines += ["", "![memory per rank](memory.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def plot(rows: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, scale = _unit(rows)
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 3, 4.5))
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for part in PARTS:
        heights = [r["predicted"][part] / scale if r["predicted"] else 0.0 for r in rows]
        ax.bar([i - 0.27 for i in x], heights, 0.27, bottom=bottom, label=f"{part} (predicted)")
        bottom = [b + h for b, h in zip(bottom, heights)]
    allocated = [r["allocated_mb"] * MB / scale if r.get("allocated_mb") else 0.0 for r in rows]
    measured = [r["measured_mb"] * MB / scale if r["measured_mb"] else 0.0 for r in rows]
    if any(allocated):
        ax.bar(list(x), allocated, 0.27, color="0.6", label="allocated peak (measured)")
    if any(measured):
        ax.bar([i + 0.27 for i in x], measured, 0.27, color="0.3", hatch="//", label="measured peak (RSS on CPU)")
    if args.gpu_mem_gib * GiB / scale <= 1.5 * max(bottom + measured):
        ax.axhline(args.gpu_mem_gib * GiB / scale, color="red", ls="--", label=f"{args.gpu_mem_gib:g} GiB GPU")
    ax.set_xticks(
        list(x), [f"{r['config']}\n{r['world_size']} ranks, ZeRO-{r['zero_stage']}" for r in rows], fontsize=8
    )
    ax.set_ylabel(f"per-rank memory ({name})")
    ax.set_title(f"{args.preset}: training memory per rank")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


OUTPUTS = ["report.md", "memory.png", "memory.json"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-moe")
    p.add_argument(
        "--ds_configs",
        nargs="*",
        default=[str(ROOT / f"ds_configs/ep{n}.json") for n in (1, 2, 4, 8)],
        help="predicted only (default: the GPU scales ep1/2/4/8)",
    )
    p.add_argument("--measure", nargs="*", default=[], help="DeepSpeed JSONs to also run for real")
    p.add_argument("--world_size", type=int, help="ranks per config (default: its moe.ep_size x moe.etp_size)")
    p.add_argument("--gpu_mem_gib", type=float, default=80.0, help="memory of one GPU for the verdict")
    p.add_argument("--seq_len", type=int, help="tokens per sequence (default: the preset's context)")
    p.add_argument("--vocab_size", type=int, help="model vocabulary (default: the preset's)")
    p.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing of every block")
    p.add_argument(
        "--cuda_context_mb",
        type=float,
        default=1024.0,
        help="GPU memory outside the allocator (CUDA context, NCCL buffers) added to a measured "
        "reserved peak for the verdict",
    )
    p.add_argument("--max_steps", type=int, default=4, help="training steps of a measured run before the timed ones")
    p.add_argument("--timed_steps", type=int, default=3, help="timed steps of a measured run (tok/s)")
    p.add_argument("--rounds", type=int, default=1, help="launches of each measured config, interleaved")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # set by the tool itself: this process is one measured rank
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    out = claim_dir(
        args.output_dir,
        "profile_memory",
        OUTPUTS,
        what="--output_dir",
        legacy=lambda d: is_our_json(d / "memory.json", ("preset", "rows")),
    )
    rows = build_rows(args)
    write_report(rows, args, out)
    plot(rows, args, out / "memory.png")
    write_json(
        out / "memory.json",
        {
            "preset": args.preset,
            "gpu_mem_gib": args.gpu_mem_gib,
            "command": command_line(),
            "load_average_at_end": os.getloadavg(),
            "rows": rows,
        },
    )
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
