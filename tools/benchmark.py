"""Inference benchmark of one model: size, FLOPs per token, prefill and decode latency, throughput, memory.

What is measured, for an exported `hf/` folder (`--model_path`) or a preset with random
weights (`--preset`), on `--device` (cpu or cuda) in `--dtype`:

- `params_total` / `params_active`: all parameters, and those one token passes through
  (k of E routed experts), from the built model;
- `flops_per_token`: forward FLOPs of one token at `--context` (default: the model's
  context length), itemised, from the analytic `moe_dist.analysis.costs.flops_per_token`
  (2 FLOPs per multiply-add, attention at full context; see its docstring);
- per batch size (`--batch_sizes`, default 1 and 8), with a `--prompt_len`-token random
  prompt and greedy decoding of `--new_tokens` tokens through the KV cache:
  `prefill_ms` (one forward over the prompt, filling the cache), `decode_ms` (one
  forward of one new token per sequence), `generate_tok_s` (batch x new tokens / the whole
  prefill + decode time), `prefill_gflop_s` (prefill FLOPs at context = prompt length,
  with the lm_head on the last position only as it runs, / prefill time), and
  `peak_mem_mb` from `moe_dist.train.metrics.peak_memory_mb` (CUDA: the allocator's peak for
  this batch size; CPU: the process's lifetime peak RSS, which only grows).

Method: explicit forward calls with the KV `cache` (what `generate` does, minus its
bookkeeping), in `torch.no_grad` and eval mode (MoE routing is dropless at eval), timed
with a device sync; `--warmup` untimed generations, then the median over `--repeats`
generations (and over their decode steps). CPU numbers on a shared machine are noisy.

    python tools/benchmark.py --preset tiny-moe --json bench.json
    python tools/benchmark.py --model_path runs/e8/hf --device cuda --dtype bfloat16 --prompt_len 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from moe_dist import MoEConfig, MoEForCausalLM
from moe_dist.analysis.bench import claim_json, command_line, machine, require_device, sync, write_json
from moe_dist.analysis.costs import flops_per_token
from moe_dist.model.modeling import CACHE_FIELD
from moe_dist.train.metrics import peak_memory_mb, reset_peak_memory


def load_model(args) -> MoEForCausalLM:
    dtype = getattr(torch, args.dtype)
    if args.model_path:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype)
    else:
        torch.manual_seed(args.seed)
        model = MoEForCausalLM(MoEConfig.from_preset(args.preset)).to(dtype)
    return model.to(args.device).eval()


@torch.no_grad()
def generate_once(model, prompt_BS: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
    """Greedy generation through the KV cache; returns (prefill seconds, seconds of each decode step)."""
    device = prompt_BS.device
    sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt_BS, use_cache=True, logits_to_keep=1)
    next_B1 = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    prefill = time.perf_counter() - start
    steps = []
    for _ in range(new_tokens - 1):  # the prefill already produced the first new token
        start = time.perf_counter()
        out = model(input_ids=next_B1, cache=getattr(out, CACHE_FIELD), use_cache=True)
        next_B1 = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        steps.append(time.perf_counter() - start)
    return prefill, steps


def bench_batch(model, batch: int, args, prefill_flops_per_seq: float) -> dict:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    prompt_BS = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), generator=gen).to(device)
    reset_peak_memory(device)
    for _ in range(args.warmup):
        generate_once(model, prompt_BS, args.new_tokens)
    prefills, steps, totals = [], [], []
    for _ in range(args.repeats):
        prefill, decode = generate_once(model, prompt_BS, args.new_tokens)
        prefills.append(prefill)
        steps += decode
        totals.append(prefill + sum(decode))
    prefill_s = statistics.median(prefills)
    return {
        "batch": batch,
        "prefill_ms": 1e3 * prefill_s,
        "decode_ms": 1e3 * statistics.median(steps) if steps else None,
        "generate_tok_s": batch * args.new_tokens / statistics.median(totals),
        "prefill_gflop_s": prefill_flops_per_seq * batch / prefill_s / 1e9,
        "peak_mem_mb": peak_memory_mb(device)["peak_mem_mb"],
    }


def run(args) -> dict:
    model = load_model(args)
    config = model.config
    if args.prompt_len + args.new_tokens > config.max_position_embeddings:
        sys.exit(
            f"--prompt_len {args.prompt_len} + --new_tokens {args.new_tokens} exceed the model's context "
            f"(max_position_embeddings={config.max_position_embeddings})"
        )
    context = args.context or config.max_position_embeddings
    flops = flops_per_token(config, context=context)
    prompt = flops_per_token(config, context=args.prompt_len)
    # The prefill computes logits for the last position only (logits_to_keep=1).
    prefill_flops = (prompt["total"] - prompt["lm_head"]) * args.prompt_len + prompt["lm_head"]
    rows = [bench_batch(model, b, args, prefill_flops) for b in args.batch_sizes]
    return {
        "command": command_line(),
        "machine": machine(torch.device(args.device)),
        "model": args.model_path or args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "params_total": model.num_parameters(),
        "params_active": model.num_active_parameters(),
        "num_local_experts": config.num_local_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "context": context,
        "flops_per_token": flops,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "batches": rows,
    }


def print_report(r: dict) -> None:
    print(f"# {r['command']}\n# machine: {r['machine']}")
    print(
        f"model {r['model']} | {r['device']} {r['dtype']} | params total {r['params_total'] / 1e6:.2f}M, "
        f"active {r['params_active'] / 1e6:.2f}M | forward {r['flops_per_token']['total'] / 1e6:.1f} MFLOP/token "
        f"at context {r['context']}"
    )
    print("  " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in r["flops_per_token"].items() if v and k != "total"))
    print(f"prompt {r['prompt_len']} tokens, {r['new_tokens']} new tokens, median of {r['repeats']} generations")
    fmt = "{:>5} {:>11} {:>15} {:>12} {:>13} {:>12}"
    print(fmt.format("batch", "prefill ms", "decode ms/step", "gen tok/s", "prefill GF/s", "peak MB"))
    for row in r["batches"]:
        decode = f"{row['decode_ms']:.2f}" if row["decode_ms"] is not None else "-"
        print(
            fmt.format(
                row["batch"],
                f"{row['prefill_ms']:.2f}",
                decode,
                f"{row['generate_tok_s']:.1f}",
                f"{row['prefill_gflop_s']:.2f}",
                f"{row['peak_mem_mb']:.0f}",
            )
        )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model_path", help="an hf/ export (config.json + model.safetensors)")
    src.add_argument("--preset", help="a preset name, built with random weights")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="auto: bfloat16 on cuda, float32 on cpu",
    )
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=32, help="tokens generated per sequence")
    p.add_argument("--context", type=int, help="context of the FLOPs-per-token figure (default: the model's)")
    p.add_argument("--repeats", type=int, default=5, help="timed generations (median taken)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every number here")
    args = p.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if min(args.prompt_len, args.new_tokens, args.repeats, *args.batch_sizes) < 1 or args.warmup < 0:
        p.error("--prompt_len, --new_tokens, --repeats and --batch_sizes must be >= 1, --warmup >= 0")
    require_device(args.device, p.error)
    return args


def main(argv=None):
    args = parse_args(argv)
    claim_json(args.json, "benchmark")  # before any work: never over a file we did not write
    result = run(args)
    print_report(result)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
