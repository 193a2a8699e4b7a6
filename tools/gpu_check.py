"""One-shot GPU check: everything a first GPU must show, in one command, in under 8 minutes on one H100/H200.

Stages, in order; the first failure stops the run with one line naming the stage (exit 1):

1. `unit_tests`: `pytest` on `tests/test_on_device.py` with MOE_DIST_TEST_DEVICE set to the device
   (fp32 forward and gradients against the CPU, routers in fp32 under bf16 autocast, the grouped
   expert GEMM against the per-expert loop, cached generation), then the model, routing and
   generation tests, which pick no device and run on CPU.
2. `train`: 50 bf16 steps of `tiny-moe` on each engine (accelerate; DeepSpeed with `ds_configs/ep1.json`
   through `deepspeed --num_gpus 1`) on the bundled sample with a `train:4096` tokenizer: every logged
   loss finite, and the router in fp32 under bf16 autocast on the device (logits, gate weights, loss).
3. `resume_export_generate`: the accelerate run again with more steps (it must resume, not restart),
   `python -m moe_dist.export`, and `launch/generate.py --device cuda` on the export.
4. `bench_moe`: `tools/bench_moe.py` at the seed shape (d_model 512, FFN 2048, 4096 tokens, E=8/16 top-1) in bf16.
5. `bench_train`: `tools/bench_train.py --scale seed --device cuda`: dense and E=4/8/16 top-1 tok/s and ratios.
6. `profile_memory`: `tools/profile_memory.py --measure ds_configs/ep1.json`: measured (allocated, reserved,
   NVML) against predicted.

Writes `<out>/<gpu-name>.json` (per stage: command, wall time, status, key numbers) and `<gpu-name>.md`.

    python tools/gpu_check.py                              # on the GPU machine: docs/gpu/<gpu-name>.json
    python tools/gpu_check.py --dry-run --out /tmp/gpu     # every stage at toy size on CPU (what CI runs)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe_dist.analysis.bench import claim_dir, command_line, is_our_json, machine, write_json
from moe_dist.parallel.process_group import free_port

ROOT = Path(__file__).resolve().parents[1]  # the checkout: launch/, ds_configs/, tests/
FIXTURES = ROOT / "tests" / "fixtures"
STAGES = ("unit_tests", "train", "resume_export_generate", "bench_moe", "bench_train", "profile_memory")


class StageFailed(Exception):
    """A stage's check did not hold; the message is the one line the user sees."""


# ---- running commands -------------------------------------------------------------------


def env(args) -> dict:
    # MOE_DIST_TEST_DEVICE: the device tests/test_on_device.py runs on.
    e = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", MOE_DIST_TEST_DEVICE=args.device)
    if args.dry_run:
        e.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return e


def run(cmd: list[str], args, record: dict, *, timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` from the checkout, log it into `record["commands"]`; a non-zero exit fails the stage."""
    cmd = [str(c) for c in cmd]
    record.setdefault("commands", []).append(shlex.join(cmd))
    print(f"  $ {shlex.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env(args), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StageFailed(f"`{Path(cmd[1]).name if len(cmd) > 1 else cmd[0]}` timed out after {timeout:.0f} s")
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        print("\n".join(f"    | {line}" for line in tail), flush=True)  # context; stderr gets one line
        last = tail[-1] if tail else ""
        raise StageFailed(f"`{shlex.join(cmd[:3])} ...` exited {proc.returncode}: {last[:200]}")
    return proc


def python(*args_) -> list[str]:
    return [sys.executable, *map(str, args_)]


def deepspeed_launch(script: Path, args) -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()),
            str(script)]


def read_json(path: Path) -> dict:
    if not path.exists():
        raise StageFailed(f"{path} was not written")
    return json.loads(path.read_text())


# ---- stages -----------------------------------------------------------------------------


def stage_unit_tests(args, work: Path, rec: dict) -> None:
    # tests/test_on_device.py runs on args.device; the other files select no device (CPU). The dry
    # run keeps to one device test: the stage's plumbing is what it checks.
    files = ["tests/test_on_device.py", "-k", "fp32_forward"] if args.dry_run else \
        ["tests/test_on_device.py", "tests/test_routing.py", "tests/test_model.py", "tests/test_generate.py"]
    proc = run(python("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files), args, rec,
               timeout=args.stage_timeout)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", proc.stdout)}
    rec.update(counts, files=files, device=args.device,
               note=f"tests/test_on_device.py ran on {args.device}; the other files on CPU")
    if not counts.get("passed"):
        raise StageFailed("pytest reported no passed test")


def train_args(args, run_dir: Path, steps: int) -> list[str]:
    if args.dry_run:
        data = ["--train_file", FIXTURES / "stories.txt", "--valid_file", FIXTURES / "stories_valid.txt",
                "--tokenizer", "train:512", "--seq_len", "32", "--max_valid_blocks", "8"]
    else:
        data = ["--tokenizer", "train:4096"]  # the bundled sample in data/
    return ["--model", "tiny-moe", *data, "--max_steps", steps, "--eval_every", steps, "--save_every", steps,
            "--log_every", 1 if args.dry_run else 5, "--warmup_steps", 2, "--seed", 0, "--output_dir", run_dir]


def check_run(run_dir: Path, steps: int) -> dict:
    """The run's summary numbers; every logged training loss must be finite."""
    summary = read_json(run_dir / "summary.json")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if r.get("kind") == "train" and "loss" in r]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise StageFailed(f"{run_dir.name}: non-finite or missing training losses {losses[-5:]}")
    if summary["steps"] != steps:
        raise StageFailed(f"{run_dir.name}: stopped at step {summary['steps']}, not {steps}")
    return {"steps": summary["steps"], "first_loss": losses[0], "last_loss": losses[-1],
            "final_val_ppl": summary.get("final_val_ppl"), "max_tok_s": summary.get("max_tok_s"),
            "precision": summary.get("precision"), "engine": summary.get("engine"),
            "peak_mem_mb": summary.get("peak_mem_mb"),
            "peak_reserved_mb_per_rank": summary.get("peak_reserved_mb_per_rank"),
            "nvml_used_mb_per_rank": summary.get("nvml_used_mb_per_rank")}


def stage_train(args, work: Path, rec: dict) -> None:
    steps = args.steps
    precision = [] if args.dry_run else ["--precision", "bf16"]
    run(python(ROOT / "launch" / "train.py", *train_args(args, work / "accelerate", steps), *precision), args, rec,
        timeout=args.stage_timeout)
    rec["accelerate"] = check_run(work / "accelerate", steps)
    ds_config = ROOT / "ds_configs" / ("cpu_ep1.json" if args.dry_run else "ep1.json")
    run([*deepspeed_launch(ROOT / "launch" / "train.py", args), "--deepspeed", ds_config,
         *train_args(args, work / "deepspeed", steps)], args, rec, timeout=args.stage_timeout)
    rec["deepspeed"] = check_run(work / "deepspeed", steps)
    if not args.dry_run:
        for name in ("accelerate", "deepspeed"):
            if rec[name]["precision"] != "bf16":
                raise StageFailed(f"{name} trained in {rec[name]['precision']}, not bf16")
    proc = run(python(Path(__file__), "--router_check", work / "accelerate" / "hf", "--device", args.device),
               args, rec, timeout=args.stage_timeout)
    rec["router"] = json.loads(proc.stdout.strip().splitlines()[-1])
    if not rec["router"]["fp32"]:
        raise StageFailed(f"router not in fp32 under bf16 autocast: {rec['router']['dtypes']}")


def stage_resume_export_generate(args, work: Path, rec: dict) -> None:
    more = args.steps + max(2, args.steps // 5)
    proc = run(python(ROOT / "launch" / "train.py", *train_args(args, work / "accelerate", more),
                      *([] if args.dry_run else ["--precision", "bf16"])), args, rec, timeout=args.stage_timeout)
    resumed = re.search(r"resumed from \S+ \(step (\d+)\)", proc.stdout + proc.stderr)
    if not resumed or int(resumed.group(1)) != args.steps:
        raise StageFailed(f"the second run did not resume from step {args.steps}")
    rec["resume"] = {"from_step": int(resumed.group(1)), **check_run(work / "accelerate", more)}
    export = work / "export"
    run(python("-m", "moe_dist.export", work / "accelerate", export), args, rec, timeout=args.stage_timeout)
    if not (export / "model.safetensors").exists():
        raise StageFailed(f"export wrote no {export / 'model.safetensors'}")
    samples = work / "generate.json"
    t0 = time.perf_counter()
    run(python(ROOT / "launch" / "generate.py", "--model_path", export, "--device", args.device,
               "--prompt", "Once upon a time", "--max_new_tokens", 8 if args.dry_run else 64, "--seed", 0,
               "--json", samples), args, rec, timeout=args.stage_timeout)
    out = read_json(samples)
    text = json.dumps(out.get("samples", out))
    rec["generate"] = {"device": args.device, "seconds": time.perf_counter() - t0, "sample": text[:300]}


def stage_bench_moe(args, work: Path, rec: dict) -> None:
    shape = ["--d_model", 64, "--ffn", 128, "--tokens", 256, "--experts", 4, "--iters", 2, "--warmup", 1,
             "--repeats", 2] if args.dry_run else \
        ["--d_model", 512, "--ffn", 2048, "--tokens", 4096, "--experts", 8, 16]
    run(python(ROOT / "tools" / "bench_moe.py", *shape, "--top_k", 1, "--dtype", "bf16", "--device", args.device,
               "--json", work / "bench_moe.json"), args, rec, timeout=args.stage_timeout)
    rows = read_json(work / "bench_moe.json")["rows"]
    rec["rows"] = [{k: r[k] for k in ("variant", "tokens", "tok_s", "vs_dense", "vs_ds")} for r in rows]


def stage_bench_train(args, work: Path, rec: dict) -> None:
    # The dry run times one expert kernel; on the GPU both (grouped and loop), side by side.
    size = ["--scale", "tiny", "--experts", 4, "--seq_len", 32, "--micro_batch_size", 2, "--rounds", 2,
            "--warmup", 1, "--experts_impl", "grouped"] if args.dry_run else ["--scale", "seed", "--experts", 4, 8, 16]
    run(python(ROOT / "tools" / "bench_train.py", *size, "--device", args.device, "--json", work / "bench_train.json"),
        args, rec, timeout=args.stage_timeout)
    rows = read_json(work / "bench_train.json")["rows"]
    rec["rows"] = [{k: r.get(k) for k in ("variant", "experts", "tok_s", "vs_dense", "step_ms", "peak_mb")}
                   for r in rows]


def stage_profile_memory(args, work: Path, rec: dict) -> None:
    if args.dry_run:
        measure = ["--measure", ROOT / "ds_configs" / "cpu_ep1.json", "--seq_len", 32, "--max_steps", 2]
    else:
        measure = ["--measure", ROOT / "ds_configs" / "ep1.json", "--max_steps", 4,
                   "--gpu_mem_gib", torch.cuda.get_device_properties(0).total_memory / 2**30]
    run(python(ROOT / "tools" / "profile_memory.py", "--preset", "tiny-moe", "--ds_configs", *measure,
               "--output_dir", work / "memory"), args, rec, timeout=args.stage_timeout)
    rows = read_json(work / "memory" / "memory.json")["rows"]
    rec["rows"] = [{k: r.get(k) for k in ("config", "world_size", "precision", "measured_mb", "allocated_mb_per_rank",
                                          "reserved_mb_per_rank", "nvml_used_mb_per_rank", "verdict")}
                   | {"predicted_mb": r["predicted"]["total"] / 2**20 if r.get("predicted") else None} for r in rows]
    if not any(r["measured_mb"] for r in rec["rows"]):
        raise StageFailed("profile_memory measured nothing")


# ---- the router check (run as a child process by the train stage) -------------------------


def router_check(hf_dir: str, device: str) -> dict:
    """Forward a batch under bf16 autocast; the dtypes of every router's logits, gate weights and loss."""
    from moe_dist import MoEForCausalLM
    from moe_dist.model.routing import Router

    model = MoEForCausalLM.from_pretrained(hf_dir).to(device).eval()
    dtypes, routes = set(), {}

    def hook(name):
        def fn(module, inputs, out):
            dtypes.update({f"weight:{out.weight_TK.dtype}", f"loss:{out.loss.dtype}"})
            routes[name] = out.expert_idx_TK.detach().cpu()
        return fn

    def linear_hook(module, inputs, out):
        dtypes.add(f"logits:{out.dtype}")

    for name, m in model.named_modules():
        if isinstance(m, Router):
            m.register_forward_hook(hook(name))
            for child in m.modules():
                if isinstance(child, torch.nn.Linear):
                    child.register_forward_hook(linear_hook)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device=device)
    with torch.no_grad():
        model(input_ids=ids)
        fp32_routes = dict(routes)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            model(input_ids=ids)
    agree = [float((routes[k] == fp32_routes[k]).float().mean()) for k in routes]
    return {"fp32": bool(dtypes) and all(d.endswith("torch.float32") for d in dtypes), "dtypes": sorted(dtypes),
            "routers": len(routes), "route_agreement_min": min(agree) if agree else None}


# ---- the check --------------------------------------------------------------------------


def gpu_name(args) -> str:
    if args.dry_run or not torch.cuda.is_available():
        return "cpu-dry-run"
    return re.sub(r"[^A-Za-z0-9.]+", "-", torch.cuda.get_device_name(0)).strip("-")


def headline(name: str, rec: dict) -> str:
    """A stage's key numbers in one table cell."""
    if rec.get("error"):
        return rec["error"]
    if name == "unit_tests":
        return f"{rec.get('passed', 0)} passed ({rec['device']}; {rec['note']})"
    if name == "train":
        runs = [f"{e}: loss {rec[e]['first_loss']:.3f} -> {rec[e]['last_loss']:.3f}, {rec[e]['precision']}, "
                f"{rec[e]['max_tok_s']:,.0f} tok/s, peak {rec[e]['peak_mem_mb']:,.0f} MB"
                for e in ("accelerate", "deepspeed") if e in rec]
        router = rec.get("router", {})
        return "; ".join(runs + [f"router fp32 under bf16 autocast: {router.get('fp32')}"])
    if name == "resume_export_generate":
        return f"resumed from step {rec['resume']['from_step']} to {rec['resume']['steps']}; exported; " \
               f"generated on {rec['generate']['device']}"
    if name in ("bench_moe", "bench_train"):
        return ", ".join(f"{r['variant']}: {r['tok_s']:,.0f} tok/s ({r['vs_dense']:.2f}x dense)" for r in rec["rows"])
    if name == "profile_memory":
        return ", ".join(f"{r['config']}: predicted {r['predicted_mb'] or 0:,.0f} MB, measured "
                         f"{r['measured_mb'] or 0:,.0f} MB, reserved {r['reserved_mb_per_rank']}, {r['verdict']}"
                         for r in rec["rows"])
    return ""


def summary_md(result: dict) -> str:
    lines = [f"# GPU check: {result['gpu']}", "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}", "", f"Result: **{result['status']}** in {result['wall_s']:.0f} s", "",
             "| stage | status | wall (s) | key numbers |", "|---|---|---|---|"]
    for name, rec in result["stages"].items():
        try:
            cell = headline(name, rec)
        except (KeyError, TypeError, ValueError):  # a stage that stopped half-way: its JSON has what there is
            cell = "see the JSON"
        lines.append(f"| {name} | {rec['status']} | {rec['wall_s']:.1f} | {cell.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.router_check:
        print(json.dumps(router_check(args.router_check, args.device)))
        return 0
    name = gpu_name(args)
    out = claim_dir(args.out, "gpu_check", [f"{name}.json", f"{name}.md"], what="--out",
                    legacy=lambda d: is_our_json(d / f"{name}.json", ("stages",)))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))  # kept: the runs of a failed stage
    work.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: runs, exports and bench JSONs in {work}", flush=True)
    result = {"gpu": name, "dry_run": args.dry_run, "command": command_line("python"),
              "machine": machine(torch.device(args.device)), "stages": {}, "status": "running"}
    start, failed = time.perf_counter(), None
    for stage in STAGES:
        rec = result["stages"][stage] = {"status": "running"}
        print(f"[{stage}]", flush=True)
        t0 = time.perf_counter()
        try:
            if stage == args.fail_stage:
                raise StageFailed("failed on purpose (--fail_stage)")
            globals()[f"stage_{stage}"](args, work, rec)
            rec["status"] = "passed"
        except StageFailed as e:
            rec.update(status="failed", error=str(e))
            failed = f"gpu_check: stage {stage} failed: {e}"
        rec["wall_s"] = time.perf_counter() - t0
        print(f"[{stage}] {rec['status']} in {rec['wall_s']:.1f} s", flush=True)
        if failed:
            break
    result.update(status="failed" if failed else "passed", wall_s=time.perf_counter() - start)
    write_json(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(summary_md(result))
    if failed:
        print(failed, file=sys.stderr)
        return 1
    print(f"gpu_check: all {len(STAGES)} stages passed in {result['wall_s']:.0f} s; wrote {out / name}.json")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="every stage at toy size on CPU (tiny presets, few steps, CPU-rank DeepSpeed)")
    p.add_argument("--out", default=str(ROOT / "docs" / "gpu"), help="where <gpu-name>.json and .md go")
    p.add_argument("--work_dir", help="runs, exports and bench JSONs (default: a new temporary folder)")
    p.add_argument("--device", help="default: cuda, or cpu with --dry-run")
    p.add_argument("--steps", type=int, help="training steps per engine (default 50; 3 with --dry-run)")
    p.add_argument("--stage_timeout", type=float, default=600, help="seconds any one command may take")
    p.add_argument("--fail_stage", choices=STAGES, help="debug: make this stage fail, to test the stop")
    p.add_argument("--router_check", metavar="HF_DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry_run or args.router_check else "cuda")
    args.steps = args.steps or (3 if args.dry_run else 50)
    if args.device.startswith("cuda") and not args.router_check and not torch.cuda.is_available():
        p.error("no CUDA device visible: run on a GPU machine, or use --dry-run")
    return args


if __name__ == "__main__":
    sys.exit(main())
