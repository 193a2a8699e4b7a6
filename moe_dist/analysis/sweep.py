"""The seed experiment grids, and a runner that trains each point as a `launch/train.py` subprocess.

A grid is a list of `GridPoint`s: a run name and the `train.py` flags that make it (a `--model`
preset plus overrides). Every point passes its routing settings explicitly, so a command in
`sweep.json` means the same thing whatever the presets' defaults become.

The runner is resumable by construction: a run folder with `summary.json` is finished and is
skipped without starting anything; any other run is (re)started with the same command, and
the trainer resumes it from its last checkpoint. A failed run is reported and the sweep goes
on with the next one.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import output_guard
from ..parallel.process_group import LauncherError, deepspeed_launcher

TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "train.py"
SCALES = ("tiny", "seed")
MANIFEST = "sweep.json"
RUN_LOG = "train.log"
# Flags the sweep itself sets on every run; extra arguments may not repeat them.
_ECHO = functools.partial(print, flush=True)  # a run's lines as they come, not when the buffer fills
_SWEEP_FLAGS = ("--output_dir", "--deepspeed", "--model", "--local_rank")


class SweepError(ValueError):
    """A sweep command line that cannot work; the message says why."""


@dataclass(frozen=True)
class GridPoint:
    name: str  # run folder name, made of the settings that vary
    args: tuple[str, ...]  # train.py flags: --model PRESET and overrides


def _dense(scale: str) -> tuple[str, ...]:
    return ("--model", "tiny-dense" if scale == "tiny" else "seed-baseline")


def _moe(scale: str, experts: int, top_k: int, *overrides: str) -> tuple[str, ...]:
    # seed-moe-e{4,8,16} are the seed's shapes; tiny-moe takes the expert count as an override.
    preset = "tiny-moe" if scale == "tiny" else f"seed-moe-e{experts}"
    return ("--model", preset, "--num_experts", str(experts), "--top_k", str(top_k), *overrides)


def experts_grid(scale: str) -> list[GridPoint]:
    """Dense baseline, then every FFN an MoE of E in {4, 8, 16} experts, top-1."""
    return [GridPoint("dense", _dense(scale))] + [GridPoint(f"moe-e{e}-top1", _moe(scale, e, 1)) for e in (4, 8, 16)]


def router_grid(scale: str) -> list[GridPoint]:
    """E=8 top-1: router jitter x capacity factor. Always passes --capacity_factor, since the
    accelerate path is otherwise dropless and the factor would not be varied at all."""
    return [
        GridPoint(f"moe-e8-top1-jitter{j}-cf{c}", _moe(scale, 8, 1, "--router_jitter", j, "--capacity_factor", c))
        for j in ("0", "0.01", "0.05")
        for c in ("1.0", "1.25", "1.5")
    ]


def strategy_grid(scale: str) -> list[GridPoint]:
    """E=4: learned softmax top-k against a frozen random router (`--router_type random`), k in {1, 2}."""
    return [
        GridPoint(f"moe-e4-{label}{k}", _moe(scale, 4, k, "--router_type", router))
        for label, router in (("top", "softmax"), ("random", "random"))
        for k in (1, 2)
    ]


def balance_grid(scale: str) -> list[GridPoint]:
    """E=8 top-2: no balancing, the Switch aux loss, DeepSeek-V3's aux-loss-free bias, and that plus z-loss."""
    settings = {
        "noaux": ("0", "0", "0"),
        "aux0.01": ("0.01", "0", "0"),
        "auxfree": ("0", "1e-3", "0"),
        "auxfree-zloss": ("0", "1e-3", "1e-3"),
    }
    return [
        GridPoint(
            f"moe-e8-top2-{label}",
            _moe(scale, 8, 2, "--aux_loss_coef", aux, "--bias_update_rate", bias, "--z_loss_coef", z),
        )
        for label, (aux, bias, z) in settings.items()
    ]


GRIDS: dict[str, Callable[[str], list[GridPoint]]] = {
    "experts": experts_grid,
    "router": router_grid,
    "strategy": strategy_grid,
    "balance": balance_grid,
}


def grid_points(grid: str, scale: str, only: Sequence[str] = ()) -> list[GridPoint]:
    """The grid's points at `scale`, or just those named in `only` (in grid order)."""
    if grid not in GRIDS:
        raise SweepError(f"--grid {grid!r} is unknown: choose from {', '.join(GRIDS)}")
    if scale not in SCALES:
        raise SweepError(f"--scale {scale!r} is unknown: choose from {', '.join(SCALES)}")
    points = GRIDS[grid](scale)
    unknown = sorted(set(only) - {p.name for p in points})
    if unknown:
        raise SweepError(f"--only {', '.join(unknown)}: not in the {grid} grid ({', '.join(p.name for p in points)})")
    return [p for p in points if not only or p.name in only]


@dataclass(frozen=True)
class Launcher:
    """How each run starts: plain python (accelerate, one device) or the deepspeed launcher."""

    deepspeed_config: str | None = None
    num_gpus: int = 1

    def command(self, point: GridPoint, run_dir: Path, extra: Sequence[str]) -> list[str]:
        train = [str(TRAIN_SCRIPT), *point.args, "--output_dir", str(run_dir), *extra]
        if self.deepspeed_config is None:
            return [sys.executable, *train]
        return [*self._deepspeed()[0], *train, "--deepspeed", self.deepspeed_config]

    def environment(self) -> dict[str, str]:
        """What the runs need on top of this process's environment (see `deepspeed_launcher`)."""
        return self._deepspeed()[1] if self.deepspeed_config is not None else {}

    def _deepspeed(self) -> tuple[list[str], dict[str, str]]:
        try:
            return deepspeed_launcher(self.num_gpus)
        except LauncherError as e:
            raise SweepError(str(e)) from None


def check_extra_args(points: Sequence[GridPoint], extra: Sequence[str]) -> None:
    """Refuse extra train.py flags that would silently override what the sweep or the grid sets."""
    owned = set(_SWEEP_FLAGS) | {a for p in points for a in p.args if a.startswith("--")}
    clashes = sorted({a.split("=", 1)[0] for a in extra if a.split("=", 1)[0] in owned})
    if clashes:
        raise SweepError(
            f"{', '.join(clashes)} after '--' would override what the sweep sets on each run "
            f"(--model, --output_dir, --deepspeed and the grid's own flags)"
        )


def run_status(run_dir: Path) -> str:
    if (run_dir / "summary.json").is_file():
        return "finished"
    return "unfinished" if run_dir.is_dir() and any(run_dir.iterdir()) else "new"


def run_sweep(
    grid: str,
    scale: str,
    runs_dir: str | Path,
    *,
    launcher: Launcher = Launcher(),
    extra: Sequence[str] = (),
    only: Sequence[str] = (),
    dry_run: bool = False,
    echo: Callable[[str], None] = _ECHO,
) -> list[str]:
    """Train the grid's points one after another under `runs_dir/grid/`; returns the failed runs' lines.

    The children inherit this process's environment (fault injection, CUDA_VISIBLE_DEVICES, ...).
    Progress and the children's output go to `echo` line by line, flushed, so `| tee` shows them live.
    """
    every_point = grid_points(grid, scale)
    points = grid_points(grid, scale, only)
    check_extra_args(every_point, extra)
    grid_dir = Path(runs_dir) / grid
    # The manifest holds the whole grid, so a sweep run piecewise with --only still documents every run.
    commands = {p.name: launcher.command(p, grid_dir / p.name, extra) for p in every_point}
    _claim_grid_dir(Path(runs_dir), grid, list(commands), dry_run=dry_run)
    if not dry_run:
        _write_manifest(grid_dir, grid, scale, extra, commands)
    failures = []
    for i, point in enumerate(points, 1):
        run_dir, cmd = grid_dir / point.name, commands[point.name]
        status = run_status(run_dir)
        echo(f"[sweep {i}/{len(points)}] {point.name}: {_describe(status)}")
        if status == "finished":
            continue
        echo(f"[sweep {i}/{len(points)}] $ {' '.join(cmd)}")
        if dry_run:
            continue
        code = _run_streaming(cmd, run_dir, echo, launcher.environment())
        if code != 0:
            failures.append(f"{point.name} (exit {code}; log: {run_dir / RUN_LOG})")
            echo(f"[sweep {i}/{len(points)}] {point.name}: FAILED with exit {code}, going on with the next run")
    if not dry_run:
        echo(f"[sweep] {grid}: {len(points) - len(failures)}/{len(points)} runs ok, results in {grid_dir}")
    return failures


def _claim_grid_dir(runs_dir: Path, grid: str, runs: list[str], *, dry_run: bool) -> None:
    """RUNS_DIR/GRID and the run folders in it are the sweep's: refuse (SweepError) if one is someone else's."""

    def old_grid(grid_dir: Path) -> bool:  # a grid folder from before output records: it has our manifest
        return (grid_dir / MANIFEST).is_file()

    claims = [(runs_dir, [grid], lambda d: old_grid(d / grid)), (runs_dir / grid, [MANIFEST, *runs], old_grid)]
    try:
        for folder, names, legacy in claims:
            output_guard.check(folder, "sweep", names, legacy=legacy, what="--runs_dir" if folder == runs_dir else "")
        if not dry_run:
            for folder, names, _ in claims:
                output_guard.record(folder, "sweep", names)
    except output_guard.OutputRefused as e:
        raise SweepError(str(e)) from None


def _describe(status: str) -> str:
    return {
        "finished": "finished (summary.json exists), skipping",
        "unfinished": "unfinished, re-running (the trainer resumes from its last checkpoint)",
        "new": "starting",
    }[status]


def _write_manifest(grid_dir: Path, grid: str, scale: str, extra: Sequence[str], commands: dict) -> None:
    manifest = {
        "grid": grid,
        "scale": scale,
        "cwd": os.getcwd(),
        "extra_args": list(extra),
        "runs": [{"name": name, "output_dir": str(grid_dir / name), "command": cmd} for name, cmd in commands.items()],
    }
    tmp = grid_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(grid_dir / MANIFEST)


def _run_streaming(cmd: list[str], run_dir: Path, echo: Callable[[str], None], env: dict[str, str]) -> int:
    """Run `cmd`, echoing its output live and appending it to the run folder's `train.log`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / RUN_LOG, "a", encoding="utf-8") as log_file:
        log_file.write(f"$ {' '.join(cmd)}\n")
        # Unbuffered, so a child's prints arrive as they happen rather than when its pipe buffer fills.
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
        )
        try:
            for line in proc.stdout:
                echo(line.rstrip("\n"))
                log_file.write(line)
            return proc.wait()
        except BaseException:  # Ctrl-C: stop the run too, its last checkpoint is the resume point
            proc.terminate()
            proc.wait()
            raise
