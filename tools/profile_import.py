"""Memory and time of `--init_from` a stock MoE checkpoint, per rank, as E and the EP size grow.

For each expert count E (`--experts`) the tool saves a random `Qwen3MoeForCausalLM` folder in bf16 (the
shape set by `--hidden_size`, `--layers`, `--moe_width`), then:
- measures the exactness check (`convert.stock_import.check_import`: the stock class and the converted model,
  both in fp32, in one process, as rank 0 runs it when a run starts) in a fresh process;
- for each EP size P (`--ep`), launches P CPU ranks through the `deepspeed` launcher (`--worker`); each rank
  builds the model on the meta device and fills it as the trainer does (`DeepSpeedEngine.shard`: experts
  sharded first, then each rank reads the replicated tensors and its own E/P experts from the safetensors).
Every process records its peak RSS (getrusage) before and after, and the load's wall time. Results:
`import.json` and `report.md` in `--out`, with the checkpoint's fp32 size for scale.

    python tools/profile_import.py --experts 16 64 128 --ep 1 2 4 --out docs/import
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe_dist.analysis.bench import claim_dir, command_line, is_our_json, machine, write_json
from moe_dist.parallel.process_group import deepspeed_launcher, free_port

MB = 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def save_stock(folder: Path, args, experts: int) -> int:
    """A random Qwen3-MoE folder in bf16; returns its parameter count."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=args.hidden_size // 8,
        intermediate_size=4 * args.moe_width,
        moe_intermediate_size=args.moe_width,
        num_experts=experts,
        num_experts_per_tok=8,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.02)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def check_worker(folder: str) -> dict:
    from moe_dist import MoEConfig
    from moe_dist.convert.stock_import import check_import, read_init_config

    init = read_init_config(Path(folder))
    before, t0 = peak_rss_mb(), time.perf_counter()
    diff = check_import(init, MoEConfig(**init.fields))
    return {"diff": diff, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before}


def load_worker(folder: str, ep_size: int) -> dict | None:
    """One rank: the trainer's meta-device build and sharded fill, measured."""
    import torch.distributed as dist

    from moe_dist import MoEConfig, MoEForCausalLM
    from moe_dist.convert.stock_import import read_init_config, weight_source
    from moe_dist.parallel.engines import EngineSpec, make_engine

    init = read_init_config(Path(folder))
    config = MoEConfig(**init.fields)
    spec = EngineSpec(
        micro_batch_size=1,
        grad_accum=1,
        grad_clip=1.0,
        precision="fp32",
        ep_size=ep_size,
        lr=1e-3,
        betas=(0.9, 0.95),
        adam_eps=1e-8,
        weight_decay=0.0,
        warmup_steps=1,
        max_steps=1,
        min_lr_ratio=0.1,
        dist_timeout_s=600,
        ds_config={"train_micro_batch_size_per_gpu": 1},
    )
    engine = make_engine("deepspeed", spec)
    before, t0 = peak_rss_mb(), time.perf_counter()
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    model = engine.shard(model, weight_source(init, config))
    mine = {
        "rank": engine.rank,
        "seconds": time.perf_counter() - t0,
        "rss_before_mb": before,
        "peak_rss_mb": peak_rss_mb(),
        "params_held": sum(p.numel() for p in model.parameters()),
    }
    ranks = [None] * engine.world_size
    dist.all_gather_object(ranks, mine)
    engine.close()
    return {"ep_size": ep_size, "ranks": ranks} if engine.rank == 0 else None


def launch(args, *worker: str, ranks: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        if worker[0] == "--check":
            cmd = [sys.executable, __file__, *worker, "--result", str(result)]
        else:
            launcher, extra = deepspeed_launcher(ranks, {**env, "CUDA_VISIBLE_DEVICES": ""})
            env.update(extra)
            cmd = [*launcher, "--master_port", str(free_port()), __file__, *worker, "--result", str(result)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: {' '.join(cmd[:4])} ... exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
        return json.loads(result.read_text())


def report(result: dict) -> str:
    lines = [
        f"# Import memory: {result['shape']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}",
        "",
        "Per-rank peak RSS after the load (whole process: ~0.4-0.6 GB is Python, torch, DeepSpeed and "
        "transformers, `rss_before`), and the exactness check's process, which holds the stock class and the "
        "converted model in fp32.",
        "",
        "| experts | params | fp32 size (MB) | check: peak RSS (MB), s | EP | per-rank peak RSS (MB) | "
        "before load (MB) | params held per rank | load s (max) |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        check = row["check"]
        for load in row["loads"]:
            ranks = load["ranks"]
            lines.append(
                f"| {row['experts']} | {row['params'] / 1e6:.0f}M | {row['params'] * 4 / MB:,.0f} | "
                f"{check['peak_rss_mb']:,.0f}, {check['seconds']:.1f} | {load['ep_size']} | "
                f"{max(r['peak_rss_mb'] for r in ranks):,.0f} | {max(r['rss_before_mb'] for r in ranks):,.0f} | "
                f"{max(r['params_held'] for r in ranks) / 1e6:.0f}M | {max(r['seconds'] for r in ranks):.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check or args.load:
        out = check_worker(args.check) if args.check else load_worker(args.load, args.ep_size)
        if out is not None:
            Path(args.result).write_text(json.dumps(out))
        return 0
    out = claim_dir(
        args.out,
        "profile_import",
        ["import.json", "report.md"],
        what="--out",
        legacy=lambda d: is_our_json(d / "import.json", ("command", "rows")),
    )
    shape = (
        f"Qwen3-MoE, d {args.hidden_size}, {args.layers} layers, experts of width {args.moe_width}, top-8, "
        f"vocab {args.vocab_size}"
    )
    rows = []
    for experts in args.experts:
        with tempfile.TemporaryDirectory() as tmp:
            params = save_stock(Path(tmp) / "stock", args, experts)
            print(f"E={experts}: {params / 1e6:.0f}M parameters", flush=True)
            check = launch(args, "--check", str(Path(tmp) / "stock"))
            loads = [
                launch(args, "--load", str(Path(tmp) / "stock"), "--ep_size", str(p), ranks=p)
                for p in args.ep
                if experts % p == 0
            ]
            rows.append({"experts": experts, "params": params, "check": check, "loads": loads})
            print(
                report({"shape": shape, "command": "", "machine": "", "rows": rows[-1:]}).splitlines()[-1], flush=True
            )
    result = {"command": command_line("python"), "machine": machine(torch.device("cpu")), "shape": shape, "rows": rows}
    write_json(out / "import.json", result)
    (out / "report.md").write_text(report(result))
    print(report(result))
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--moe_width", type=int, default=512)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--out", default="docs/import")
    p.add_argument("--check", help=argparse.SUPPRESS)
    p.add_argument("--load", help=argparse.SUPPRESS)
    p.add_argument("--ep_size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
