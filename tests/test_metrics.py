"""Behaviour of moe_dist.train.metrics and moe_dist.train.logging_io: routing health, collapse warnings,
memory, throughput, and the run-folder files (JSONL, tensorboard, heatmaps, summary)."""

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from moe_dist.model.configuration import MoEConfig
from moe_dist.model.routing import Router
from moe_dist.train.logging_io import REQUIRED_SUMMARY_KEYS, MetricsWriter, write_summary
from moe_dist.train.metrics import (
    CollapseMonitor,
    RoutingAccumulator,
    Throughput,
    coefficient_of_variation,
    format_progress,
    peak_memory_mb,
    reset_peak_memory,
    routing_health,
    routing_utilization,
    utilization,
)

E = 8


def layer_stats(counts, z=0.01, entropy=1.5, drop=0.0):
    counts = torch.as_tensor(counts, dtype=torch.long)
    return {
        "selected_per_expert": counts,
        "tokens_per_expert": counts.clone(),
        "drop_fraction": torch.tensor(drop),
        "entropy": torch.tensor(entropy),
        "aux_loss": torch.tensor(1.0),
        "z_loss": torch.tensor(z),
        "score_bias": torch.zeros(len(counts)),
    }


BALANCED = [100] * E
COLLAPSED = [0] + [100] * (E - 1)  # expert 0 starves


# ---- routing math ---------------------------------------------------------------------


def test_health_of_a_real_router_forward_has_every_key():
    config = MoEConfig.from_preset("tiny-moe")
    router = Router(config, layer_idx=2)
    torch.nn.init.normal_(router.weight, std=0.02)
    router(torch.randn(64, config.hidden_size))
    health = routing_health({2: router.stats})
    for name in ("entropy", "drop_fraction", "aux_loss", "z_loss", "util_std", "util_cv", "util_min_share"):
        assert math.isfinite(health[f"routing/layer2/{name}"]), name
    experts = config.num_local_experts
    assert sum(health[f"routing/layer2/util/e{e}"] for e in range(experts)) == pytest.approx(1.0)
    assert all(f"routing/layer2/bias/e{e}" in health for e in range(experts))


def test_utilization_sums_to_one_and_is_zero_for_no_routes():
    assert utilization(torch.tensor([3, 1, 0, 4])).sum().item() == pytest.approx(1.0)
    assert utilization(torch.zeros(4, dtype=torch.long)).tolist() == [0.0] * 4


def test_cv_is_zero_when_balanced_and_large_when_collapsed():
    balanced = routing_health({0: layer_stats(BALANCED)})
    assert balanced["routing/layer0/util_cv"] == pytest.approx(0.0)
    assert balanced["routing/layer0/util_min_share"] == pytest.approx(1.0)
    one_expert = routing_health({0: layer_stats([800] + [0] * (E - 1))})
    assert one_expert["routing/layer0/util_cv"] == pytest.approx(math.sqrt(E - 1))
    assert one_expert["routing/layer0/util_min_share"] == 0.0
    assert math.isnan(coefficient_of_variation(torch.zeros(3)))


def test_routing_utilization_is_layers_by_experts_in_layer_order():
    util_LE = routing_utilization({3: layer_stats(COLLAPSED), 1: layer_stats(BALANCED)})
    assert util_LE.shape == (2, E)
    assert util_LE[0] == pytest.approx(np.full(E, 1 / E)) and util_LE[1, 0] == 0.0


def test_accumulator_sums_counts_and_averages_scalars():
    acc = RoutingAccumulator()
    acc.add({0: layer_stats(BALANCED, z=1.0, drop=0.0)})
    acc.add({0: layer_stats(COLLAPSED, z=3.0, drop=0.5)})
    avg = acc.average()[0]
    assert avg["selected_per_expert"].tolist() == [100] + [200] * (E - 1)
    assert avg["z_loss"].item() == pytest.approx(2.0) and avg["drop_fraction"].item() == pytest.approx(0.25)
    assert "routing/layer0/util_cv" in routing_health(acc.average())
    acc.reset()
    assert acc.average() == {}


# ---- collapse monitor -----------------------------------------------------------------


def test_collapse_fires_after_exactly_patience_evals_and_once():
    monitor = CollapseMonitor(E, patience=3)
    fired = [monitor.update(step, {2: layer_stats(COLLAPSED)}) for step in (100, 200, 300, 400)]
    assert fired[:2] == [[], []] and fired[3] == []
    assert fired[2] == ["layer 2 expert 0 collapsed: 0.0% of its fair share for 3 evals (step 300)"]
    assert monitor.warnings == fired[2]


def test_recovery_resets_the_collapse_streak():
    monitor = CollapseMonitor(E, patience=2)
    for counts in (COLLAPSED, BALANCED, COLLAPSED):
        assert monitor.update(0, {0: layer_stats(counts)}) == []


def test_balanced_routing_with_flat_z_loss_stays_quiet():
    monitor = CollapseMonitor(E, patience=1, z_rise_evals=3)
    for step in range(10):
        assert monitor.update(step, {0: layer_stats(BALANCED, z=0.5), 1: layer_stats(BALANCED, z=0.0)}) == []
    assert monitor.warnings == []


def test_steadily_rising_z_loss_warns():
    monitor = CollapseMonitor(E, z_rise_evals=5)
    fired = [monitor.update(step, {1: layer_stats(BALANCED, z=0.1 * (1 + step))}) for step in range(6)]
    assert [bool(w) for w in fired] == [False] * 4 + [True, False]
    assert fired[4][0].startswith("layer 1 z-loss rose for 5 evals in a row")


def test_collapse_monitor_state_round_trips_through_json():
    monitor = CollapseMonitor(E, patience=3)
    for step in (1, 2):
        monitor.update(step, {0: layer_stats(COLLAPSED)})
    resumed = CollapseMonitor(E, patience=3)
    resumed.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert resumed.state_dict() == monitor.state_dict()
    assert resumed.update(3, {0: layer_stats(COLLAPSED)}) == monitor.update(3, {0: layer_stats(COLLAPSED)}) != []


# ---- memory and throughput ------------------------------------------------------------


def test_cpu_peak_memory_is_the_peak_rss():
    mem = peak_memory_mb("cpu")
    assert mem["rss_peak_mb"] > 0 and mem["rss_mb"] > 0
    assert mem["peak_mem_mb"] == mem["rss_peak_mb"]
    assert "torch_peak_mb" not in mem
    reset_peak_memory("cpu")  # a no-op on CPU, and must not raise


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_throughput_excludes_the_first_step_and_windows_the_rest():
    clock = FakeClock()
    meter = Throughput(window=2, clock=clock)
    assert meter.eta_s(0, 10) is None
    for seconds in (30.0, 1.0, 2.0, 1.0):  # the 30 s first step is compilation
        clock.now += seconds
        meter.update(1000)
    assert meter.tokens_per_s == pytest.approx(2000 / 3)  # the last 2 steps: 2000 tokens in 3 s
    assert meter.max_tokens_per_s == pytest.approx(1000)  # step 2 alone; step 1 never counts
    assert meter.eta_s(4, 10) == pytest.approx(6 * 1.5)


def test_throughput_resume_skips_time_outside_training():
    clock = FakeClock()
    meter = Throughput(clock=clock)
    meter.update(100)
    clock.now += 60.0  # an eval
    meter.resume()
    clock.now += 1.0
    meter.update(100)
    assert meter.tokens_per_s == pytest.approx(100)


def test_format_progress():
    line = format_progress(120, 300, 3.41234, 4.8e-4, 12_345.0, 92.0)
    assert line == "step 120/300 | loss 3.412 | lr 4.8e-04 | 12.3k tok/s | eta 1m32s"
    assert format_progress(1, 2, 1.0, 1e-3, 5.0, None).endswith("5 tok/s | eta ?")


# ---- run-folder files -----------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writer_appends_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    health = routing_health({0: layer_stats(COLLAPSED)})
    writer.log(10, "train", {"loss": torch.tensor(3.5), "lr": 1e-3, "grad_norm": float("inf"), **health})
    writer.log(20, "eval", {"ppl": np.float32(33.0), "loss": float("nan")})
    writer.histogram(20, "eval/routing/layer0/util", torch.rand(E))
    writer.close()
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["kind"]) for r in lines] == [(10, "train"), (20, "eval")]
    assert lines[0]["loss"] == 3.5 and lines[0]["grad_norm"] is None and "time" in lines[0]
    assert "routing/layer0/util_cv" in lines[0] and lines[1]["loss"] is None
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    reopened = MetricsWriter(tmp_path, enabled=True)  # resume appends
    reopened.log(30, "train", {"loss": 3.0})
    reopened.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20, 30]


def test_disabled_writer_touches_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "run", enabled=False)
    writer.log(1, "train", {"loss": 1.0})
    writer.utilization_heatmap(1, np.full((2, E), 1 / E))
    writer.truncate_after(0)
    writer.close()
    assert not (tmp_path / "run").exists()


def test_heatmap_is_a_readable_png(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    util_LE = routing_utilization({1: layer_stats(BALANCED), 3: layer_stats(COLLAPSED)})
    writer.utilization_heatmap(400, util_LE, layers=[1, 3])
    writer.close()
    png = tmp_path / "heatmaps" / "step_0000400.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 0 and image.shape[1] > 0


def test_truncate_after_drops_later_and_torn_lines(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    for step in (10, 20, 30, 40):
        writer.log(step, "train", {"loss": 1.0})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 50, "kind": "tr')  # killed mid-write
    resumed = MetricsWriter(tmp_path, enabled=True)
    resumed.truncate_after(20)
    resumed.log(30, "train", {"loss": 0.5})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(10, 1.0), (20, 1.0), (30, 0.5)]
    assert not list(tmp_path.glob("*.tmp*"))


def full_summary() -> dict:
    return {key: 1.0 for key in REQUIRED_SUMMARY_KEYS} | {"model": "tiny-moe", "router_type": "softmax"}


def test_write_summary_refuses_a_missing_key_and_keeps_the_old_file(tmp_path):
    write_summary(tmp_path, full_summary() | {"final_val_ppl": float("inf")})
    before = (tmp_path / "summary.json").read_text()
    incomplete = full_summary()
    del incomplete["peak_mem_mb"]
    with pytest.raises(ValueError, match="peak_mem_mb"):
        write_summary(tmp_path, incomplete)
    assert (tmp_path / "summary.json").read_text() == before
    summary = json.loads(before)
    assert summary["model"] == "tiny-moe" and summary["final_val_ppl"] is None
    assert not list(tmp_path.glob("*.tmp*"))
