"""Run the real entry points in subprocesses: the `deepspeed` launcher with 2 CPU ranks, or plain python.

Nothing is mocked: these are the commands a user types, pointed at the fixture corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from moe_dist.export.standard_export import without_moe_dist
from moe_dist.parallel.process_group import free_port

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TRAIN = ROOT / "launch" / "train.py"
DATA_ARGS = [
    "--train_file",
    str(FIXTURES / "stories.txt"),
    "--valid_file",
    str(FIXTURES / "stories_valid.txt"),
    "--tokenizer",
    "train:512",
]
CPU_EP2 = str(ROOT / "ds_configs" / "cpu_ep2.json")
CPU_EP1 = str(ROOT / "ds_configs" / "cpu_ep1.json")  # one process: micro-batch 8 x accumulation 2

# The shared reference runs (see conftest.py): 24 steps of tiny-moe, checkpoints at 12 and 24.
STEPS = 24
_COMMON = [
    "--model",
    "tiny-moe",
    *DATA_ARGS,
    "--max_steps",
    str(STEPS),
    "--eval_every",
    "8",
    "--save_every",
    "12",
    "--log_every",
    "1",
    "--warmup_steps",
    "4",
    "--lr",
    "2e-3",
    "--keep_last",
    "5",
]
EP2_ARGS = ["--deepspeed", CPU_EP2, *_COMMON]
ACCEL_ARGS = [*_COMMON, "--micro_batch_size", "8"]


def _env(extra: dict | None = None) -> dict:
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    # Two ranks on a 2-core machine: one thread each, or they fight over the cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def deepspeed(
    script: Path | str, args: list[str], *, timeout: int = 300, env: dict | None = None, ranks: int = 2
) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()), str(script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=timeout)


def leftover_shm(proc: subprocess.CompletedProcess) -> list[Path]:
    """DeepSpeed's CPU all-reduce segments still in /dev/shm from this launch (named after its port)."""
    port = proc.args[proc.args.index("--master_port") + 1]
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def python(
    script: Path | str, args: list[str], *, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=timeout
    )


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail with the tail of the output, so a broken launch explains itself in the test report."""
    if proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def metrics(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r for r in rows if r["kind"] == kind}


def truncate_run(src: Path, dst: Path, keep_step: int) -> None:
    """A copy of a finished run as it was right after its step-`keep_step` checkpoint."""
    shutil.copytree(src, dst)
    (dst / "summary.json").unlink()
    shutil.rmtree(dst / "hf", ignore_errors=True)
    for ckpt in (dst / "checkpoints").glob("step*"):
        if int(ckpt.name[4:]) > keep_step:
            shutil.rmtree(ckpt)


def run_without_moe_dist(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter that cannot import moe_dist from the checkout (no PYTHONPATH entry
    that holds it, run from `tmp_path`) and never reaches the hub: how a user without our package loads an export."""
    env = without_moe_dist(os.environ)
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
