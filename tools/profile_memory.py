"""Per-rank training memory of a preset at every GPU scale: predicted, measured where run, and whether it fits.

What: for each DeepSpeed JSON (default `ds_configs/ep{1,2,4,8}.json`) on N ranks (N =
its `moe.ep_size`, or `--world_size`), the per-rank bytes of weights, gradients, optimizer
state and activations predicted by `moe_dist.analysis.costs.memory_bytes` (its docstring lists the
assumptions) and a verdict on N GPUs of `--gpu_mem_gib` each (`moe_dist.analysis.costs.fit_verdict`).

Measured (`--measure CONFIG ...`): the real trainer (`launch/train.py`) runs `--max_steps`
steps of the real engine through the `deepspeed` launcher on N ranks (fixture corpus unless
`--train_file` is given), and its `summary.json` gives `peak_mem_mb`: the maximum over ranks
of `moe_dist.train.metrics.peak_memory_mb`, i.e. the CUDA allocator's peak on GPU, the process's
peak RSS on CPU (which includes what the model does not predict: the interpreter and
libraries alone are ~0.36 GB after importing torch, DeepSpeed and transformers). A measured
config is also predicted, with the vocabulary its run really used.

Per rank, a measured row also gives `allocated_mb_per_rank` (the allocator's peak: tensors only),
`reserved_mb_per_rank` (what the caching allocator held from the driver: allocated plus its cache)
and `nvml_used_mb_per_rank` (the whole GPU as NVML sees it: the CUDA context and NCCL buffers too);
on CPU these three are null and `measured_mb` is the peak RSS. On GPU the verdict is judged on
the largest rank's reserved peak plus `--cuda_context_mb` (or its NVML reading, if larger), since
allocated alone leaves out the cache, the context and NCCL.

Writes `report.md`, `memory.png` (stacked predicted bars per config, measured beside them)
and `memory.json` to `--output_dir`.

    python tools/profile_memory.py --preset seed-moe-e16 --output_dir docs/memory
    python tools/profile_memory.py --preset tiny-moe --measure ds_configs/cpu_ep2.json --output_dir /tmp/mem
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from moe_dist.analysis.bench import command_line, write_json
from moe_dist.analysis.costs import GiB, fit_verdict, memory_bytes
from moe_dist.model.configuration import MoEConfig
from moe_dist.parallel.ds_config import load_deepspeed_config
from moe_dist.parallel.expert_parallel import ExpertParallelError, validate_expert_parallel
from moe_dist.parallel.process_group import free_port

ROOT = Path(__file__).resolve().parents[1]  # the checkout: ds_configs/, launch/train.py, test fixtures
PARTS = ("weights", "gradients", "optimizer", "activations")
FIXTURES = ROOT / "tests" / "fixtures"
MB = 2**20


def predict(config: MoEConfig, ds_path: str, world: int, args) -> dict:
    """One row: the config's settings, the predicted bytes per rank (or why it cannot run), the verdict."""
    ds = load_deepspeed_config(ds_path, world_size=world)
    row = {"config": Path(ds_path).stem, "path": os.path.relpath(ds_path, ROOT), "world_size": world,
           "ep_size": ds.ep_size, "zero_stage": ds.zero_stage, "precision": ds.precision,
           "micro_batch": ds.micro_batch_size, "seq_len": args.seq_len or config.max_position_embeddings,
           "measured_mb": None, "allocated_mb_per_rank": None, "reserved_mb_per_rank": None,
           "nvml_used_mb_per_rank": None, "judged_mb": None}
    try:
        validate_expert_parallel(num_experts=config.num_local_experts, ep_size=ds.ep_size, world_size=world)
    except ExpertParallelError as e:
        return {**row, "predicted": None, "verdict": f"invalid: {e}"}
    row["predicted"] = memory_bytes(config, zero_stage=ds.zero_stage, ep_size=ds.ep_size, world_size=world,
                                    precision=ds.precision, micro_batch=ds.micro_batch_size,
                                    seq_len=row["seq_len"], grad_ckpt=args.grad_ckpt)
    row["verdict"] = fit_verdict(row["predicted"]["total"], gpu_mem_gib=args.gpu_mem_gib)
    return row


def measure(ds_path: str, ranks: int, args) -> tuple[dict, MoEConfig]:
    """Train `--max_steps` steps on `ranks` ranks; the run's `summary.json` and the model config used."""
    launcher = Path(sys.executable).parent / "deepspeed"
    data = ["--train_file", args.train_file, "--valid_file", args.valid_file, "--tokenizer", args.tokenizer]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))  # ranks share the cores
    steps = str(args.max_steps)
    train = ["--deepspeed", ds_path, "--model", args.preset, *data, "--max_steps", steps, "--eval_every", steps,
             "--save_every", steps, "--log_every", "1", "--warmup_steps", "1",
             *(["--seq_len", str(args.seq_len)] if args.seq_len else []), *(["--grad_ckpt"] if args.grad_ckpt else [])]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()),
               str(ROOT / "launch" / "train.py"), *train, "--output_dir", str(run_dir)]
        print(f"measuring {ds_path} on {ranks} ranks: {' '.join(map(shlex.quote, cmd))}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-4000:]
            sys.exit(f"training run for {ds_path} failed (exit {proc.returncode}):\n{tail}")
        summary = json.loads((run_dir / "summary.json").read_text())
        return summary, MoEConfig.from_pretrained(run_dir / "hf")


def measured_fields(summary: dict, args) -> dict:
    """Per-rank allocated / reserved / NVML (null on CPU), and the bytes the verdict is judged on."""
    gpu = bool(summary.get("peak_reserved_mb_per_rank"))  # written by CUDA runs only
    allocated = summary.get("peak_mem_mb_per_rank") if gpu else None
    reserved = summary.get("peak_reserved_mb_per_rank") if gpu else None
    nvml = (summary.get("nvml_used_mb_per_rank") or None) if gpu else None
    if gpu:  # the cache, the CUDA context and NCCL buffers count: allocated alone does not fit a GPU
        judged = max(r + args.cuda_context_mb for r in reserved)
        judged = max(judged, max(nvml)) if nvml else judged
    else:
        judged = summary["peak_mem_mb"]  # peak RSS on CPU
    return {"measured_mb": summary["peak_mem_mb"], "allocated_mb_per_rank": allocated,
            "reserved_mb_per_rank": reserved, "nvml_used_mb_per_rank": nvml, "judged_mb": judged}


def build_rows(args) -> list[dict]:
    config = MoEConfig.from_preset(args.preset)
    rows = []
    for path in args.ds_configs:
        world = args.world_size or load_deepspeed_config(path, world_size=1).ep_size
        rows.append(predict(config, path, world, args))
    for path in args.measure:
        world = args.world_size or load_deepspeed_config(path, world_size=1).ep_size
        summary, run_config = measure(path, world, args)
        row = predict(run_config, path, world, args)
        row.update(config=f"{row['config']} (run)", **measured_fields(summary, args))
        row["verdict"] = fit_verdict(max(row["judged_mb"] * MB, row["predicted"]["total"]),
                                     gpu_mem_gib=args.gpu_mem_gib)
        rows.append(row)
    return rows


def _unit(rows: list[dict]) -> tuple[str, float]:
    largest = max([r["predicted"]["total"] for r in rows if r["predicted"]] +
                  [r["measured_mb"] * MB for r in rows if r["measured_mb"]] + [1])
    return ("GiB", GiB) if largest >= GiB else ("MiB", MB)


def write_report(rows: list[dict], args, out: Path) -> None:
    name, scale = _unit(rows)
    lines = [f"# Per-rank training memory: `{args.preset}`", "",
             f"Command: `{command_line()}`", "",
             f"Predicted by `moe_dist.analysis.costs.memory_bytes` (AdamW; bf16 keeps an fp32 master; ZeRO-1 shards the "
             f"optimizer state, ZeRO-2 also the gradients; experts are split over `ep_size` ranks; activations after "
             f"Korthikanti et al. 2022, adapted for MoE{', with activation checkpointing' if args.grad_ckpt else ''}). "
             f"Verdict on N x {args.gpu_mem_gib:g} GiB: `fits` leaves 10% headroom, `tight` uses more; a measured row "
             f"is judged on the larger of predicted and measured. Measured = max over ranks of `peak_mem_mb` in the "
             f"run's `summary.json` (CUDA allocator peak on GPU, process peak RSS on CPU); on GPU the verdict uses "
             f"the reserved peak plus {args.cuda_context_mb:g} MiB of CUDA context and NCCL buffers (or NVML's "
             f"reading, if larger), and `memory.json` has allocated, reserved and NVML-used per rank.", "",
             "| config | ranks | ep | ZeRO | precision | micro-batch x seq | " + " | ".join(PARTS) +
             f" | predicted ({name}) | measured ({name}) | verdict on N x {args.gpu_mem_gib:g} GiB |",
             "|" + "---|" * (9 + len(PARTS))]
    for r in rows:
        p = r["predicted"]
        cells = [f"{p[k] / scale:.2f}" for k in (*PARTS, "total")] if p else ["-"] * (len(PARTS) + 1)
        measured = f"{r['measured_mb'] * MB / scale:.2f}" if r["measured_mb"] else "-"
        lines.append(f"| {r['config']} | {r['world_size']} | {r['ep_size']} | {r['zero_stage']} | {r['precision']} | "
                     f"{r['micro_batch']} x {r['seq_len']} | {' | '.join(cells)} | {measured} | {r['verdict']} |")
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
        ax.bar([i - 0.2 for i in x], heights, 0.4, bottom=bottom, label=f"{part} (predicted)")
        bottom = [b + h for b, h in zip(bottom, heights)]
    measured = [r["measured_mb"] * MB / scale if r["measured_mb"] else 0.0 for r in rows]
    if any(measured):
        ax.bar([i + 0.2 for i in x], measured, 0.4, color="0.3", hatch="//", label="measured peak")
    if args.gpu_mem_gib * GiB / scale <= 1.5 * max(bottom + measured):
        ax.axhline(args.gpu_mem_gib * GiB / scale, color="red", ls="--", label=f"{args.gpu_mem_gib:g} GiB GPU")
    ax.set_xticks(list(x), [f"{r['config']}\n{r['world_size']} ranks, ZeRO-{r['zero_stage']}" for r in rows],
                  fontsize=8)
    ax.set_ylabel(f"per-rank memory ({name})")
    ax.set_title(f"{args.preset}: training memory per rank")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-moe")
    p.add_argument("--ds_configs", nargs="*", default=[str(ROOT / f"ds_configs/ep{n}.json") for n in (1, 2, 4, 8)],
                   help="predicted only (default: the GPU scales ep1/2/4/8)")
    p.add_argument("--measure", nargs="*", default=[], help="DeepSpeed JSONs to also run for real")
    p.add_argument("--world_size", type=int, help="ranks per config (default: its moe.ep_size)")
    p.add_argument("--gpu_mem_gib", type=float, default=80.0, help="memory of one GPU for the verdict")
    p.add_argument("--seq_len", type=int, help="tokens per sequence (default: the preset's context)")
    p.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--cuda_context_mb", type=float, default=1024.0,
                   help="GPU memory outside the allocator (CUDA context, NCCL buffers) added to a measured "
                        "reserved peak for the verdict")
    p.add_argument("--max_steps", type=int, default=4, help="training steps of a measured run")
    p.add_argument("--train_file", default=str(FIXTURES / "stories.txt"))
    p.add_argument("--valid_file", default=str(FIXTURES / "stories_valid.txt"))
    p.add_argument("--tokenizer", default="train:512")
    p.add_argument("--output_dir", required=True)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = build_rows(args)
    write_report(rows, args, out)
    plot(rows, args, out / "memory.png")
    write_json(out / "memory.json", {"preset": args.preset, "gpu_mem_gib": args.gpu_mem_gib, "rows": rows})
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
