"""Run folders -> `report.md` and PNG plots: the results table, the router-grid heatmap and curves.

    python tools/report.py runs/router              # one grid folder (as launch/sweep.py makes it)
    python tools/report.py runs --out reports/all   # every run folder below runs/

A run folder is any folder below RUNS_DIR holding `metrics.jsonl` or `summary.json`; it is named
by its path relative to RUNS_DIR, and runs in the same parent folder form a group (a grid), which
gets its own plots, named `{group}_{plot}.png` (no prefix for runs directly in RUNS_DIR).
Finished runs (with `summary.json`) enter the tables; curves use every run's eval lines,
whose routing statistics are averaged over the validation pass.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure  # a bare Figure renders with Agg and needs no pyplot state
from matplotlib.ticker import MaxNLocator

from moe_dist.analysis.bench import claim_dir
from moe_dist.atomic_io import write_atomic

LAYER_KEY = re.compile(r"^routing/layer(\d+)/(.+)$")
IMPROVE_NOTE = (
    "`ppl_improve_vs_base_%` = (base best_val_ppl - run best_val_ppl) / base best_val_ppl x 100, "
    "on best validation perplexity; positive means better than the base. The base is the dense run "
    "(num_local_experts == 0) of the run's own group, else the only dense run present."
)


@dataclass
class Run:
    name: str  # path relative to RUNS_DIR
    group: str  # parent folder relative to RUNS_DIR ("" for the top)
    summary: dict | None
    evals: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The name inside its group, for legends (a plot shows one group)."""
        return self.name.rsplit("/", 1)[-1]

    @property
    def dense(self) -> bool:
        return self.summary is not None and self.summary.get("num_local_experts") == 0

    def best_ppl(self) -> float | None:
        return (self.summary or {}).get("best_val_ppl")

    def layer_series(self, stat: str) -> dict[int, tuple[list[int], list[float]]]:
        """Per layer, (steps, values) of `routing/layer{L}/{stat}` over the eval lines."""
        out: dict[int, tuple[list[int], list[float]]] = {}
        for row in self.evals:
            for key, value in row.items():
                m = LAYER_KEY.match(key)
                if m and m.group(2) == stat and value is not None:
                    steps, values = out.setdefault(int(m.group(1)), ([], []))
                    steps.append(row["step"])
                    values.append(value)
        return dict(sorted(out.items()))


def read_jsonl(path: Path) -> list[dict]:
    """Every whole line; a torn last line (a run killed mid-write) is skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def load_runs(runs_dir: Path) -> list[Run]:
    folders = sorted({p.parent for pattern in ("metrics.jsonl", "summary.json") for p in runs_dir.rglob(pattern)})
    runs = []
    for folder in folders:
        summary_path, metrics_path = folder / "summary.json", folder / "metrics.jsonl"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        rows = read_jsonl(metrics_path) if metrics_path.is_file() else []
        rel = folder.relative_to(runs_dir)
        group = "" if rel.parent == Path(".") else rel.parent.as_posix()
        runs.append(
            Run(
                rel.as_posix() if rel != Path(".") else folder.name,
                group,
                summary,
                [r for r in rows if r.get("kind") == "eval"],
            )
        )
    return runs


def find_base(run: Run, runs: list[Run]) -> Run | None:
    """The dense run of `run`'s group, else the only dense run of all; None when ambiguous or absent."""
    dense = [r for r in runs if r.dense and r.best_ppl()]
    same_group = [r for r in dense if r.group == run.group]
    if len(same_group) == 1:
        return same_group[0]
    return dense[0] if len(dense) == 1 else None


def improvement_pct(base_best: float, run_best: float) -> float:
    return (base_best - run_best) / base_best * 100.0


def _fmt(value, digits: int) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _sort_key(run: Run, runs: list[Run]):
    base = find_base(run, runs)
    ppl = run.best_ppl()
    return (run.group, run is not base, ppl is None, ppl if ppl is not None else 0.0, run.name)


def results_table(runs: list[Run]) -> list[str]:
    """Grouped by folder; in each group the base first, then best validation perplexity ascending."""
    finished = sorted((r for r in runs if r.summary), key=lambda r: _sort_key(r, runs))
    lines = [
        "| run | final_val_ppl | best_val_ppl | max_tok_s | peak_mem_mb | ppl_improve_vs_base_% |",
        "|---|---|---|---|---|---|",
    ]
    for run in finished:
        s, base = run.summary, find_base(run, runs)
        improve = (
            improvement_pct(base.best_ppl(), run.best_ppl())
            if base is not None and run.best_ppl() is not None
            else None
        )
        lines.append(
            f"| {run.name} | {_fmt(s.get('final_val_ppl'), 2)} | {_fmt(s.get('best_val_ppl'), 2)} | "
            f"{_fmt(s.get('max_tok_s'), 0)} | {_fmt(s.get('peak_mem_mb'), 0)} | "
            f"{'—' if improve is None else f'{improve:+.2f}'} |"
        )
    return lines


def settings_table(runs: list[Run]) -> list[str]:
    lines = [
        "| run | model | experts | top_k | router | capacity_factor | jitter | aux_coef | z_coef | bias_rate "
        "| steps | params_active | params_total |",
        "|---" * 13 + "|",
    ]
    for run in sorted((r for r in runs if r.summary), key=lambda r: _sort_key(r, runs)):
        s = run.summary
        cf = s.get("capacity_factor")
        cells = [
            run.name,
            s.get("model"),
            s.get("num_local_experts"),
            s.get("num_experts_per_tok"),
            s.get("router_type"),
            "dropless" if cf is None else cf,
            s.get("router_jitter_noise"),
            s.get("router_aux_loss_coef"),
            s.get("router_z_loss_coef"),
            s.get("router_bias_update_rate"),
            s.get("steps"),
            f"{s.get('params_active', 0) / 1e6:.2f}M",
            f"{s.get('params_total', 0) / 1e6:.2f}M",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


# ---- plots ----------------------------------------------------------------------------


def router_grid(runs: list[Run]) -> tuple[list[float], list[float], list[list[float]]] | None:
    """(jitters, capacity factors, best ppl [jitter][cf]) when the finished MoE runs of a group form
    a full jitter x capacity-factor product of at least 2 x 2 with one run per cell; else None."""
    cells = {}
    for run in runs:
        s = run.summary
        if not s or not s.get("num_local_experts") or s.get("capacity_factor") is None or run.best_ppl() is None:
            continue
        key = (s.get("router_jitter_noise") or 0.0, s["capacity_factor"])
        if key in cells:
            return None  # two runs in one cell: something else varies too
        cells[key] = run.best_ppl()
    jitters, factors = sorted({j for j, _ in cells}), sorted({c for _, c in cells})
    if len(jitters) < 2 or len(factors) < 2 or len(cells) != len(jitters) * len(factors):
        return None
    return jitters, factors, [[cells[(j, c)] for c in factors] for j in jitters]


def plot_router_heatmap(grid, title: str, path: Path) -> None:
    jitters, factors, ppl = grid
    fig = Figure(figsize=(1.4 * len(factors) + 2.5, 1.0 * len(jitters) + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(ppl, cmap="viridis_r", aspect="auto")  # reversed: brighter is better (lower ppl)
    ax.set_xticks(range(len(factors)), labels=[f"{c:g}" for c in factors])
    ax.set_yticks(range(len(jitters)), labels=[f"{j:g}" for j in jitters])
    for i, row in enumerate(ppl):
        for k, value in enumerate(row):
            r, g, b, _ = image.cmap(image.norm(value))
            ax.text(
                k,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=9,
                color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white",
            )  # readable on any cell
    ax.set_xlabel("capacity factor")
    ax.set_ylabel("router jitter")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="best validation perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_val_loss(runs: list[Run], title: str, path: Path) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for run in runs:
        ax.plot([r["step"] for r in run.evals], [r["loss"] for r in run.evals], marker=".", label=run.label)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_per_layer(runs: list[Run], stat: str, ylabel: str, title: str, path: Path) -> bool:
    """One panel per MoE layer, one line per run, against step; False (nothing written) without data."""
    series = {run.label: run.layer_series(stat) for run in runs}
    layers = sorted({layer for per_layer in series.values() for layer in per_layer})
    if not layers:
        return False
    cols = math.ceil(math.sqrt(len(layers)))
    rows = math.ceil(len(layers) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows + 0.8))
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, per_layer in series.items():
            if layer in per_layer:
                ax.plot(*per_layer[layer], marker=".", label=name)
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    # One legend for all panels, from every panel: a run may lack some layers (--skip_first_moe).
    legend = {label: h for ax in fig.axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=min(len(legend), 4), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, (0.25 + 0.2 * math.ceil(len(legend) / 4)) / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100)
    return True


def compares_strategies(runs: list[Run]) -> bool:
    """Whether a group's finished MoE runs differ in how tokens pick experts (router type or top-k)."""
    kinds = {
        (r.summary.get("router_type"), r.summary.get("num_experts_per_tok"))
        for r in runs
        if r.summary and r.summary.get("num_local_experts")
    }
    return len(kinds) >= 2


def _last_eval_per_layer(run: Run, stat: str) -> dict[int, float]:
    return {layer: values[-1] for layer, (_, values) in run.layer_series(stat).items()}


def plot_strategy(runs: list[Run], title: str, path: Path) -> None:
    """Final validation loss and top-3 accuracy per run, and per-layer entropy and utilisation std
    at the last evaluation, as bars."""
    done = [r for r in runs if r.summary]
    names = [r.label for r in done]
    fig = Figure(figsize=(max(10, 1.6 * len(done) + 6), 8))
    scalar_panels = (("final_val_loss", "validation loss (nats/token)"), ("final_top3_acc", "top-3 accuracy"))
    for i, (key, label) in enumerate(scalar_panels):
        ax = fig.add_subplot(2, 2, i + 1)
        values = [r.summary.get(key) if r.summary.get(key) is not None else math.nan for r in done]
        ax.bar(range(len(done)), values, color=[f"C{k}" for k in range(len(done))])
        ax.set_xticks(range(len(done)), labels=names, rotation=20, ha="right", fontsize=8)
        ax.set_xlabel("run")
        ax.set_ylabel(label)
        ax.set_title(f"{label}, last evaluation", fontsize=10)
    for i, (stat, label) in enumerate((("entropy", "routing entropy (nats)"), ("util_std", "utilisation std"))):
        ax = fig.add_subplot(2, 2, i + 3)
        per_run = {name: _last_eval_per_layer(r, stat) for name, r in zip(names, done)}
        layers = sorted({layer for v in per_run.values() for layer in v})
        width = 0.8 / max(len(per_run), 1)
        for k, (name, by_layer) in enumerate(per_run.items()):
            ax.bar(
                [layer + (k - (len(per_run) - 1) / 2) * width for layer in layers],
                [by_layer.get(layer, math.nan) for layer in layers],
                width,
                label=name,
                color=f"C{k}",
            )
        ax.set_xticks(layers)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per layer, last evaluation", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def group_plots(group: str, runs: list[Run], out_dir: Path) -> list[tuple[str, str]]:
    """Write the group's PNGs; returns (caption, file name) for each one written."""
    prefix = f"{group.replace('/', '_')}_" if group else ""
    label = group or "runs"
    written = []

    def target(name: str, caption: str) -> Path:
        written.append((caption, prefix + name))
        return out_dir / (prefix + name)

    plot_val_loss(runs, f"{label}: validation loss", target("val_loss.png", "validation loss"))
    for stat, ylabel, name in (
        ("entropy", "routing entropy (nats)", "routing_entropy.png"),
        ("util_std", "expert utilisation std", "util_std.png"),
    ):
        if not plot_per_layer(runs, stat, ylabel, f"{label}: {ylabel} per layer (eval)", out_dir / (prefix + name)):
            continue
        written.append((f"{ylabel} per layer (eval)", prefix + name))
    grid = router_grid(runs)
    if grid is not None:
        plot_router_heatmap(
            grid,
            f"{label}: best validation perplexity",
            target("router_heatmap.png", "router grid: jitter x capacity factor"),
        )
    if compares_strategies(runs):
        plot_strategy(runs, f"{label}: routing strategies", target("routing_strategies.png", "routing strategies"))
    return written


# ---- the report -------------------------------------------------------------------------


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Render report.md and its PNGs aside, then put them into `out_dir` (default: `runs_dir`), beside
    whatever else is there, unless one of their names is taken by a file we did not write (exit 2)."""
    runs_dir = Path(runs_dir)
    out_dir = Path(out_dir) if out_dir is not None else runs_dir
    runs = load_runs(runs_dir)
    if not runs:
        raise SystemExit(f"error: no run folder (metrics.jsonl or summary.json) below {runs_dir}")
    with tempfile.TemporaryDirectory() as staging:
        render(runs_dir, runs, Path(staging))
        names = sorted(p.name for p in Path(staging).iterdir())
        claim_dir(out_dir, "report", names, legacy=_old_report, what="--out")
        for name in names:
            data = (Path(staging) / name).read_bytes()
            write_atomic(out_dir / name, lambda f, data=data: f.write(data))
    return out_dir / "report.md"


def _old_report(folder: Path) -> bool:
    """A report written before output records existed."""
    path = folder / "report.md"
    return path.is_file() and path.read_text(errors="replace").startswith("# Routing report")


def render(runs_dir: Path, runs: list[Run], out_dir: Path) -> None:
    finished = [r for r in runs if r.summary]
    bases = sorted({b.name for r in finished if (b := find_base(r, runs)) is not None})
    md = [
        f"# Routing report: `{runs_dir}`",
        "",
        f"{len(finished)} finished run(s), {len(runs) - len(finished)} unfinished.",
        "",
        "## Results",
        "",
        IMPROVE_NOTE
        + (
            f" Base run(s): {', '.join(f'`{b}`' for b in bases)}."
            if bases
            else " No dense run here, so no improvement is computed."
        ),
        "",
        *results_table(runs),
        "",
        "## Settings",
        "",
        *settings_table(runs),
        "",
        "## Plots",
        "",
    ]
    for group in sorted({r.group for r in runs}):
        md += [f"### {group or 'runs'}", ""]
        for caption, name in group_plots(group, [r for r in runs if r.group == group], out_dir):
            md += [f"![{caption}]({name})", ""]
    md += ["## Routing warnings", ""]
    warned = [(r.name, w) for r in finished for w in r.summary.get("routing_warnings") or []]
    md += [f"- `{name}`: {w}" for name, w in warned] or ["None."]
    unfinished = [r for r in runs if not r.summary]
    if unfinished:
        md += ["", "## Unfinished runs (no summary.json)", ""]
        md += [f"- `{r.name}`: last eval at step {r.evals[-1]['step'] if r.evals else '—'}" for r in unfinished]
    (out_dir / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir", help="a run folder, a grid folder or a folder of grids")
    p.add_argument("--out", help="where report.md and the PNGs go (default: RUNS_DIR)")
    args = p.parse_args(argv)
    print(write_report(args.runs_dir, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
