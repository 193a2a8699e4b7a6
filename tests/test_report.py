"""`tools/report.py` on run folders written by the trainer's own writers (summary.json, metrics.jsonl)."""

import math
import re

import matplotlib.image
import pytest
from launcher import ROOT, check, python

REPORT = ROOT / "tools" / "report.py"
LAYERS = (0, 1)
# name -> (summary fields, best_val_ppl); the dense run is the base of every MoE run
RUNS = {
    "experts/dense": (dict(num_local_experts=0, num_experts_per_tok=1), 40.0),
    "experts/moe-e4-top1": (dict(num_local_experts=4, num_experts_per_tok=1), 44.0),
    "experts/moe-e8-top1": (dict(num_local_experts=8, num_experts_per_tok=1), 30.0),
    "router/j0-cf1.0": (dict(router_jitter_noise=0.0, capacity_factor=1.0), 36.0),
    "router/j0-cf1.5": (dict(router_jitter_noise=0.0, capacity_factor=1.5), 34.0),
    "router/j0.01-cf1.0": (dict(router_jitter_noise=0.01, capacity_factor=1.0), 35.0),
    "router/j0.01-cf1.5": (dict(router_jitter_noise=0.01, capacity_factor=1.5), 32.0),
    "strategy/top1": (dict(num_local_experts=4, router_type="softmax"), 38.0),
    "strategy/random1": (dict(num_local_experts=4, router_type="random"), 39.0),
}
WARNING = "layer 1 expert 3 collapsed: 1.0% of its fair share for 3 evals (step 4)"


def _write_run(run_dir, fields: dict, best_ppl: float, *, finished: bool = True, warnings=()) -> None:
    from moe_dist.train.logging_io import MetricsWriter, write_summary

    settings = {
        **dict(
            num_local_experts=8,
            num_experts_per_tok=1,
            capacity_factor=None,
            router_jitter_noise=0.0,
            router_aux_loss_coef=0.01,
            router_z_loss_coef=0.0,
            router_bias_update_rate=0.0,
            router_type="softmax",
        ),
        **fields,
    }
    writer = MetricsWriter(run_dir, enabled=True)
    for step, ppl in ((2, best_ppl * 1.5), (4, best_ppl)):
        routing = (
            {}
            if settings["num_local_experts"] == 0
            else {
                f"routing/layer{layer}/{stat}": value
                for layer in LAYERS
                for stat, value in (("entropy", 1.5 - 0.1 * layer), ("util_std", 0.02 * step), ("util_cv", 0.1))
            }
        )
        writer.log(step, "train", {"loss": 5.0 - step / 4, **routing})
        writer.log(step, "eval", {"loss": math.log(ppl), "ppl": ppl, "top1_acc": 0.2, "top3_acc": 0.4, **routing})
    writer.close()
    if finished:
        write_summary(
            run_dir,
            dict(
                settings,
                final_val_ppl=best_ppl * 1.01,
                best_val_ppl=best_ppl,
                max_tok_s=1234.5,
                peak_mem_mb=567.8,
                steps=4,
                params_total=2_000_000,
                params_active=1_000_000,
                ep_size=1,
                world_size=1,
                model="tiny-moe",
                final_val_loss=4.0,
                final_top3_acc=0.4,
                routing_warnings=list(warnings),
            ),
        )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    for name, (fields, best) in RUNS.items():
        _write_run(runs / name, fields, best, warnings=[WARNING] if name == "experts/moe-e8-top1" else [])
    _write_run(runs / "strategy" / "killed", {"num_local_experts": 4}, 50.0, finished=False)
    out = runs.parent / "report"
    check(python(REPORT, [str(runs), "--out", str(out)]))
    return out, (out / "report.md").read_text()


def _table(md: str) -> list[dict]:
    """The results table's rows as {column: cell}."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| run | final_val_ppl"))
    lines = lines[start : lines.index("", start)]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    return [dict(zip(header, (c.strip() for c in line.split("|")[1:-1]))) for line in lines[2:]]


def test_improvement_is_relative_to_the_dense_runs_best_perplexity(report):
    rows = {r["run"]: r for r in _table(report[1])}
    assert float(rows["experts/moe-e8-top1"]["ppl_improve_vs_base_%"]) == pytest.approx((40 - 30) / 40 * 100)
    assert float(rows["experts/moe-e4-top1"]["ppl_improve_vs_base_%"]) == pytest.approx(-10.0)
    assert float(rows["experts/dense"]["ppl_improve_vs_base_%"]) == 0.0
    # a group without its own dense run compares against the only dense run there is
    assert float(rows["router/j0.01-cf1.5"]["ppl_improve_vs_base_%"]) == pytest.approx(20.0)
    assert "on best validation perplexity" in report[1] and "`experts/dense`" in report[1]


def test_table_holds_each_summarys_numbers_grouped_base_first_then_best_first(report):
    rows = _table(report[1])
    assert [r["run"] for r in rows[:3]] == ["experts/dense", "experts/moe-e8-top1", "experts/moe-e4-top1"]
    assert [r["run"] for r in rows[3:7]] == [
        "router/j0.01-cf1.5",
        "router/j0-cf1.5",
        "router/j0.01-cf1.0",
        "router/j0-cf1.0",
    ]
    e8 = rows[1]
    assert (e8["final_val_ppl"], e8["best_val_ppl"], e8["max_tok_s"], e8["peak_mem_mb"]) == (
        "30.30",
        "30.00",
        "1234",
        "568",
    )
    assert "strategy/killed" not in {r["run"] for r in rows}
    assert "`strategy/killed`: last eval at step 4" in report[1]


def test_routing_warnings_from_summaries_are_listed(report):
    section = report[1].split("## Routing warnings")[1]
    assert f"- `experts/moe-e8-top1`: {WARNING}" in section
    assert section.count("collapsed") == 1


def test_plots_are_readable_pngs_linked_from_the_report(report):
    out, md = report
    expected = {
        "experts_val_loss.png",
        "experts_routing_entropy.png",
        "experts_util_std.png",
        "router_router_heatmap.png",
        "strategy_routing_strategies.png",
        "strategy_val_loss.png",
    }
    linked = set(re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md))
    assert expected <= linked and all((out / name).is_file() for name in linked)
    for name in linked:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(out / name).shape
        assert height > 100 and width > 100


def test_heatmap_only_for_runs_that_form_a_jitter_by_capacity_grid(report):
    out = report[0]
    assert (out / "router_router_heatmap.png").is_file()
    assert not (out / "experts_router_heatmap.png").exists()  # dropless runs: no capacity axis
    assert not (out / "experts_routing_strategies.png").exists()  # one router type, one k


def test_router_grid_cells_hold_each_runs_best_perplexity():
    from tools.report import Run, router_grid

    runs = [
        Run(name, "router", dict(num_local_experts=8, **fields, best_val_ppl=best))
        for name, (fields, best) in RUNS.items()
        if name.startswith("router/")
    ]
    assert router_grid(runs) == ([0.0, 0.01], [1.0, 1.5], [[36.0, 34.0], [35.0, 32.0]])
    assert router_grid(runs[:3]) is None  # a missing cell is no grid
