"""Memory and time of `--init_from` a stock MoE checkpoint and of its export, per process, as E, the depth and
the EP size grow.

For each expert count E (`--experts`) and depth (`--layers`, one or more) the tool saves a random
`Qwen3MoeForCausalLM` folder in bf16 (the shape set by `--hidden_size`, `--moe_width`), then:
- measures the exactness check (`convert.stock_import.check_import`: the stock class and the converted model in
  fp32, each run one decoder layer at a time, as rank 0 runs it when a run starts) in a fresh process;
- with `--export`, writes the converted model as our checkpoint (fp32: accelerate's layout, or with
  `--export_ep P` DeepSpeed's, saved by P CPU ranks at EP = P through the `deepspeed` launcher, each rank holding
  its own experts) and measures `python -m moe_dist.export CKPT OUT --format qwen3_moe --max_shard_size S` in a
  fresh process: its own peak RSS and, in another, that of the stock-class check it runs;
- for each EP size P (`--ep`), launches P CPU ranks through the `deepspeed` launcher (`--worker`); each rank
  builds the model on the meta device and fills it as the trainer does (`DeepSpeedEngine.shard`: experts
  sharded first, then each rank reads the replicated tensors and its own E/P experts from the safetensors).
Every process records its peak RSS (getrusage) before and after, and the load's wall time. Results:
`import.json` and `report.md` in `--out`, with the checkpoint's fp32 size for scale and each peak as a multiple
of it.

    python tools/profile_import.py --experts 16 64 128 --ep 1 2 4 --out docs/import
    python tools/profile_import.py --experts 32 --layers 4 8 16 --ep --export --out docs/import/depth
    python tools/profile_import.py --experts 32 --layers 16 --hidden_size 1024 --ep --export --export_ep 2 \
        --out docs/import/export16
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
    """This process's peak RSS since its exec (VmHWM). Not getrusage: its ru_maxrss keeps the RSS the process
    had before exec, which after subprocess's vfork is the parent's peak (the tool's, which saved the model)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: an upper bound


def save_stock(folder: Path, args, experts: int, layers: int) -> int:
    """A random Qwen3-MoE folder in bf16; returns its parameter count."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=layers,
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


def save_ours(stock: Path, ckpt: Path) -> None:
    """The converted model as our checkpoint (config + accelerate/model.safetensors, fp32): what the exporter reads."""
    from safetensors.torch import save_file

    from moe_dist import MoEConfig
    from moe_dist.checkpoint.formats import ACCELERATE_WEIGHTS
    from moe_dist.convert.stock_import import converted_model, read_init_config

    init = read_init_config(stock)
    model = converted_model(init, MoEConfig(**init.fields))
    (ckpt / ACCELERATE_WEIGHTS).parent.mkdir(parents=True)
    model.config.save_pretrained(ckpt)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, ckpt / ACCELERATE_WEIGHTS)


def save_ep_worker(stock: str, ep_size: int, ckpt: str) -> dict | None:
    """One of P ranks: the converted model sharded at EP = P as the trainer loads it, saved as a DeepSpeed
    checkpoint (ZeRO stage 0, before any step: the imported weights), with the config and trainer_state.json the
    trainer writes beside it."""
    from moe_dist import MoEConfig, MoEForCausalLM
    from moe_dist.convert.stock_import import read_init_config, weight_source
    from moe_dist.train.report import ReportTotals
    from moe_dist.train.state import TrainerState, write_trainer_state

    init = read_init_config(Path(stock))
    config = MoEConfig(**init.fields)
    engine = _engine(ep_size)
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    engine.setup(model, weight_source(init, config))
    folder = Path(ckpt)
    engine.save(folder)
    if engine.is_main:
        write_trainer_state(
            folder, TrainerState(engine="deepspeed", ep_size=ep_size, world_size=ep_size), ReportTotals()
        )
        config.to_json_file(folder / "config.json")
    peaks = engine.all_gather_objects(peak_rss_mb())
    engine.close()
    return {"ep_size": ep_size, "peak_rss_mb_per_rank": peaks} if engine.is_main else None


def _engine(ep_size: int):
    from moe_dist.parallel.engines import EngineSpec, make_engine

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
    return make_engine("deepspeed", spec)


def export_worker(ckpt: str, max_shard_size: str) -> dict:
    """The export in this process, as `python -m moe_dist.export CKPT OUT --format qwen3_moe --max_shard_size S`
    runs it (`export_standard`, whose stock-class check is a child process, measured on its own by
    `stock_check_worker`)."""
    from moe_dist.export import export_standard

    out = Path(ckpt).parent / "export"
    before, t0 = peak_rss_mb(), time.perf_counter()
    diff = export_standard(ckpt, out, "qwen3_moe", max_shard_size=max_shard_size)
    return {
        "diff": diff,
        "seconds": time.perf_counter() - t0,
        "rss_before_mb": before,
        "peak_rss_mb": peak_rss_mb(),
        "files": sorted(p.name for p in out.iterdir()),
    }


def stock_check_worker(folder: str) -> dict:
    """The export's stock-class check again on the exported folder, in this fresh process: what
    export/stock_logits.py runs in its child (convert/stock_stream.py loaded by path, strict), on a batch of the
    exporter's shape. This process has imported moe_dist for the tool, so the script's own guard against that
    is left out."""
    import importlib.util

    import moe_dist.convert

    script = Path(moe_dist.convert.__file__).with_name("stock_stream.py")
    spec = importlib.util.spec_from_file_location("stock_stream_script", script)
    stream = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stream)
    before, t0 = peak_rss_mb(), time.perf_counter()
    stream.stock_logits(folder, torch.zeros(2, 16, dtype=torch.long), "Qwen3MoeForCausalLM", strict=True)
    return {"seconds": time.perf_counter() - t0, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}


def load_worker(folder: str, ep_size: int) -> dict | None:
    """One rank: the trainer's meta-device build and sharded fill, measured."""
    import torch.distributed as dist

    from moe_dist import MoEConfig, MoEForCausalLM
    from moe_dist.convert.stock_import import read_init_config, weight_source

    init = read_init_config(Path(folder))
    config = MoEConfig(**init.fields)
    engine = _engine(ep_size)
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
        if worker[0] != "--load" and worker[0] != "--save_ep":
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
        "Peak RSS of each process (whole process: ~0.4-0.7 GB is Python, torch, DeepSpeed and transformers, "
        "`before`), in MB and as a multiple of the model's fp32 size (x). The check runs the stock class and the "
        "converted model one decoder layer at a time; the export is `python -m moe_dist.export --format "
        "qwen3_moe` of the fp32 checkpoint, and its stock-class check is the child process it starts.",
        "",
        "| experts | layers | params | fp32 size (MB) | check: peak RSS (MB, x), s | export: peak RSS (MB, x), s | "
        "export's stock check (MB, x) | exported checkpoint; folder |",
        "|---:|---:|---:|---:|---|---|---|---|",
    ]
    for row in result["rows"]:
        fp32 = row["params"] * 4 / MB
        check, export = row["check"], row.get("export")
        cells = [f"{check['peak_rss_mb']:,.0f} ({check['peak_rss_mb'] / fp32:.2f}x), {check['seconds']:.1f}"]
        if export is not None:
            saved = export.get("checkpoint", {"layout": "accelerate", "ep_size": 1})
            shards = sum(f.endswith(".safetensors") for f in export["files"])
            cells += [
                f"{export['peak_rss_mb']:,.0f} ({export['peak_rss_mb'] / fp32:.2f}x), {export['seconds']:.1f}",
                f"{export['stock_check']['peak_rss_mb']:,.0f} ({export['stock_check']['peak_rss_mb'] / fp32:.2f}x)",
                f"{saved['layout']}, EP {saved['ep_size']}; {shards} shard(s)"
                + (f"; max diff {export['diff']:.1e}" if "diff" in export else ""),
            ]
        else:
            cells += ["-", "-", "-"]
        lines.append(
            f"| {row['experts']} | {row['layers']} | {row['params'] / 1e6:.0f}M | {fp32:,.0f} | {' | '.join(cells)} |"
        )
    loads = [(row, load) for row in result["rows"] for load in row["loads"]]
    if loads:
        lines += [
            "",
            "Per-rank load, as the trainer shards it:",
            "",
            "| experts | layers | EP | per-rank peak RSS (MB) | before load (MB) | params held per rank | "
            "load s (max) |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for row, load in loads:
        ranks = load["ranks"]
        lines.append(
            f"| {row['experts']} | {row['layers']} | {load['ep_size']} | {max(r['peak_rss_mb'] for r in ranks):,.0f} | "
            f"{max(r['rss_before_mb'] for r in ranks):,.0f} | {max(r['params_held'] for r in ranks) / 1e6:.0f}M | "
            f"{max(r['seconds'] for r in ranks):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    workers = {
        "check": check_worker,
        "export_ckpt": lambda ckpt: export_worker(ckpt, args.max_shard_size),
        "stock_check": stock_check_worker,
        "load": lambda stock: load_worker(stock, args.ep_size),
        "save_ep": lambda stock: save_ep_worker(stock, args.ep_size, args.ckpt_out),
    }
    chosen = [(name, getattr(args, name)) for name in workers if getattr(args, name)]
    if chosen:
        out = workers[chosen[0][0]](chosen[0][1])
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
    shape = f"Qwen3-MoE, d {args.hidden_size}, experts of width {args.moe_width}, top-8, vocab {args.vocab_size}"
    rows = []
    for experts in args.experts:
        for layers in args.layers:
            rows.append(measure(args, experts, layers))
            print(report({"shape": shape, "command": "", "machine": "", "rows": rows[-1:]}), flush=True)
    result = {"command": command_line("python"), "machine": machine(torch.device("cpu")), "shape": shape, "rows": rows}
    write_json(out / "import.json", result)
    (out / "report.md").write_text(report(result))
    print(report(result))
    return 0


def measure(args, experts: int, layers: int) -> dict:
    """One (E, depth): the check, the export (with --export) and the EP loads, each in fresh processes."""
    with tempfile.TemporaryDirectory() as tmp:
        stock = Path(tmp) / "stock"
        params = save_stock(stock, args, experts, layers)
        print(f"E={experts}, {layers} layers: {params / 1e6:.0f}M parameters", flush=True)
        row = {"experts": experts, "layers": layers, "params": params, "check": launch(args, "--check", str(stock))}
        if args.export:
            ckpt = Path(tmp) / "ckpt"
            if args.export_ep > 1:
                saved = launch(
                    args, "--save_ep", str(stock), "--ep_size", str(args.export_ep), "--ckpt_out", str(ckpt),
                    ranks=args.export_ep,
                )  # fmt: skip
            else:
                save_ours(stock, ckpt)
                saved = {"ep_size": 1}
            saved["layout"] = "deepspeed" if args.export_ep > 1 else "accelerate"
            saved["files"] = len(list(ckpt.iterdir()))
            row["export"] = launch(args, "--export_ckpt", str(ckpt), "--max_shard_size", args.max_shard_size)
            row["export"]["checkpoint"] = saved
            row["export"]["stock_check"] = launch(args, "--stock_check", str(Path(tmp) / "export"))
        row["loads"] = [
            launch(args, "--load", str(stock), "--ep_size", str(p), ranks=p) for p in args.ep if experts % p == 0
        ]
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    p.add_argument("--ep", type=int, nargs="*", default=[1, 2, 4], help="EP sizes of the per-rank load (none: skip)")
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--layers", type=int, nargs="+", default=[8], help="depths to measure")
    p.add_argument("--export", action="store_true", help="also measure the export of the converted checkpoint")
    p.add_argument(
        "--export_ep",
        type=int,
        default=1,
        help="the exported checkpoint: 1, accelerate's layout; P > 1, DeepSpeed's, saved by P ranks at EP = P",
    )
    p.add_argument("--max_shard_size", default="50GB", help="the export's --max_shard_size")
    p.add_argument("--moe_width", type=int, default=512)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--out", default="docs/import")
    p.add_argument("--check", help=argparse.SUPPRESS)
    p.add_argument("--load", help=argparse.SUPPRESS)
    p.add_argument("--export_ckpt", help=argparse.SUPPRESS)
    p.add_argument("--stock_check", help=argparse.SUPPRESS)
    p.add_argument("--save_ep", help=argparse.SUPPRESS)
    p.add_argument("--ckpt_out", help=argparse.SUPPRESS)
    p.add_argument("--ep_size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
