"""tools/profile_alltoall.py on EP 2 x ETP 2 (4 CPU ranks) through the real launcher: its outputs, and the bytes
its probes see the expert all-to-alls and the ETP all-gathers and reduce-scatters move per step, against the
analytic counts."""

import json

import matplotlib.image
import pytest
from launcher import ROOT, check, deepspeed

TOOL = ROOT / "tools" / "profile_alltoall.py"
CPU_EP2_ETP2 = str(ROOT / "ds_configs" / "cpu_ep2_etp2.json")


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """tiny-moe on cpu_ep2_etp2.json (micro-batch 4 x seq 128, fp32), capacity factor 1.0; two sizes, two steps.

    One launch covers every collective: the all-to-all over the 2 ranks with the same expert slice and
    the all-gather / reduce-scatter over the 2 ranks of an ETP group."""
    out = tmp_path_factory.mktemp("alltoall")
    check(
        deepspeed(
            TOOL,
            [
                "--deepspeed",
                CPU_EP2_ETP2,
                "--model",
                "tiny-moe",
                "--vocab_size",
                "512",
                "--capacity_factor",
                "1.0",
                "--sizes",
                "4K",
                "64K",
                "--warmup",
                "1",
                "--repeats",
                "3",
                "--warmup_steps",
                "1",
                "--steps",
                "2",
                "--out",
                str(out),
            ],
            ranks=4,
            timeout=600,
        )
    )
    return out, json.loads((out / "alltoall.json").read_text())


@pytest.mark.multirank
def test_profile_writes_report_json_and_plot(profile):
    out, result = profile
    report = (out / "report.md").read_text()
    assert "## Microbenchmark" in report and "## Training step" in report and "say nothing about NVLink" in report
    assert "| ETP all-gather | forward |" in report and "| all-to-all | backward |" in report
    assert matplotlib.image.imread(out / "alltoall.png").ndim == 3
    assert [r["rank"] for r in result["step"]] == [0, 1, 2, 3]
    for rank in result["step"]:
        m = rank["median"]
        assert m["step_ms"] > 0 and m["a2a_fwd_ms"] > 0 and m["a2a_bwd_ms"] > 0 and 0 < m["a2a_share"] < 1
        assert all(m[f"{op}_{d}_ms"] > 0 for op in ("ag", "rs") for d in ("fwd", "bwd")) and 0 < m["etp_share"] < 1
        assert m["ds_timer_fwd_a2a_ms"] > 0  # wall_clock_breakdown reached DeepSpeed's MoE layers


@pytest.mark.multirank
def test_bytes_moved_per_step_equal_the_analytic_counts(profile):
    _, result = profile
    # 4 MoE layers, E=8, d=128, fp32, top-1. Per rank 4 x 128 = 512 tokens; the ETP group gathers 1024.
    # All-to-all: capacity 512 / 8 = 64 slots per rank, 128 for the gathered tokens: E x C x d x 4 per call.
    a2a = 8 * 128 * 128 * 4
    # ETP all-gather forward: tokens [1024, d] fp32, gate weights [1024, 1] fp32, expert ids + keep flags [1024, 2]
    # int64, 3 calls per layer; reduce-scatter forward: the partial outputs [1024, d]. Backward: the all-gather of
    # the output gradient, and the reduce-scatters of the token and gate-weight gradients (2 calls).
    x, weights, meta = 1024 * 128 * 4, 1024 * 4, 1024 * 2 * 8
    expected = {
        "a2a_fwd": (8, 8 * a2a),
        "a2a_bwd": (8, 8 * a2a),
        "ag_fwd": (12, 4 * (x + weights + meta)),
        "rs_fwd": (4, 4 * x),
        "ag_bwd": (4, 4 * x),
        "rs_bwd": (8, 4 * (x + weights)),
    }
    for rank in result["step"]:
        for step in rank["steps"]:
            assert {k: (step[f"{k}_calls"], step[f"{k}_bytes"]) for k in expected} == expected
    b = result["bytes"]
    assert (b["analytic"]["a2a"]["capacity"], b["analytic"]["a2a"]["per_call"]) == (128, a2a)
    assert b["analytic"]["ag"] == {"forward": 4 * (x + weights + meta), "backward": 4 * x}
    assert b["analytic"]["rs"] == {"forward": 4 * x, "backward": 4 * (x + weights)}
    assert b["equal"] == {"a2a": True, "ag": True, "rs": True}


@pytest.mark.multirank
def test_microbenchmark_covers_each_size_of_each_collective_on_its_two_rank_group(profile):
    _, result = profile
    s = result["setup"]
    assert (s["ep_size"], s["etp_size"], s["world_size"], s["backend"]) == (2, 2, 4, "gloo")
    assert set(result["microbenchmark"]) == {"a2a", "ag", "rs"}
    for rows in result["microbenchmark"].values():
        assert [r["bytes"] for r in rows] == [4096, 65536]
        for r in rows:
            assert r["median_us"] > 0
            assert r["busbw_gbs"] == pytest.approx(r["algbw_gbs"] / 2)  # (n-1)/n at n = 2


def test_dropless_routing_has_no_analytic_byte_count(make_config):
    from moe_dist.analysis.comm_cost import step_alltoall_bytes

    with pytest.raises(ValueError, match="dropless"):
        step_alltoall_bytes(
            make_config(capacity_factor=None), tokens_per_micro_batch=64, micro_batches=1, dtype_bytes=4
        )


def test_analytic_counts_without_etp_and_with_it(make_config):
    """EP alone: the capacity formula of the per-rank tokens and no ETP traffic. ETP T: the all-to-all carries the
    gathered tokens (T x the capacity), and the ETP collectives do not depend on the capacity factor."""
    from moe_dist.analysis.comm_cost import step_alltoall_bytes, step_etp_bytes

    config = make_config("tiny-moe", capacity_factor=1.0)  # make_config's shape: d 64, 2 layers (both MoE)
    shape = {"tokens_per_micro_batch": 256, "micro_batches": 2, "dtype_bytes": 4}
    ep = step_alltoall_bytes(config, **shape)
    C = 256 // config.num_local_experts
    assert (ep["capacity"], ep["forward"]) == (C, 2 * 2 * 2 * config.num_local_experts * C * 64 * 4)
    assert set(step_etp_bytes(config, etp_size=1, **shape).values()) == {0}
    assert step_alltoall_bytes(config, etp_size=4, **shape)["forward"] == 4 * ep["forward"]
    etp = step_etp_bytes(config, etp_size=4, **shape)
    assert etp == step_etp_bytes(make_config("tiny-moe", capacity_factor=2.0), etp_size=4, **shape)
    assert etp["reduce_scatter_forward"] == etp["all_gather_backward"] == 2 * 2 * 4 * 256 * 64 * 4
