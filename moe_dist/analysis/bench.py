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
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..model.moe import experts_impl, grouped_refusal
from ..output_guard import Legacy, OutputRefused, check, claim

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
    desc = (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads"
    )
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


def is_our_json(path: Path, keys: tuple[str, ...] = ("command", "machine")) -> bool:
    """A JSON object holding `keys`: a result our tools wrote before output records existed."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


def claim_json(
    path: str | Path | None, kind: str, keys: tuple[str, ...] = ("command", "machine"), what: str = "--json"
) -> None:
    """Before any work: `path` is new or an earlier result of ours, or stop with one line and exit 2 (output_guard)."""
    if path:
        path = Path(path)
        claim_dir(path.parent, kind, [path.name], legacy=lambda d: is_our_json(d / path.name, keys), what=what)


def claim_dir(folder: str | Path, kind: str, names: list[str], legacy: Legacy, what: str, *, main: bool = True) -> Path:
    """Before any work: the names a tool writes into `folder` are free or ours, or one line and exit 2.

    A launched tool calls it on every rank; only rank 0 (`main`) records the names and prints the line.
    """
    try:
        if main:
            return claim(folder, kind, names, legacy=legacy, what=what)
        check(folder, kind, names, legacy=legacy, what=what)
        return Path(folder)
    except OutputRefused as e:
        if main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(2)  # so the launcher does not end rank 0 before it has printed
        sys.exit(2)


def write_json(path: str | Path | None, result: dict) -> None:
    """Write `result` to `path`, one space of indent (what the stored results use); no path, no file."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def expert_paths(
    device: torch.device, dtype: torch.dtype, hidden_size: int, intermediate_size: int, asked: list[str]
) -> tuple[str, list[str]]:
    """The expert path the model takes here by default, and those of `asked` that can run (printing why
    grouped cannot, where torch refuses it): what the benchmarks time side by side."""
    refusal = grouped_refusal(device.type, dtype, hidden_size, intermediate_size)
    if refusal and "grouped" in asked:
        print(f"# no grouped variants: {refusal}")
    runnable = [impl for impl in asked if impl != "grouped" or not refusal]
    return experts_impl(device, dtype, hidden_size, intermediate_size), runnable
