"""tools/profile_alltoall.py on 2 CPU ranks through the real launcher: its outputs, and the bytes its
probe sees the expert all-to-alls move per step against the capacity formula."""

import json

import matplotlib.image
import pytest
from launcher import CPU_EP2, ROOT, check, deepspeed

TOOL = ROOT / "tools" / "profile_alltoall.py"


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """tiny-moe on cpu_ep2.json (micro-batch 8 x seq 128, fp32), capacity factor 1.0; two sizes, two steps."""
    out = tmp_path_factory.mktemp("alltoall")
    check(deepspeed(TOOL, ["--deepspeed", CPU_EP2, "--model", "tiny-moe", "--vocab_size", "512",
                           "--capacity_factor", "1.0", "--sizes", "4K", "64K", "--warmup", "1", "--repeats", "3",
                           "--warmup_steps", "1", "--steps", "2", "--out", str(out)]))
    return out, json.loads((out / "alltoall.json").read_text())


@pytest.mark.multirank
def test_profile_writes_report_json_and_plot(profile):
    out, result = profile
    report = (out / "report.md").read_text()
    assert "## Microbenchmark" in report and "## Training step" in report and "say nothing about NVLink" in report
    assert matplotlib.image.imread(out / "alltoall.png").ndim == 3
    assert [r["rank"] for r in result["step"]] == [0, 1]
    for rank in result["step"]:
        m = rank["median"]
        assert m["step_ms"] > 0 and m["a2a_fwd_ms"] > 0 and m["a2a_bwd_ms"] > 0 and 0 < m["a2a_share"] < 1
        assert m["ds_timer_fwd_a2a_ms"] > 0  # wall_clock_breakdown reached DeepSpeed's MoE layers


@pytest.mark.multirank
def test_bytes_moved_per_step_equal_the_capacity_formula(profile):
    _, result = profile
    # 4 MoE layers, E=8, d=128, fp32; 8 x 128 = 1024 tokens per rank, top-1 -> C = 1024 / 8 = 128 slots.
    per_call = 8 * 128 * 128 * 4
    for rank in result["step"]:
        for step in rank["steps"]:
            assert step["a2a_fwd_calls"] == step["a2a_bwd_calls"] == 2 * 4  # dispatch + combine per layer
            assert step["a2a_fwd_bytes"] == step["a2a_bwd_bytes"] == 2 * 4 * per_call
    analytic = result["bytes"]["analytic"]
    assert (analytic["capacity"], analytic["per_call"], analytic["forward"]) == (128, per_call, 2 * 4 * per_call)
    assert result["bytes"]["equal"] is True


@pytest.mark.multirank
def test_microbenchmark_covers_each_size_on_the_two_rank_expert_group(profile):
    _, result = profile
    assert result["setup"]["ep_size"] == 2 and result["setup"]["backend"] == "gloo"
    rows = result["microbenchmark"]
    assert [r["bytes"] for r in rows] == [4096, 65536]
    for r in rows:
        assert r["median_us"] > 0
        assert r["busbw_gbs"] == pytest.approx(r["algbw_gbs"] / 2)  # (n-1)/n at n = 2


def test_dropless_routing_has_no_analytic_byte_count(make_config):
    from moe_dist.analysis.comm_cost import step_alltoall_bytes

    with pytest.raises(ValueError, match="dropless"):
        step_alltoall_bytes(make_config(capacity_factor=None), tokens_per_micro_batch=64, micro_batches=1,
                            dtype_bytes=4)
