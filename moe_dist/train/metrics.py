"""Training state → numbers and warnings: routing health, expert collapse, memory, throughput.

Nothing here trains or writes files (that is `logging_io`). Routing statistics arrive as the
tensors each `Router` keeps from its last forward (`MoEForCausalLM.routing_stats()`); they may
live on the GPU, so every function that reads them copies them to the host in ONE transfer,
and only at log time.

Shape suffixes: E experts, L MoE layers.
"""

from __future__ import annotations

import functools
import math
import re
import resource
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable

import numpy as np
import psutil
import torch

from .logging_io import REQUIRED_SUMMARY_KEYS, MetricsWriter, write_summary  # noqa: F401  (one import for the trainer)

StatsByLayer = dict[int, dict[str, torch.Tensor]]
MB = 2**20

# ---- pure routing math ----------------------------------------------------------------


def utilization(counts_E: torch.Tensor) -> torch.Tensor:
    """Each expert's share of the routes (sums to 1).

    All-zero counts give all zeros, not uniform: a layer that routed nothing is not balanced,
    and uniform would hide that in the heatmap.
    """
    counts_E = counts_E.double()
    total = counts_E.sum()
    return counts_E / total if total > 0 else torch.zeros_like(counts_E)


def coefficient_of_variation(x: torch.Tensor) -> float:
    """Population std / mean: 0 when balanced, sqrt(E-1) when one of E experts takes everything.

    NaN when the mean is 0 (nothing to compare against).
    """
    x = x.double()
    mean = x.mean()
    return float(x.std(correction=0) / mean) if mean != 0 else math.nan


def _to_host(stats_by_layer: StatsByLayer) -> dict[int, dict[str, torch.Tensor]]:
    """Copy every stat to the CPU as float64 with a single device→host transfer (one sync)."""
    items = [(layer, name, t.detach()) for layer, stats in sorted(stats_by_layer.items()) for name, t in stats.items()]
    if not items:
        return {}
    device = items[0][2].device
    flat = torch.cat([t.reshape(-1).to(device, torch.float64) for _, _, t in items]).cpu()
    host: dict[int, dict[str, torch.Tensor]] = {}
    for (layer, name, t), part in zip(items, flat.split([t.numel() for _, _, t in items])):
        host.setdefault(layer, {})[name] = part.reshape(t.shape)
    return host


def routing_health(stats_by_layer: StatsByLayer) -> dict[str, float]:
    """Flat scalars `routing/layer{L}/{name}` for logging; utilisation is of routes chosen before drops."""
    out: dict[str, float] = {}
    for layer, s in _to_host(stats_by_layer).items():
        prefix = f"routing/layer{layer}"
        for name in ("entropy", "drop_fraction", "aux_loss", "z_loss"):
            if name in s:
                out[f"{prefix}/{name}"] = float(s[name])
        util_E = utilization(s["selected_per_expert"])
        out[f"{prefix}/util_std"] = float(util_E.std(correction=0))
        out[f"{prefix}/util_cv"] = coefficient_of_variation(util_E)
        out[f"{prefix}/util_min_share"] = float(util_E.min() * util_E.numel())
        out.update({f"{prefix}/util/e{e}": float(u) for e, u in enumerate(util_E)})
        if "score_bias" in s:
            out.update({f"{prefix}/bias/e{e}": float(b) for e, b in enumerate(s["score_bias"])})
    return out


def routing_utilization(stats_by_layer: StatsByLayer) -> np.ndarray:
    """Utilisation per layer (rows in ascending layer order) and expert: shape [L, E], for heatmaps."""
    host = _to_host(stats_by_layer)
    if not host:
        return np.zeros((0, 0))
    return np.stack([utilization(s["selected_per_expert"]).numpy() for s in host.values()])


class RoutingAccumulator:
    """Sums `routing_stats()` over several forwards (an eval pass) without any host sync.

    `average()` returns the same dict format: counts summed, scalar stats averaged over the
    forwards each layer saw, and `score_bias` as last seen (it is state, not a per-batch stat).
    """

    _SUMMED = ("selected_per_expert", "tokens_per_expert")
    _LAST = ("score_bias",)

    def __init__(self) -> None:
        self._sums: StatsByLayer = {}
        self._forwards: dict[int, int] = {}

    def add(self, stats_by_layer: StatsByLayer) -> None:
        for layer, stats in stats_by_layer.items():
            sums = self._sums.setdefault(layer, {})
            for name, t in stats.items():
                if name in self._LAST:
                    sums[name] = t.detach().clone()
                elif name in self._SUMMED:
                    sums[name] = sums[name] + t.detach() if name in sums else t.detach().clone()
                else:  # float64 so that long evals don't lose precision
                    sums[name] = sums.get(name, 0) + t.detach().double()
            self._forwards[layer] = self._forwards.get(layer, 0) + 1

    def average(self) -> StatsByLayer:
        keep = self._SUMMED + self._LAST
        return {
            layer: {name: t if name in keep else t / self._forwards[layer] for name, t in sums.items()}
            for layer, sums in self._sums.items()
        }

    def reset(self) -> None:
        self._sums.clear()
        self._forwards.clear()


# ---- expert collapse ------------------------------------------------------------------


class CollapseMonitor:
    """Warns, once per episode, when an expert starves or a layer's z-loss keeps climbing.

    Call `update` once per eval. An expert has collapsed when its utilisation stays below
    `min_share` of its fair share 1/E for `patience` evals in a row; a z-loss that rose at
    every one of the last `z_rise_evals` evals means router logits are drifting up, the
    instability ST-MoE's z-loss exists to stop (arXiv:2202.08906 §3).
    """

    def __init__(self, num_experts: int, *, patience: int = 3, min_share: float = 0.05, z_rise_evals: int = 5):
        if patience < 1 or z_rise_evals < 2:
            raise ValueError("CollapseMonitor needs patience >= 1 and z_rise_evals >= 2")
        self.num_experts, self.patience = num_experts, patience
        self.min_share, self.z_rise_evals = min_share, z_rise_evals
        self._streak: dict[int, list[int]] = {}  # layer → consecutive starved evals per expert
        self._z: dict[int, list[float]] = {}  # layer → last z_rise_evals z-losses
        self._z_rising: set[int] = set()  # layers already warned about, until the rise stops
        self.warnings: list[str] = []

    def update(self, step: int, stats_by_layer: StatsByLayer) -> list[str]:
        new: list[str] = []
        for layer, s in _to_host(stats_by_layer).items():
            new += self._check_collapse(step, layer, s["selected_per_expert"])
            if "z_loss" in s:
                new += self._check_z(step, layer, float(s["z_loss"]))
        self.warnings += new
        return new

    def _check_collapse(self, step: int, layer: int, counts_E: torch.Tensor) -> list[str]:
        if counts_E.numel() != self.num_experts:
            raise ValueError(f"layer {layer} has {counts_E.numel()} experts, monitor expects {self.num_experts}")
        if counts_E.sum() == 0:
            return []  # no routes, no evidence either way
        share_E = utilization(counts_E) * self.num_experts
        streak = self._streak.setdefault(layer, [0] * self.num_experts)
        out = []
        for e, share in enumerate(share_E.tolist()):
            streak[e] = streak[e] + 1 if share < self.min_share else 0
            if streak[e] == self.patience:
                out.append(
                    f"layer {layer} expert {e} collapsed: {share:.1%} of its fair share "
                    f"for {self.patience} evals (step {step})"
                )
        return out

    def _check_z(self, step: int, layer: int, z: float) -> list[str]:
        hist = self._z.setdefault(layer, [])
        hist.append(z)
        del hist[: -self.z_rise_evals]
        rising = len(hist) == self.z_rise_evals and all(b > a for a, b in zip(hist, hist[1:]))
        fire = rising and layer not in self._z_rising
        (self._z_rising.add if rising else self._z_rising.discard)(layer)
        if not fire:
            return []
        return [
            f"layer {layer} z-loss rose for {self.z_rise_evals} evals in a row: "
            f"{hist[0]:.4g} -> {hist[-1]:.4g} (step {step})"
        ]

    def state_dict(self) -> dict:
        """Plain lists and string keys, so it survives JSON as well as torch.save."""
        return {
            "streak": {str(k): list(v) for k, v in self._streak.items()},
            "z": {str(k): list(v) for k, v in self._z.items()},
            "z_rising": sorted(self._z_rising),
            "warnings": list(self.warnings),
        }

    def load_state_dict(self, state: dict) -> None:
        self._streak = {int(k): list(v) for k, v in state["streak"].items()}
        self._z = {int(k): [float(x) for x in v] for k, v in state["z"].items()}
        self._z_rising = {int(k) for k in state["z_rising"]}
        self.warnings = list(state["warnings"])


# ---- memory ---------------------------------------------------------------------------


def peak_memory_mb(device: torch.device | str | int) -> dict[str, float]:
    """Peak memory of this process on `device`, plus host RSS; `peak_mem_mb` is the headline.

    CUDA: `torch_peak_mb` (max allocated by the caching allocator since the last reset),
    `torch_reserved_peak_mb` (max it held from the driver, its cache included) and,
    where NVML works, `nvml_used_mb` (current use of the whole GPU, other processes and the
    CUDA context included). Always: `rss_peak_mb` (lifetime peak RSS) and `rss_mb` (current).
    """
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    out = _host_memory_mb()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        out["torch_peak_mb"] = torch.cuda.max_memory_allocated(index) / MB
        out["torch_reserved_peak_mb"] = torch.cuda.max_memory_reserved(index) / MB  # allocated + cache
        used = _nvml_used_mb(index)
        if used is not None:
            out["nvml_used_mb"] = used
        out["peak_mem_mb"] = out["torch_peak_mb"]
    else:
        out["peak_mem_mb"] = out["rss_peak_mb"]
    return out


def reset_peak_memory(device: torch.device | str | int) -> None:
    """Restart the CUDA peak counter; host peak RSS is per process lifetime and cannot be reset."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _host_memory_mb() -> dict[str, float]:
    # ru_maxrss is in KiB on Linux but in bytes on macOS (getrusage(2)).
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = maxrss / MB if sys.platform == "darwin" else maxrss / 1024
    return {"rss_peak_mb": peak, "rss_mb": psutil.Process().memory_info().rss / MB}


def _nvml_used_mb(index: int) -> float | None:
    handle = _nvml_handle(index)
    if handle is None:
        return None
    import pynvml

    try:
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / MB
    except pynvml.NVMLError:
        return None


@functools.cache
def _nvml_handle(index: int):
    """NVML handle of CUDA device `index`, found by UUID, or None where NVML is unavailable.

    NVML numbers GPUs physically and ignores CUDA_VISIBLE_DEVICES, so index i in torch is
    not index i in NVML; the UUID is the same in both.
    """
    try:
        import pynvml  # from the nvidia-ml-py package
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        # torch prints the bare UUID; NVML wants it prefixed, "MIG-" for MIG slices.
        candidates = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
        for candidate in candidates:
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(candidate)
            except pynvml.NVMLError:
                continue
    except (pynvml.NVMLError, AttributeError, RuntimeError):
        pass  # no driver, or a torch build without device UUIDs
    return None


# ---- throughput -----------------------------------------------------------------------


class Throughput:
    """Tokens per second over the last `window` optimizer steps.

    Call `update(tokens)` after every step with the step's tokens (all ranks together). The
    first call only starts the clock: step 1's start is unknown and it carries compilation
    and allocator warm-up, so it never enters the rate nor the max. Call `resume()` after an
    eval or a checkpoint so that time spent outside training is not counted.
    """

    def __init__(self, window: int = 20, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._last: float | None = None
        self._steps: deque[tuple[float, int]] = deque(maxlen=window)  # (seconds, tokens)
        self.max_tokens_per_s = 0.0

    def update(self, tokens: int) -> None:
        now = self._clock()
        if self._last is not None:
            self._steps.append((now - self._last, tokens))
            self.max_tokens_per_s = max(self.max_tokens_per_s, self.tokens_per_s)
        self._last = now

    def resume(self) -> None:
        """The next step's interval starts now."""
        self._last = self._clock()

    @property
    def tokens_per_s(self) -> float:
        seconds = sum(dt for dt, _ in self._steps)
        return sum(n for _, n in self._steps) / seconds if seconds > 0 else 0.0

    def eta_s(self, steps_done: int, steps_total: int) -> float | None:
        """Seconds left at the windowed step time; None before any step was timed."""
        if not self._steps:
            return None
        return max(steps_total - steps_done, 0) * sum(dt for dt, _ in self._steps) / len(self._steps)


def format_progress(step: int, total: int, loss: float, lr: float, tok_s: float, eta_s: float | None) -> str:
    """`step 120/300 | loss 3.412 | lr 4.8e-04 | 12.3k tok/s | eta 1m32s`."""
    return f"step {step}/{total} | loss {loss:.3f} | lr {lr:.1e} | {_si(tok_s)} tok/s | eta {_duration(eta_s)}"


def _si(x: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{suffix}"
    return f"{x:.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def pairwise_cosine(vectors_EK: torch.Tensor) -> tuple[float, float]:
    """Mean and max cosine similarity over the distinct pairs of rows (experts): 1.0 for identical copies."""
    unit_EK = torch.nn.functional.normalize(vectors_EK.double(), dim=1)
    sim_EE = unit_EK @ unit_EK.T
    off = sim_EE[~torch.eye(len(sim_EE), dtype=torch.bool)]
    return float(off.mean()), float(off.max())


_EXPERT_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$")


def expert_similarity(
    named_parameters, gather_objects: Callable[[object], list], *, width: int, sample: int = 16384
) -> dict[str, float]:
    """`routing/layer{L}/expert_cos_mean` and `expert_cos_max`: how alike a layer's experts are (upcycled
    copies start at 1.0 and should drift apart; Komatsuzaki et al. 2022 watch the same).

    `named_parameters` gives each parameter under its checkpoint name (global expert ids under EP), and
    `gather_objects(obj)` every rank's `obj` (the engine's all-gather), since each rank holds its own
    experts. Each expert is compared on the same `sample` coordinates of its weights (drawn once, seeded),
    so the gathered vectors stay small at any model size; the estimate's noise is about 1/sqrt(sample).
    Experts sliced over ranks (ETP) are not compared.
    """
    mine: dict[int, dict[int, list]] = {}
    for name, param in named_parameters:
        m = _EXPERT_WEIGHT.match(name)
        if not m:
            continue
        if width not in param.shape:
            return {}  # a slice of an expert (ETP)
        gen = torch.Generator().manual_seed(zlib.crc32(m[3].encode()))
        idx = torch.randperm(param.numel(), generator=gen)[: sample // 3]
        mine.setdefault(int(m[1]), {}).setdefault(int(m[2]), []).append(
            (m[3], param.detach().flatten()[idx].float().cpu())
        )
    merged: dict[int, dict[int, torch.Tensor]] = {}
    for rank_part in gather_objects(mine):
        for layer, experts in rank_part.items():
            for e, parts in experts.items():
                merged.setdefault(layer, {})[e] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])])
    out = {}
    for layer, experts in sorted(merged.items()):
        mean, top = pairwise_cosine(torch.stack([experts[e] for e in sorted(experts)]))
        out[f"routing/layer{layer}/expert_cos_mean"], out[f"routing/layer{layer}/expert_cos_max"] = mean, top
    return out
