"""Numbers → run-folder files: `metrics.jsonl`, tensorboard events, heatmap PNGs, `summary.json`.

Only rank 0 writes (`MetricsWriter(enabled=False)` on the others touches nothing). Files that a
reader relies on as a whole (`summary.json`, a truncated `metrics.jsonl`) are replaced
atomically, so a run killed mid-write leaves the old file, never half of a new one.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..atomic_io import write_atomic

REQUIRED_SUMMARY_KEYS = (
    "final_val_ppl",
    "best_val_ppl",
    "max_tok_s",
    "peak_mem_mb",
    "steps",
    "params_total",
    "params_active",
    "ep_size",
    "world_size",
    "model",
    # routing settings under their config.json names, so report tables can group runs by them
    "num_local_experts",
    "num_experts_per_tok",
    "capacity_factor",
    "router_jitter_noise",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "router_bias_update_rate",
    "router_type",
)


def _json_safe(value):
    """Floats as floats, NaN/inf as null (strict JSON has neither), tensors and numpy scalars unwrapped."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (torch.Tensor, np.generic)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _as_float(value) -> float:
    if isinstance(value, (torch.Tensor, np.generic)):
        value = value.item()
    return math.nan if value is None else float(value)


def write_summary(run_dir: str | os.PathLike, summary: dict) -> Path:
    """Write `summary.json` atomically; refuse a summary missing any `REQUIRED_SUMMARY_KEYS`."""
    missing = [k for k in REQUIRED_SUMMARY_KEYS if k not in summary]
    if missing:
        raise ValueError(f"summary.json is missing required keys: {', '.join(missing)}")
    path = Path(run_dir) / "summary.json"
    text = json.dumps(_json_safe(summary), indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
    return path


class MetricsWriter:
    """Appends scalars to `metrics.jsonl` and mirrors them to tensorboard under `tb/`.

    Re-opening an existing run folder appends. On resume, call `truncate_after(step)` first:
    it drops what a killed run logged past the checkpoint, in the JSONL and (by tensorboard's
    purge_step) in the event view.
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._purge_step: int | None = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def _jsonl(self):
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        return self._file

    def _writer(self):
        # Created on first use so that truncate_after can still set the purge step.
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=self._purge_step)
        return self._tb

    def log(self, step: int, kind: str, scalars: dict) -> None:
        """One JSONL line `{step, kind, time, **scalars}` and one tensorboard scalar `{kind}/{key}` each."""
        if not self.enabled:
            return
        values = {k: _as_float(v) for k, v in scalars.items()}
        line = {"step": int(step), "kind": kind, "time": time.time(), **values}
        f = self._jsonl()
        f.write(json.dumps(_json_safe(line), allow_nan=False) + "\n")
        f.flush()  # a crash loses at most the line being written
        tb = self._writer()
        for key, value in values.items():
            tb.add_scalar(f"{kind}/{key}", value, step)

    def histogram(self, step: int, tag: str, values: torch.Tensor | np.ndarray) -> None:
        if self.enabled:
            self._writer().add_histogram(tag, values, step)

    def utilization_heatmap(
        self, step: int, util_LE: np.ndarray, layers: list[int] | None = None, tag: str = "routing/utilization"
    ) -> None:
        """Layers × experts share of routes, to tensorboard and `heatmaps/step_{step:07d}.png`."""
        if not self.enabled or util_LE.size == 0:  # a dense model has nothing to draw
            return
        fig = _heatmap_figure(util_LE, layers, step)
        out = self.run_dir / "heatmaps" / f"step_{step:07d}.png"
        out.parent.mkdir(exist_ok=True)
        fig.savefig(out, dpi=100)
        self._writer().add_figure(tag, fig, step, close=True)

    def truncate_after(self, step: int) -> None:
        """Keep only lines with step <= `step` (a torn last line is dropped too); atomic."""
        if not self.enabled:
            return
        self.close()
        self._purge_step = step + 1
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        write_atomic(self.path, lambda f: f.write("".join(kept).encode("utf-8")))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _heatmap_figure(util_LE: np.ndarray, layers: list[int] | None, step: int):
    # A bare Figure (no pyplot) renders with Agg and leaves no global state behind.
    from matplotlib.figure import Figure

    num_layers, num_experts = util_LE.shape
    layers = list(range(num_layers)) if layers is None else layers
    fig = Figure(figsize=(max(4.0, 0.45 * num_experts + 2), max(2.5, 0.4 * num_layers + 1.5)))
    ax = fig.add_subplot()
    # Diverging scale centred on the fair share 1/E: balanced is white, starved experts blue,
    # hogs red (saturating at twice the fair share, so one hog cannot wash out the rest).
    image = ax.imshow(util_LE, aspect="auto", cmap="RdBu_r", vmin=0.0, vmax=2.0 / num_experts)
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(num_layers), labels=[str(layer) for layer in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"expert utilisation, step {step} (fair share {1 / num_experts:.3f})")
    fig.colorbar(image, ax=ax, extend="max", label="share of routes")
    fig.tight_layout()
    return fig
