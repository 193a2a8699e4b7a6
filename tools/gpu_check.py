"""One-shot GPU check: what a first GPU must show, in one command that always hands back what it measured.

    python tools/gpu_check.py --out "$OUT" --deadline_s 420   # on the GPU machine: $OUT/<gpu-name>.json and .md
    python tools/gpu_check.py --dry-run --out /tmp/gpu        # every stage at toy size on CPU (what CI runs)

Stages, the most valuable first (each with its planned seconds; `--dry-run` prints the plan):

1. `unit_tests`: `pytest` on `tests/test_on_device.py` with MOE_DIST_TEST_DEVICE set to the device (fp32
   forward and gradients against the CPU, routers in fp32 under bf16 autocast, the grouped expert GEMM
   against the per-expert loop, an empty expert's gradient, cached generation), then the model, routing
   and generation tests on CPU. No `-x`: one tolerance miss is one failed test, not a lost run.
2. `train`: 50 bf16 steps of `tiny-moe` on each engine (accelerate; DeepSpeed with `ds_configs/ep1.json`
   through its launcher, on the GPU CUDA_VISIBLE_DEVICES names) on the bundled sample: every logged loss
   finite, and the router's logits, gate weights and losses in fp32 under bf16 autocast.
3. `bench_moe`: `tools/bench_moe.py` at the seed shape (d_model 512, FFN 2048, 4096 tokens, E=8/16 top-1) in bf16.
4. `bench_train`: `tools/bench_train.py --scale seed --device cuda`: dense and E=4/8/16 top-1 tok/s and ratios.
5. `profile_memory`: `tools/profile_memory.py --measure ds_configs/ep1.json`: measured against predicted.
6. `resume_export_generate` (needs `train`): the accelerate run resumed for more steps, exported, and
   `launch/generate.py --device cuda` on the export.

It never loses what it measured: the JSON is rewritten atomically after every stage; any exception in a
stage (a failed check, a missing file, a crash, a timeout) is recorded with its type, message and the
last lines of the stage's output, and the run goes on with every stage that does not need the failed one.
`--deadline_s` bounds the whole run: a stage starts only if its planned time fits before the deadline
(else it is recorded as skipped), and each stage's commands are killed, with their whole process group,
at twice its plan or at the deadline, whichever comes first. Runs, exports and benchmark JSONs go to a
scratch folder (`--work_dir`); everything the check concludes is in `<out>/<gpu-name>.json` and `.md`.
Exit status: 0 when every stage passed, 1 when one failed or was skipped, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_dist.analysis.bench import claim_dir, command_line, is_our_json, machine
from moe_dist.atomic_io import write_atomic
from moe_dist.parallel.process_group import deepspeed_launcher, free_port

ROOT = Path(__file__).resolve().parents[1]  # the checkout: launch/, ds_configs/, tests/
FIXTURES = ROOT / "tests" / "fixtures"
TAIL_LINES = 30


class StageFailed(Exception):
    """A stage's check did not hold; the message is the line the summary shows."""


class Context:
    """What a stage works with: the arguments, its scratch folder, its record, and its time limit."""

    def __init__(self, args, work: Path, rec: dict, stage: str, ends_at: float):
        self.args, self.work, self.rec, self.stage, self.ends_at = args, work, rec, stage, ends_at
        self.output_tail: list[str] = []
        self.commands = 0

    def env(self) -> dict:
        # MOE_DIST_TEST_DEVICE: the device tests/test_on_device.py runs on. Offline always: a GPU
        # machine may reach no hub, and a stage must not wait on one.
        e = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            MOE_DIST_TEST_DEVICE=self.args.device,
        )
        if self.args.dry_run:
            e.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
        return e

    def run(self, cmd: list, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run `cmd` from the checkout in its own process session; a non-zero exit fails the stage, and at the
        stage's time limit the whole session (a launcher and its ranks) is killed."""
        cmd = [str(c) for c in cmd]
        self.rec.setdefault("commands", []).append(shlex.join(cmd))
        print(f"  $ {shlex.join(cmd)}", flush=True)
        timeout = max(1.0, self.ends_at - time.monotonic())
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env or self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's ranks too: nothing may keep the GPU
            out, _ = proc.communicate()
            self.output_tail = out.splitlines()[-TAIL_LINES:]
            raise StageFailed(f"`{_short(cmd)}` was killed after {timeout:.0f} s (the stage's time limit)") from None
        self.output_tail = out.splitlines()[-TAIL_LINES:]
        self.commands += 1
        if (self.stage, "exception") in self.args.inject and self.commands == 1:
            raise RuntimeError("injected after the stage's first command (--inject)")
        if proc.returncode != 0:
            last = self.output_tail[-1] if self.output_tail else ""
            raise StageFailed(f"`{_short(cmd)}` exited {proc.returncode}: {last[:200]}")
        return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _short(cmd: list[str]) -> str:
    return shlex.join(c if len(c) <= 60 else c[:57] + "..." for c in cmd[:3]) + (" ..." if len(cmd) > 3 else "")


def python(*args_) -> list[str]:
    return [sys.executable, *map(str, args_)]


def read_json(path: Path) -> dict:
    if not path.exists():
        raise StageFailed(f"{path} was not written")
    return json.loads(path.read_text())


# ---- stages -----------------------------------------------------------------------------


def stage_unit_tests(ctx: Context) -> None:
    # tests/test_on_device.py runs on the device; the other files select no device (CPU). The dry
    # run keeps to the device file: the stage's plumbing is what it checks.
    files = (
        ["tests/test_on_device.py"]
        if ctx.args.dry_run
        else ["tests/test_on_device.py", "tests/test_routing.py", "tests/test_model.py", "tests/test_generate.py"]
    )
    cmd = python("-m", "pytest", "-q", "-p", "no:cacheprovider", *files)
    try:
        out = ctx.run(cmd).stdout
    except StageFailed:
        out = "\n".join(ctx.output_tail)  # failed tests: still count them, then fail the stage
        _count_tests(ctx.rec, out, files, ctx.args.device)
        raise
    _count_tests(ctx.rec, out, files, ctx.args.device)
    if not ctx.rec.get("passed"):
        raise StageFailed("pytest reported no passed test")


def _count_tests(rec: dict, out: str, files: list[str], device: str) -> None:
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", out)}
    failed = re.findall(r"^FAILED (\S+)", out, flags=re.M)
    rec.update(
        counts,
        files=files,
        device=device,
        failed_tests=failed,
        note=f"tests/test_on_device.py ran on {device}; the other files on CPU",
    )


def train_args(args, run_dir: Path, steps: int) -> list:
    if args.dry_run:
        data = [
            "--train_file",
            FIXTURES / "stories.txt",
            "--valid_file",
            FIXTURES / "stories_valid.txt",
            "--tokenizer",
            "train:512",
            "--seq_len",
            "32",
            "--max_valid_blocks",
            "8",
        ]
    else:
        data = ["--tokenizer", "train:4096"]  # the bundled sample in data/
    return [
        "--model",
        "tiny-moe",
        *data,
        "--max_steps",
        steps,
        "--eval_every",
        steps,
        "--save_every",
        steps,
        "--log_every",
        1 if args.dry_run else 5,
        "--warmup_steps",
        2,
        "--seed",
        0,
        "--keep_last",
        1,
        "--output_dir",
        run_dir,
    ]


def check_run(run_dir: Path, steps: int) -> dict:
    """The run's summary numbers; every logged training loss must be finite (NaN is written as null)."""
    summary = read_json(run_dir / "summary.json")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r.get("loss") for r in rows if r.get("kind") == "train"]
    if not losses or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses):
        raise StageFailed(f"{run_dir.name}: non-finite or missing training losses {losses[-5:]}")
    if summary.get("steps") != steps:
        raise StageFailed(f"{run_dir.name}: stopped at step {summary.get('steps')}, not {steps}")
    keys = (
        "final_val_ppl",
        "max_tok_s",
        "precision",
        "engine",
        "peak_mem_mb",
        "peak_reserved_mb_per_rank",
        "nvml_used_mb_per_rank",
    )
    return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1], **{k: summary.get(k) for k in keys}}


def stage_train(ctx: Context) -> None:
    args, steps = ctx.args, ctx.args.steps
    precision = [] if args.dry_run else ["--precision", "bf16"]
    ctx.run(python(ROOT / "launch" / "train.py", *train_args(args, ctx.work / "accelerate", steps), *precision))
    ctx.rec["accelerate"] = check_run(ctx.work / "accelerate", steps)
    env = ctx.env()
    launcher, launcher_env = deepspeed_launcher(1, env)
    ds_config = ROOT / "ds_configs" / ("cpu_ep1.json" if args.dry_run else "ep1.json")
    ctx.run(
        [
            *launcher,
            "--master_port",
            free_port(),
            ROOT / "launch" / "train.py",
            "--deepspeed",
            ds_config,
            *train_args(args, ctx.work / "deepspeed", steps),
        ],
        env={**env, **launcher_env},
    )
    ctx.rec["deepspeed"] = check_run(ctx.work / "deepspeed", steps)
    if not args.dry_run:
        for name in ("accelerate", "deepspeed"):
            if ctx.rec[name]["precision"] != "bf16":
                raise StageFailed(f"{name} trained in {ctx.rec[name]['precision']}, not bf16")
    proc = ctx.run(python(Path(__file__), "--router_check", ctx.work / "accelerate" / "hf", "--device", args.device))
    ctx.rec["router"] = json.loads(proc.stdout.strip().splitlines()[-1])
    if not ctx.rec["router"]["fp32"]:
        raise StageFailed(f"router not in fp32 under bf16 autocast: {ctx.rec['router']['dtypes']}")


def stage_resume_export_generate(ctx: Context) -> None:
    args = ctx.args
    more = args.steps + max(2, args.steps // 5)
    proc = ctx.run(
        python(
            ROOT / "launch" / "train.py",
            *train_args(args, ctx.work / "accelerate", more),
            *([] if args.dry_run else ["--precision", "bf16"]),
        )
    )
    resumed = re.search(r"resumed from \S+ \(step (\d+)\)", proc.stdout)
    if not resumed or int(resumed.group(1)) != args.steps:
        raise StageFailed(f"the second run did not resume from step {args.steps}")
    ctx.rec["resume"] = {"from_step": int(resumed.group(1)), **check_run(ctx.work / "accelerate", more)}
    export = ctx.work / "export"
    ctx.run(python("-m", "moe_dist.export", ctx.work / "accelerate", export))
    if not (export / "model.safetensors").exists():
        raise StageFailed(f"export wrote no {export / 'model.safetensors'}")
    samples, t0 = ctx.work / "generate.json", time.perf_counter()
    ctx.run(
        python(
            ROOT / "launch" / "generate.py",
            "--model_path",
            export,
            "--device",
            args.device,
            "--prompt",
            "Once upon a time",
            "--max_new_tokens",
            8 if args.dry_run else 64,
            "--seed",
            0,
            "--json",
            samples,
        )
    )
    out = read_json(samples)
    ctx.rec["generate"] = {
        "device": args.device,
        "seconds": time.perf_counter() - t0,
        "sample": json.dumps(out.get("samples", out))[:300],
    }


def stage_bench_moe(ctx: Context) -> None:
    shape = (
        ["--d_model", 64, "--ffn", 128, "--tokens", 256, "--experts", 4, "--iters", 2, "--warmup", 1, "--repeats", 2]
        if ctx.args.dry_run
        else ["--d_model", 512, "--ffn", 2048, "--tokens", 4096, "--experts", 8, 16]
    )
    path = ctx.work / "bench_moe.json"
    ctx.run(
        python(
            ROOT / "tools" / "bench_moe.py",
            *shape,
            "--top_k",
            1,
            "--dtype",
            "bf16",
            "--device",
            ctx.args.device,
            "--json",
            path,
        )
    )
    ctx.rec["rows"] = [
        {k: r.get(k) for k in ("variant", "tokens", "tok_s", "vs_dense", "vs_ds")} for r in read_json(path)["rows"]
    ]


def stage_bench_train(ctx: Context) -> None:
    # The dry run times one expert kernel; on the GPU both (grouped and loop), side by side.
    size = (
        [
            "--scale",
            "tiny",
            "--experts",
            4,
            "--seq_len",
            32,
            "--micro_batch_size",
            2,
            "--rounds",
            2,
            "--warmup",
            1,
            "--experts_impl",
            "grouped",
        ]
        if ctx.args.dry_run
        else ["--scale", "seed", "--experts", 4, 8, 16]
    )
    path = ctx.work / "bench_train.json"
    ctx.run(python(ROOT / "tools" / "bench_train.py", *size, "--device", ctx.args.device, "--json", path))
    ctx.rec["rows"] = [
        {k: r.get(k) for k in ("variant", "experts", "tok_s", "vs_dense", "step_ms", "peak_mb")}
        for r in read_json(path)["rows"]
    ]


def stage_profile_memory(ctx: Context) -> None:
    if ctx.args.dry_run:
        measure = ["--measure", ROOT / "ds_configs" / "cpu_ep1.json", "--seq_len", 32, "--max_steps", 2]
    else:
        measure = [
            "--measure",
            ROOT / "ds_configs" / "ep1.json",
            "--max_steps",
            4,
            "--gpu_mem_gib",
            torch.cuda.get_device_properties(0).total_memory / 2**30,
        ]
    ctx.run(
        python(
            ROOT / "tools" / "profile_memory.py",
            "--preset",
            "tiny-moe",
            "--ds_configs",
            *measure,
            "--output_dir",
            ctx.work / "memory",
        )
    )
    keys = (
        "config",
        "world_size",
        "precision",
        "measured_mb",
        "allocated_mb_per_rank",
        "reserved_mb_per_rank",
        "nvml_used_mb_per_rank",
        "verdict",
    )
    ctx.rec["rows"] = [
        {k: r.get(k) for k in keys} | {"predicted_mb": (r.get("predicted") or {}).get("total", 0) / 2**20}
        for r in read_json(ctx.work / "memory" / "memory.json")["rows"]
    ]
    if not any(r["measured_mb"] for r in ctx.rec["rows"]):
        raise StageFailed("profile_memory measured nothing")


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], None]
    planned_s: float  # expected seconds on one H100/H200
    dry_planned_s: float  # expected seconds of the toy run on a 2-core CPU
    needs: str | None = None  # a stage whose outputs this one reads


# The dry-run plans leave room for a loaded CI machine: each is about three times what the stage took
# on an idle 2-core one.
STAGES = (
    Stage("unit_tests", stage_unit_tests, 70, 40),
    Stage("train", stage_train, 110, 90),
    Stage("bench_moe", stage_bench_moe, 50, 30),
    Stage("bench_train", stage_bench_train, 70, 40),
    Stage("profile_memory", stage_profile_memory, 40, 60),
    Stage("resume_export_generate", stage_resume_export_generate, 50, 60, needs="train"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


# ---- the router check (run as a child process by the train stage) -------------------------


def router_check(hf_dir: str, device: str) -> dict:
    """Forward a batch under bf16 autocast; the dtypes of every router's logits, gate weights and loss."""
    import torch.nn.functional as F

    from moe_dist import MoEForCausalLM
    from moe_dist.model.routing import Router

    model = MoEForCausalLM.from_pretrained(hf_dir).to(device).eval()
    dtypes, routes, linear = set(), {}, F.linear

    def logits_probe(*args, **kwargs):  # the router's one F.linear is its logits (Router holds no nn.Linear)
        out = linear(*args, **kwargs)
        dtypes.add(f"logits:{out.dtype}")
        return out

    def before(module, inputs):
        F.linear = logits_probe

    def after(name):
        def fn(module, inputs, out):
            F.linear = linear
            dtypes.update({f"weight:{out.weight_TK.dtype}", f"loss:{out.loss.dtype}"})
            routes[name] = out.expert_idx_TK.detach().cpu()

        return fn

    for name, m in model.named_modules():
        if isinstance(m, Router):
            m.register_forward_pre_hook(before)
            m.register_forward_hook(after(name))
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device=device)
    with torch.no_grad():
        model(input_ids=ids)
        fp32_routes = dict(routes)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            model(input_ids=ids)
    agree = [float((routes[k] == fp32_routes[k]).float().mean()) for k in routes]
    kinds = {d.split(":")[0] for d in dtypes}
    return {
        "fp32": kinds == {"logits", "weight", "loss"} and all(d.endswith("torch.float32") for d in dtypes),
        "dtypes": sorted(dtypes),
        "routers": len(routes),
        "route_agreement_min": min(agree) if agree else None,
    }


# ---- the check --------------------------------------------------------------------------


def gpu_name(args) -> str:
    if args.dry_run or not torch.cuda.is_available():
        return "cpu-dry-run"
    return re.sub(r"[^A-Za-z0-9.]+", "-", torch.cuda.get_device_name(0)).strip("-")


def plan(args) -> list[tuple[Stage, float]]:
    """Each stage with its planned seconds, printed as its share of the deadline."""
    planned = [(s, s.dry_planned_s if args.dry_run else s.planned_s) for s in STAGES]
    total = 0.0
    print(f"gpu_check: plan for --deadline_s {args.deadline_s:.0f}", flush=True)
    for stage, seconds in planned:
        total += seconds
        fits = "" if total <= args.deadline_s else "  (past the deadline: runs only if earlier stages are quick)"
        print(
            f"  {stage.name:24s} {seconds:5.0f} s  {seconds / args.deadline_s:6.1%} of the deadline{fits}", flush=True
        )
    return planned


def run_stage(stage: Stage, planned_s: float, args, work: Path, result: dict, deadline: float) -> None:
    rec = result["stages"][stage.name] = {"status": "running", "planned_s": planned_s}
    needed = result["stages"].get(stage.needs, {}).get("status") if stage.needs else "passed"
    left = deadline - time.monotonic()
    if needed != "passed":
        rec.update(status="skipped", reason=f"needs {stage.needs}, which {needed}", wall_s=0.0)
        return
    if planned_s > left:
        rec.update(status="skipped", reason=f"deadline: {left:.0f} s left, {planned_s:.0f} s planned", wall_s=0.0)
        return
    print(f"[{stage.name}]", flush=True)
    ctx, t0 = Context(args, work, rec, stage.name, min(deadline, time.monotonic() + 2 * planned_s)), time.monotonic()
    try:
        if (stage.name, "hang") in args.inject:  # a stuck launcher and its rank: killed at the stage's limit
            ctx.run(
                python(
                    "-c",
                    "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                    '\'import os, time; open("hang.pid", "w").write(str(os.getpid())); time.sleep(1e9)\'],'
                    f" cwd={str(work)!r}); time.sleep(1e9)",
                )
            )
        stage.run(ctx)
        rec["status"] = "passed"
    except Exception as e:  # any failure of a stage is recorded, never the end of the run
        rec.update(
            status="failed", error={"type": type(e).__name__, "message": str(e)[:2000], "output_tail": ctx.output_tail}
        )
    rec["wall_s"] = time.monotonic() - t0
    print(
        f"[{stage.name}] {rec['status']} in {rec['wall_s']:.1f} s"
        + (f": {rec['error']['type']}: {rec['error']['message'][:300]}" if rec["status"] == "failed" else ""),
        flush=True,
    )


def headline(name: str, rec: dict) -> str:
    """A stage's key numbers in one table cell."""
    if rec["status"] == "skipped":
        return rec["reason"]
    if rec.get("error"):
        return f"{rec['error']['type']}: {rec['error']['message']}"
    if name == "unit_tests":
        return f"{rec.get('passed', 0)} passed ({rec['device']}; {rec['note']})"
    if name == "train":
        runs = [
            f"{e}: loss {rec[e]['first_loss']:.3f} -> {rec[e]['last_loss']:.3f}, {rec[e]['precision']}, "
            f"{rec[e]['max_tok_s'] or 0:,.0f} tok/s, peak {rec[e]['peak_mem_mb'] or 0:,.0f} MB"
            for e in ("accelerate", "deepspeed")
            if e in rec
        ]
        return "; ".join(runs + [f"router fp32 under bf16 autocast: {rec.get('router', {}).get('fp32')}"])
    if name == "resume_export_generate":
        return (
            f"resumed from step {rec['resume']['from_step']} to {rec['resume']['steps']}; exported; "
            f"generated on {rec['generate']['device']}"
        )
    if name in ("bench_moe", "bench_train"):
        return ", ".join(
            f"{r['variant']}: {r['tok_s'] or 0:,.0f} tok/s ({r['vs_dense'] or 0:.2f}x dense)" for r in rec["rows"]
        )
    return ", ".join(
        f"{r['config']}: predicted {r['predicted_mb'] or 0:,.0f} MB, measured {r['measured_mb'] or 0:,.0f}"
        f" MB, reserved {r['reserved_mb_per_rank']}, {r['verdict']}"
        for r in rec["rows"]
    )


def summary_md(result: dict) -> str:
    lines = [
        f"# GPU check: {result['gpu']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}",
        "",
        f"Result: **{result['status']}** in {result['wall_s']:.0f} s (deadline {result['deadline_s']:.0f} s)",
        "",
        "| stage | status | wall (s) | key numbers |",
        "|---|---|---|---|",
    ]
    for name, rec in result["stages"].items():
        try:
            cell = headline(name, rec)
        except (KeyError, TypeError, ValueError):  # a stage that stopped half-way: its JSON has what there is
            cell = "see the JSON"
        lines.append(f"| {name} | {rec['status']} | {rec.get('wall_s', 0):.1f} | {cell.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def save(out: Path, name: str, result: dict) -> None:
    """Both files, each replaced whole: a kill at any moment leaves the last complete ones."""
    data = json.dumps(result, indent=1).encode()
    write_atomic(out / f"{name}.json", lambda f: f.write(data))
    md = summary_md(result).encode()
    write_atomic(out / f"{name}.md", lambda f: f.write(md))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.router_check:
        print(json.dumps(router_check(args.router_check, args.device)))
        return 0
    name = gpu_name(args)
    out = claim_dir(
        args.out,
        "gpu_check",
        [f"{name}.json", f"{name}.md"],
        what="--out",
        legacy=lambda d: is_our_json(d / f"{name}.json", ("stages",)),
    )
    start = time.monotonic()
    deadline = start + args.deadline_s
    planned = plan(args)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))  # kept: the runs of a failed stage
    work.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: runs, exports and bench JSONs in {work}", flush=True)
    result = {
        "gpu": name,
        "dry_run": args.dry_run,
        "command": command_line("python"),
        "deadline_s": args.deadline_s,
        "machine": machine(torch.device(args.device)),
        "status": "running",
        "wall_s": 0.0,
        "stages": {s.name: {"status": "pending", "planned_s": p} for s, p in planned},
    }
    save(out, name, result)
    for stage, planned_s in planned:
        run_stage(stage, planned_s, args, work, result, deadline)
        result["wall_s"] = time.monotonic() - start
        save(out, name, result)
    statuses = [rec["status"] for rec in result["stages"].values()]
    result["status"] = "passed" if set(statuses) == {"passed"} else "incomplete"
    save(out, name, result)
    print(
        f"gpu_check: {statuses.count('passed')}/{len(statuses)} stages passed in {result['wall_s']:.0f} s; "
        f"wrote {out / name}.json",
        flush=True,
    )
    if args.dry_run and (statuses.count("passed") == 0 or "running" in statuses or "pending" in statuses):
        print("gpu_check: the dry run left no stage passed or the JSON incomplete", file=sys.stderr)
        return 1
    failed = [f"{n} ({rec['status']})" for n, rec in result["stages"].items() if rec["status"] != "passed"]
    if failed:
        print(f"gpu_check: not passed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="every stage at toy size on CPU (tiny presets, few steps, CPU-rank DeepSpeed)",
    )
    p.add_argument("--out", default=str(ROOT / "docs" / "gpu"), help="where <gpu-name>.json and .md go")
    p.add_argument("--work_dir", help="runs, exports and bench JSONs (default: a new temporary folder)")
    p.add_argument("--device", help="default: cuda, or cpu with --dry-run")
    p.add_argument("--steps", type=int, help="training steps per engine (default 50; 3 with --dry-run)")
    p.add_argument(
        "--deadline_s",
        type=float,
        default=420.0,
        help="the whole run ends by then, JSON complete; stages that cannot fit are skipped",
    )
    p.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="STAGE:exception|hang",
        help="test the check itself: raise in STAGE after its first command, or hang it",
    )
    p.add_argument("--router_check", metavar="HF_DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry_run or args.router_check else "cuda")
    args.steps = args.steps or (3 if args.dry_run else 50)
    inject = [tuple(item.split(":", 1)) for item in args.inject]
    bad = [":".join(i) for i in inject if len(i) != 2 or i[0] not in STAGE_NAMES or i[1] not in ("exception", "hang")]
    if bad:
        p.error(f"--inject {bad[0]}: expected STAGE:exception or STAGE:hang, STAGE one of {', '.join(STAGE_NAMES)}")
    args.inject = set(inject)
    if args.deadline_s <= 0:
        p.error(f"--deadline_s {args.deadline_s}: must be > 0")
    if args.device.startswith("cuda") and not args.router_check and not torch.cuda.is_available():
        p.error("no CUDA device visible: run on a GPU machine, or use --dry-run")
    return args


if __name__ == "__main__":
    sys.exit(main())
