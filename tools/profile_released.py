"""The import check and a round trip at released models' widths and vocabularies, one or two decoder layers, random
weights: peak RSS of each process against the model's fp32 size, and the max logit difference.

For each model (`--models`) a random stock folder is saved in bf16, sharded as the hub ships it, and then, each in
a fresh process that records its peak RSS (VmHWM):
- `check`: `convert.stock_import.check_import`, as rank 0 runs it when `--init_from` starts a run;
- `import`: the stock folder read tensor by tensor under our names (the `--init_from` weight source) and written
  as our fp32 checkpoint (accelerate's layout), streamed (`export.shard_writer`);
- `export`: `export_standard` of that checkpoint back to the stock class (what `python -m moe_dist.export CKPT
  OUT --format F --max_shard_size 2GB` runs), whose fp32 logits check must pass (1e-4);
- `stock_check`: that check's child on its own (`convert/stock_stream.py`, strict), on the exported folder.
Results: `released.json` and `report.md` in `--out`, a row stored as soon as its model is measured (the rows of
earlier commands kept, each with its command and machine), so the heavy ones can be run alone.

    python tools/profile_released.py --models Llama-3.2-1B --out docs/import/released
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe_dist.analysis.bench import claim_dir, command_line, is_our_json, machine, write_json

MB = 2**20
# The released configs' shapes (their config.json), at `layers` decoder layers.
MODELS = {
    "Qwen3-30B-A3B": (
        "qwen3_moe",
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            vocab_size=151936,
            rope_theta=1e6,
            norm_topk_prob=True,
            max_position_embeddings=40960,
            tie_word_embeddings=False,
        ),
        1,
    ),
    "OLMoE-1B-7B": (
        "olmoe",
        dict(
            hidden_size=2048,
            intermediate_size=1024,
            num_experts=64,
            num_experts_per_tok=8,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=50304,
            norm_topk_prob=False,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
        2,
    ),
    "Mixtral-8x7B": (
        "mixtral",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_local_experts=8,
            num_experts_per_tok=2,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            rope_theta=1e6,
            max_position_embeddings=32768,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
        1,
    ),
    "Llama-3.2-1B": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            max_position_embeddings=131072,
            tie_word_embeddings=True,
        ),
        2,
    ),
    # The installed class's defaults are ERNIE-4.5-21B-A3B's: 64 experts of width 1536, top-6, 2 shared experts,
    # the first layer dense, d 2560, vocab 103,424, tied.
    "ERNIE-4.5-21B-A3B": ("ernie4_5_moe", {}, 2),
}


# The released depths, for the memory each process needs at full size: it holds the embeddings, the head and about
# one decoder layer at a time (docs/import/depth, docs/import/export16: flat in depth), so the rows measured at one
# or two layers bound the full models.
FULL_LAYERS = {
    "Qwen3-30B-A3B": 48,
    "OLMoE-1B-7B": 16,
    "Mixtral-8x7B": 32,
    "Llama-3.2-1B": 16,
    "ERNIE-4.5-21B-A3B": 28,
}
BASE_MB = 512  # the interpreter, torch and transformers, before any tensor (profile_import's `before`)
PROCESSES = ("check", "export", "stock_check")


def span_params(name: str, layers: int) -> tuple[int, int]:
    """(parameters outside the decoder layers, those of the largest layer) of `name` at `layers` layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, fields, _ = MODELS[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, num_hidden_layers=layers, **fields))
    per_layer: dict[str, int] = {}
    outside = 0
    for key, p in model.named_parameters():  # tied weights once, as num_parameters counts them
        parts = key.split(".")
        if "layers" in parts:
            layer = parts[parts.index("layers") + 1]
            per_layer[layer] = per_layer.get(layer, 0) + p.numel()
        else:
            outside += p.numel()
    return outside, max(per_layer.values())


def full_size(result: dict) -> list[str]:
    """The bound fitted on the rows, peak <= BASE_MB + k x fp32(outside + largest layer) per process, and what it
    gives at each model's released depth."""
    spans = {r["model"]: sum(span_params(r["model"], r["layers"])) * 4 / MB for r in result["rows"]}
    k = {
        proc: max((r[proc]["peak_rss_mb"] - BASE_MB) / spans[r["model"]] for r in result["rows"] if proc in r)
        for proc in PROCESSES
    }
    lines = [
        "",
        "## At full size",
        "",
        f"Each process holds the embeddings, the head and about one decoder layer at a time, so its peak is fitted as "
        f"{BASE_MB} MB + k x the fp32 size of (everything outside the decoder layers + the largest layer), k the "
        f"largest over the rows above: check k = {k['check']:.2f}, export k = {k['export']:.2f}, stock check "
        f"k = {k['stock_check']:.2f}. The same span at the released depth gives each model's need per process "
        f"(GB = 2^30 bytes); the whole model in fp32 is what the earlier import check held about 2.4x of.",
        "",
        "| model | released layers | params | fp32 (GB) | span (GB) | check (GB) | export (GB) | stock check (GB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        outside, layer = span_params(r["model"], FULL_LAYERS[r["model"]])
        params = outside + layer + (FULL_LAYERS[r["model"]] - 1) * layer  # an upper count: every layer the largest
        span_mb = (outside + layer) * 4 / MB
        need = [f"{(BASE_MB + k[p] * span_mb) / 1024:.1f}" for p in PROCESSES]
        lines.append(
            f"| {r['model']} | {FULL_LAYERS[r['model']]} | <= {params / 1e9:.1f}B | {params * 4 / 2**30:.0f} | "
            f"{span_mb / 1024:.2f} | {' | '.join(need)} |"
        )
    return lines


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def save_worker(name: str, folder: str) -> dict:
    """A random stock folder of `name`'s shape in bf16, sharded at 2 GB; its parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, fields, layers = MODELS[name]
    config = AutoConfig.for_model(model_type, num_hidden_layers=layers, **fields)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.02)
    model.save_pretrained(folder, max_shard_size="2GB")
    return {"params": model.num_parameters(), "format": model_type}


def check_worker(folder: str) -> dict:
    from moe_dist import MoEConfig
    from moe_dist.convert.stock_import import check_import, read_init_config

    init = read_init_config(Path(folder))
    t0 = time.perf_counter()
    diff = check_import(init, MoEConfig(**init.fields))
    return {"diff": diff, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def import_worker(folder: str, ckpt: str) -> dict:
    """The stock folder as our fp32 checkpoint, a tensor at a time: what a run started from it would hold."""
    from moe_dist import MoEConfig, MoEForCausalLM
    from moe_dist.checkpoint.formats import ACCELERATE_WEIGHTS
    from moe_dist.convert.stock_import import read_init_config, weight_source
    from moe_dist.export.native import folder_tensors
    from moe_dist.export.shard_writer import write_shards

    init = read_init_config(Path(folder))
    config = MoEConfig(**init.fields)
    source = weight_source(init, config)
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    target = Path(ckpt) / ACCELERATE_WEIGHTS
    target.parent.mkdir(parents=True)
    config.save_pretrained(ckpt)
    t0 = time.perf_counter()
    write_shards(folder_tensors(model), target.parent, 2**62, lambda t: _read_ours(source, t.name, model))
    os.rename(target.parent / "model.safetensors", target)  # one file: accelerate's name for it
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def _read_ours(source, name: str, model) -> torch.Tensor:
    source.close()  # a tensor at a time: unmap what was read before
    if source.has(name):
        return source.read(name).float()
    return torch.zeros(model.get_buffer(name).shape)  # a selection bias the stock class has none of


def export_worker(ckpt: str, fmt: str, out: str) -> dict:
    from moe_dist.export import export_standard

    t0 = time.perf_counter()
    diff = export_standard(ckpt, out, fmt, max_shard_size="2GB")
    files = sorted(p.name for p in Path(out).iterdir())
    return {"diff": diff, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "files": files}


def stock_check_worker(folder: str) -> dict:
    """The export's stock-class check alone (`convert/stock_stream.py` loaded by path, strict, the exporter's batch
    shape); this process imported moe_dist for the tool, so the script's guard against that is left out."""
    import importlib.util

    import moe_dist.convert

    spec = importlib.util.spec_from_file_location(
        "stock_stream_script", Path(moe_dist.convert.__file__).with_name("stock_stream.py")
    )
    stream = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stream)
    t0 = time.perf_counter()
    stream.stock_logits(folder, torch.zeros(2, 16, dtype=torch.long), strict=True)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


WORKERS = {
    "save": save_worker,
    "check": check_worker,
    "import": import_worker,
    "export": export_worker,
    "stock_check": stock_check_worker,
}


def launch(worker: str, *args: str) -> dict:
    """`worker(*args)` in a fresh interpreter; its result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        cmd = [sys.executable, __file__, "--worker", worker, "--result", str(result), *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(
                f"error: {worker} {' '.join(args)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
        return json.loads(result.read_text())


def measure(name: str, round_trip: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        stock, ckpt, out = (str(Path(tmp) / n) for n in ("stock", "ckpt", "export"))
        row = {"model": name, "layers": MODELS[name][2], **launch("save", name, stock)}
        print(f"{name}: {row['params'] / 1e6:,.0f}M parameters at {row['layers']} layer(s)", flush=True)
        row["check"] = launch("check", stock)
        if round_trip:
            row["import"] = launch("import", stock, ckpt)
            row["export"] = launch("export", ckpt, row["format"], out)
            row["stock_check"] = launch("stock_check", out)
        print(json.dumps(row), flush=True)
    return row


def report(result: dict) -> str:
    lines = [
        "# The import check and round trip at released widths",
        "",
        "Each row was measured by the command, on the machine, that `released.json` records beside it.",
        "",
        "Random weights at each model's released width, heads, experts and vocabulary, one or two decoder layers, "
        "saved in bf16 sharded at 2 GB. Peak RSS (VmHWM) of each process in MB and as a multiple of the model's "
        "fp32 size (x); diff: max |logit difference| in fp32 (the bound is 1e-4). check: the `--init_from` "
        "exactness check; import: the stock folder written as our fp32 checkpoint a tensor at a time; export: "
        "`export_standard` back to the stock class, with its check; stock check: that check's child process alone.",
        "",
        "| model | layers | params | fp32 (MB) | check: peak (MB, x), diff | import: peak (MB, x) | "
        "export: peak (MB, x), diff, files | stock check: peak (MB, x) |",
        "|---|---:|---:|---:|---|---|---|---|",
    ]
    for row in result["rows"]:
        fp32 = row["params"] * 4 / MB
        peak = lambda part: f"{part['peak_rss_mb']:,.0f} ({part['peak_rss_mb'] / fp32:.2f}x)"  # noqa: B023, E731
        cells = [f"{peak(row['check'])}, {row['check']['diff']:.1e}"]
        if "export" in row:
            shards = sum(f.endswith(".safetensors") for f in row["export"]["files"])
            cells += [
                peak(row["import"]),
                f"{peak(row['export'])}, {row['export']['diff']:.1e}, {shards} shard(s)",
                peak(row["stock_check"]),
            ]
        else:
            cells += ["-", "-", "-"]
        lines.append(
            f"| {row['model']} | {row['layers']} | {row['params'] / 1e6:,.0f}M | {fp32:,.0f} | {' | '.join(cells)} |"
        )
    return "\n".join(lines + full_size(result)) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--no_round_trip", nargs="*", default=[], help="models to check only (memory)")
    p.add_argument("--out", default="docs/import/released")
    p.add_argument("--report_only", action="store_true", help="rewrite report.md from the stored rows, measure none")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(WORKERS[args.worker](*rest)))
        return 0
    out = claim_dir(
        args.out,
        "profile_released",
        ["released.json", "report.md"],
        what="--out",
        legacy=lambda d: is_our_json(d / "released.json", ("command", "rows")),
    )
    # Models are measured one at a time (the heavy ones alone): each row is stored as soon as it is measured, beside
    # the rows of earlier commands, with the command and machine that measured it.
    stored = out / "released.json"
    result = json.loads(stored.read_text()) if stored.is_file() else {"rows": []}
    for name in [] if args.report_only else args.models:
        row = measure(name, name not in args.no_round_trip)
        row.update(command=command_line("python"), machine=machine(torch.device("cpu")))
        result["rows"] = [r for r in result["rows"] if r["model"] != name] + [row]
        write_json(stored, result)
        (out / "report.md").write_text(report(result))
    (out / "report.md").write_text(report(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
