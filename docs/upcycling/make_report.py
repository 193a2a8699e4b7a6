"""Report of the upcycling study (docs/upcycling/run.sh): report.md and PNGs from the run folders.

    python docs/upcycling/make_report.py runs/upcycling docs/upcycling

For each block style: validation perplexity against total steps, tokens and training FLOPs, where a run
that starts from the dense checkpoint (dense-cont, up-top1, up-top2, up-top2-g2) is placed after the dense run's N steps
and charged their tokens and FLOPs (its sunk cost); tokens/s; and, for the MoE runs, the experts' pairwise
cosine similarity and utilisation std per layer at every eval. Training FLOPs are 3 x the forward FLOPs of
`moe_dist.analysis.costs.flops_per_token` (forward + backward), per token of every step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure

from moe_dist.analysis.costs import flops_per_token
from moe_dist.model.configuration import MoEConfig

RUNS = ("dense", "dense-cont", "up-top1", "up-top2", "up-top2-g2", "scratch")
FROM_DENSE = ("dense-cont", "up-top1", "up-top2", "up-top2-g2")


def load(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((run / "summary.json").read_text())
    config = MoEConfig.from_pretrained(run / "hf")
    seq_len = summary["tokens_per_step"] // (summary["world_size"] * 8)  # cpu_ep2.json: 8 sequences per rank
    return {
        "evals": [r for r in rows if r["kind"] == "eval"],
        "summary": summary,
        "config": config,
        "flops_per_step": 3 * flops_per_token(config, context=seq_len)["total"] * summary["tokens_per_step"],
    }


def curves(runs: dict) -> dict:
    """Per run: (total steps, tokens, FLOPs, val ppl) at each eval, the dense run's cost added where it started."""
    dense = runs["dense"]
    out = {}
    for name, run in runs.items():
        sunk_steps = dense["summary"]["steps"] if name in FROM_DENSE else 0
        sunk_flops = sunk_steps * dense["flops_per_step"]
        per_step = run["summary"]["tokens_per_step"]
        out[name] = [
            (
                sunk_steps + e["step"],
                (sunk_steps + e["step"]) * per_step,
                sunk_flops + e["step"] * run["flops_per_step"],
                e["ppl"],
            )
            for e in run["evals"]
        ]
    return out


def plot_ppl(style: str, lines: dict, path: Path) -> None:
    fig = Figure(figsize=(15, 4.2))
    for i, (label, scale) in enumerate((("total steps", 1), ("tokens (M)", 1e6), ("training FLOPs (TFLOP)", 1e12))):
        ax = fig.add_subplot(1, 3, i + 1)
        for k, (name, points) in enumerate(lines.items()):
            ax.plot(
                [p[i] / scale for p in points],
                [p[3] for p in points],
                label=name,
                color=f"C{k}",
                linestyle="--" if name.startswith("dense") else "-",
            )
        ax.set_xlabel(label)
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle(f"{style}: validation perplexity (runs from the dense checkpoint start after its steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def plot_experts(style: str, runs: dict, path: Path) -> None:
    moe = {n: r for n, r in runs.items() if r["config"].is_moe}
    fig = Figure(figsize=(5 * len(moe), 7.5))
    for col, (name, run) in enumerate(moe.items()):
        for row, (stat, ylabel) in enumerate(
            (("expert_cos_mean", "mean pairwise cosine of experts"), ("util_std", "expert utilisation std"))
        ):
            ax = fig.add_subplot(2, len(moe), row * len(moe) + col + 1)
            for layer in run["config"].moe_layer_indices:
                key = f"routing/layer{layer}/{stat}"
                points = [(e["step"], e[key]) for e in run["evals"] if e.get(key) is not None]
                ax.plot(*zip(*points), label=f"layer {layer}") if points else None
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("step (own)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{style}: do the experts diversify?")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def table(runs: dict, lines: dict) -> list[str]:
    out = [
        "| run | own steps | total steps | final val ppl | best val ppl | training TFLOP (incl. sunk) | "
        "max tok/s (2 ranks) | params total / active | experts' cosine, last eval (mean over layers) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, run in runs.items():
        s, last = run["summary"], run["evals"][-1]
        cos = [v for k, v in last.items() if k.endswith("/expert_cos_mean")]
        similarity = f"{sum(cos) / len(cos):.3f}" if cos else "—"
        out.append(
            f"| {name} | {s['steps']} | {lines[name][-1][0]} | {s['final_val_ppl']:.2f} | {s['best_val_ppl']:.2f} | "
            f"{lines[name][-1][2] / 1e12:.1f} | {s['max_tok_s']:,.0f} | {s['params_total'] / 1e6:.2f}M / "
            f"{s['params_active'] / 1e6:.2f}M | {similarity} |"
        )
    return out


def main(runs_dir: str, out_dir: str) -> None:
    runs_dir, out = Path(runs_dir), Path(out_dir)
    md = [
        "# Sparse upcycling on the TinyStories sample",
        "",
        "Made by `bash docs/upcycling/run.sh` (runs) and `python docs/upcycling/make_report.py runs/upcycling "
        "docs/upcycling` (this page); the settings are in run.sh. One seed, one data sample.",
        "",
        "up-top2-g2 is fine-grained: 16 experts, each half of one of 8 copies. Its cosine compares every pair, "
        "and the two halves of a copy hold different channels, so it starts near 7/15 (the 7 other copies of "
        "the same half are identical), not at 1: read it against 7/15, the coarse runs against 1.",
        "",
    ]
    results = {}
    for style in ("gpt2", "modern"):
        runs = {
            name: load(runs_dir / style / name) for name in RUNS if (runs_dir / style / name / "summary.json").is_file()
        }
        if "dense" not in runs:
            continue
        lines = curves(runs)
        plot_ppl(style, lines, out / f"{style}_val_ppl.png")
        plot_experts(style, runs, out / f"{style}_experts.png")
        md += [
            f"## {style} block",
            "",
            *table(runs, lines),
            "",
            f"![validation perplexity]({style}_val_ppl.png)",
            "",
            f"![expert similarity and utilisation]({style}_experts.png)",
            "",
        ]
        results[style] = {
            name: {"summary": r["summary"], "evals": r["evals"], "curve": lines[name]} for name, r in runs.items()
        }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text("\n".join(md) + "\n")
    print(out / "report.md")


if __name__ == "__main__":
    main(*sys.argv[1:3])
