"""What every benchmark and profiler in `tools/` shares: the machine line, device syncs, the command and JSON output.

They live in the package, not in one of the tools, so that a tool imports them like any other
`moe_dist` module instead of putting `tools/` or the repository root on `sys.path`.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..model.moe import experts_impl, grouped_refusal

NO_CUDA = "--device cuda: no CUDA device visible"


def cpu_model() -> str:
    """The CPU's marketing name (Linux), else whatever `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def machine(device: torch.device) -> str:
    """One line naming what a number was measured on: the same line in every tool's output and JSON."""
    desc = f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} intra-op threads"
    if device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(device)}"
    return desc


def sync(device: torch.device) -> None:
    """Wait for the device: CUDA kernels run asynchronously, so a timer read without this measures the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def require_device(device: str, fail: Callable[[str], object] = sys.exit) -> None:
    """Stop early, through `fail` (a parser's `error`, or `sys.exit`), when `--device cuda` has no GPU to run on."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(NO_CUDA)


def command_line(*prefix: str, argv: list[str] | None = None) -> str:
    """The shell command that reproduces this run (`prefix` + `argv`, default `sys.argv`), quoted for a shell."""
    return shlex.join([*prefix, *(sys.argv if argv is None else argv)])


def write_json(path: str | Path | None, result: dict) -> None:
    """Write `result` to `path`, one space of indent (what the stored results use); no path, no file."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def expert_paths(device: torch.device, dtype: torch.dtype, hidden_size: int, intermediate_size: int,
                 asked: list[str]) -> tuple[str, list[str]]:
    """The expert path the model takes here by default, and those of `asked` that can run (printing why
    grouped cannot, where torch refuses it): what the benchmarks time side by side."""
    refusal = grouped_refusal(device.type, dtype, hidden_size, intermediate_size)
    if refusal and "grouped" in asked:
        print(f"# no grouped variants: {refusal}")
    runnable = [impl for impl in asked if impl != "grouped" or not refusal]
    return experts_impl(device, dtype, hidden_size, intermediate_size), runnable
