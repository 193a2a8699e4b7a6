"""The analytic memory model (`moe_dist.analysis.costs.memory_bytes`), the fit verdict, and
`tools/profile_memory.py`."""

import json

import pytest
import torch
from launcher import ROOT, check, python

from moe_dist import MoEConfig, MoEForCausalLM
from moe_dist.analysis.costs import (
    GiB,
    fit_verdict,
    memory_bytes,
    reduce_bucket_elements,
)
from moe_dist.model.moe import LocalExperts

SETTINGS = {"zero_stage": 2, "precision": "bf16", "micro_batch": 4, "seq_len": 64}


def expert_and_dense_params(config: MoEConfig) -> tuple[int, int]:
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    experts = sum(p.numel() for m in model.modules() if isinstance(m, LocalExperts) for p in m.parameters())
    return experts, model.num_parameters() - experts


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_expert_memory_halves_when_ep_size_doubles(make_config, zero_stage):
    """On ep_size GPUs (the tool's default world), each rank's expert weights, grads and AdamW state halve."""
    config = make_config("tiny-moe", num_local_experts=8)
    experts, dense = expert_and_dense_params(config)

    def expert_bytes(ep: int) -> dict:
        mem = memory_bytes(config, **{**SETTINGS, "zero_stage": zero_stage}, ep_size=ep, world_size=ep)
        # Dense parameters: bf16 weights and grads, 12 bytes of AdamW state; ZeRO shards over the world.
        dense_bytes = {
            "weights": 2 * dense,
            "gradients": 2 * dense / (ep if zero_stage == 2 else 1),
            "optimizer": 12 * dense / (ep if zero_stage else 1),
        }
        return {k: mem[k] - v for k, v in dense_bytes.items()}

    one, two, four = expert_bytes(1), expert_bytes(2), expert_bytes(4)
    assert one == pytest.approx({"weights": 2 * experts, "gradients": 2 * experts, "optimizer": 12 * experts})
    assert two == pytest.approx({k: v / 2 for k, v in one.items()})
    assert four == pytest.approx({k: v / 4 for k, v in one.items()})


def test_zero_shards_expert_state_over_the_expert_data_parallel_group(make_config):
    config = make_config("tiny-moe", num_local_experts=8)
    experts, dense = expert_and_dense_params(config)
    mem = memory_bytes(config, **SETTINGS, ep_size=2, world_size=8)  # 4 replicas of each expert
    assert mem["gradients"] == pytest.approx(2 * dense / 8 + 2 * experts / 2 / 4)
    assert mem["optimizer"] == pytest.approx(12 * dense / 8 + 12 * experts / 2 / 4)


def test_zero2_shards_gradients_and_zero1_shards_only_the_optimizer_state(make_config):
    config = make_config("tiny-moe")
    params = sum(expert_and_dense_params(config))
    mem = {
        stage: memory_bytes(config, **{**SETTINGS, "zero_stage": stage}, ep_size=1, world_size=4) for stage in (0, 1, 2)
    }
    assert mem[0]["gradients"] == mem[1]["gradients"] == pytest.approx(2 * params)
    assert mem[2]["gradients"] == pytest.approx(2 * params / 4)
    assert mem[0]["optimizer"] == pytest.approx(12 * params)  # fp32 master + two fp32 moments
    assert mem[1]["optimizer"] == mem[2]["optimizer"] == pytest.approx(12 * params / 4)
    assert mem[0]["weights"] == mem[1]["weights"] == mem[2]["weights"]
    assert mem[0]["activations"] == mem[2]["activations"]


def test_fp32_adamw_keeps_only_its_moments_without_zero_and_a_master_copy_with_it(make_config):
    config = make_config("tiny-dense")
    params = sum(expert_and_dense_params(config))
    fp32 = dict(SETTINGS, precision="fp32")
    assert memory_bytes(config, **{**fp32, "zero_stage": 0}, ep_size=1, world_size=1)["optimizer"] == 8 * params
    # DeepSpeed's ZeRO-1/2 optimizer clones its partition as an fp32 master even in fp32.
    assert memory_bytes(config, **{**fp32, "zero_stage": 1}, ep_size=1, world_size=1)["optimizer"] == 12 * params


def test_dense_model_memory_does_not_depend_on_ep_size(make_config):
    config = make_config("tiny-dense")
    mems = [memory_bytes(config, **SETTINGS, ep_size=ep, world_size=8) for ep in (1, 2, 4, 8)]
    assert all(m == mems[0] for m in mems)


@pytest.mark.parametrize("dtype, precision", [(torch.bfloat16, "bf16"), (torch.float32, "fp32")])
def test_predicted_weights_are_the_bytes_of_the_built_model(make_config, dtype, precision):
    config = make_config("tiny-modern", num_shared_experts=1)
    model = MoEForCausalLM(config).to(dtype)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    mem = memory_bytes(config, **{**SETTINGS, "precision": precision}, ep_size=1, world_size=1)
    assert mem["weights"] == held


def saved_activation_bytes(model: MoEForCausalLM, input_ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward (parameters excluded), plus the returned logits."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=input_ids, shift_labels=input_ids)
    return sum(saved.values()) + out.logits.untyped_storage().nbytes()


@pytest.mark.parametrize("impl", ["loop", "grouped"])  # the CPU's default; CUDA bf16's, which stacks the weights
@pytest.mark.parametrize(
    "preset, overrides, dtype, precision",
    [
        ("tiny-moe", {}, torch.float32, "fp32"),
        ("tiny-dense", {}, torch.bfloat16, "bf16"),
        ("tiny-modern", {"num_shared_experts": 1}, torch.bfloat16, "bf16"),
        ("tiny-modern", {"num_experts_per_tok": 2}, torch.float32, "fp32"),
    ],
)
def test_predicted_activations_match_what_autograd_saves(make_config, preset, overrides, dtype, precision, impl):
    config = make_config(preset, capacity_factor=None, **overrides)
    torch.manual_seed(0)
    model = MoEForCausalLM(config).to(dtype).train()
    for experts in (m for m in model.modules() if isinstance(m, LocalExperts)):
        experts.impl = impl
    B, S = 4, config.max_position_embeddings
    measured = saved_activation_bytes(model, torch.randint(0, config.vocab_size, (B, S)))
    mem = memory_bytes(
        config,
        **{**SETTINGS, "precision": precision, "micro_batch": B, "seq_len": S},
        ep_size=1,
        world_size=1,
        experts_impl=impl,
    )
    assert mem["activations"] == pytest.approx(measured, rel=0.05)


def test_activation_checkpointing_cuts_only_activations(make_config):
    config = make_config("tiny-moe", num_hidden_layers=6)
    plain = memory_bytes(config, **SETTINGS, ep_size=1, world_size=1)
    ckpt = memory_bytes(config, **SETTINGS, ep_size=1, world_size=1, grad_ckpt=True)
    assert ckpt["activations"] < plain["activations"] / 2
    assert all(ckpt[k] == plain[k] for k in ("weights", "gradients", "optimizer"))


def test_memory_bytes_rejects_settings_deepspeed_cannot_run(make_config):
    config = make_config("tiny-moe")
    with pytest.raises(ValueError, match="zero_stage=3"):
        memory_bytes(config, **{**SETTINGS, "zero_stage": 3}, ep_size=1, world_size=1)
    with pytest.raises(ValueError, match="precision='int8'"):
        memory_bytes(config, **{**SETTINGS, "precision": "int8"}, ep_size=1, world_size=1)
    with pytest.raises(ValueError, match="ep_size=4 x etp_size=1 must divide world_size=2"):
        memory_bytes(config, **SETTINGS, ep_size=4, world_size=2)
    with pytest.raises(ValueError, match="ep_size=2 x etp_size=2 must divide world_size=2"):
        memory_bytes(config, **SETTINGS, ep_size=2, etp_size=2, world_size=2)


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_etp_slices_the_expert_state_like_a_larger_ep(make_config, zero_stage):
    """Each rank holds 1/(ep x etp) of the experts and ZeRO shards a slice over its world/(ep x etp)
    replicas, so EP 2 x ETP 2 holds the expert state of EP 4 and the dense state of any layout."""
    config = make_config("tiny-moe", num_local_experts=8)
    experts, dense = expert_and_dense_params(config)
    settings = {**SETTINGS, "zero_stage": zero_stage}
    etp = memory_bytes(config, **settings, ep_size=2, etp_size=2, world_size=8)
    ep4 = memory_bytes(config, **settings, ep_size=4, world_size=8)
    assert all(etp[k] == ep4[k] for k in ("weights", "gradients", "optimizer"))
    assert etp["weights"] == pytest.approx(2 * dense + 2 * experts / 4)
    if zero_stage == 2:
        assert etp["gradients"] == pytest.approx(2 * dense / 8 + 2 * experts / 4 / 2)


def test_etp_activations_keep_the_gathered_routes_with_a_slice_of_each_expert_body(make_config):
    """Per own token a rank keeps T x the routes (the ETP group's tokens), each with a full-width input and
    output but a 1/T slice of the expert body; the stacked expert weights shrink by T."""
    config = make_config("tiny-moe", capacity_factor=None)
    D, width, a, tokens = (
        config.hidden_size,
        config.moe_intermediate_size,
        2,
        SETTINGS["micro_batch"] * SETTINGS["seq_len"],
    )
    moe_layers = len(config.moe_layer_indices)
    act = {T: memory_bytes(config, **SETTINGS, ep_size=1, etp_size=T, world_size=4)["activations"] for T in (1, 2, 4)}
    per_route = {T: a * (D + 2 * width / T) + 8 * D for T in (1, 2, 4)}  # GELU keeps 2 bodies
    stacked = {T: a * 2 * config.num_local_experts * D * width / T for T in (1, 2, 4)}
    for T in (2, 4):
        expected = moe_layers * (tokens * (T * per_route[T] - per_route[1]) + stacked[T] - stacked[1])
        assert act[T] - act[1] == pytest.approx(expected)


@pytest.mark.parametrize(
    "zero, elements",
    [
        ({"stage": 2}, 500_000_000),  # DeepSpeed's default reduce_bucket_size, allocated whatever the model size
        ({"stage": 1, "reduce_bucket_size": 1000}, 1000),
        ({"stage": 2, "reduce_bucket_size": 1000, "overlap_comm": True}, 2000),  # double buffered
        ({"stage": 2, "contiguous_gradients": False}, 0),
        ({"stage": 0}, 0),
    ],
)
def test_reduce_bucket_is_read_from_the_deepspeed_json(zero, elements):
    assert reduce_bucket_elements({"zero_optimization": zero}) == elements


def test_reduce_bucket_counts_in_the_weights_precision(make_config):
    config = make_config("tiny-moe")
    mem = memory_bytes(config, **SETTINGS, ep_size=1, world_size=1, reduce_bucket=1000)
    assert mem["buffers"] == 2 * 1000
    assert mem["total"] == pytest.approx(
        sum(mem[k] for k in ("weights", "gradients", "optimizer", "activations", "buffers"))
    )


@pytest.mark.parametrize(
    "gib, verdict", [(1.0, "fits"), (72.0, "fits"), (72.1, "tight"), (80.0, "tight"), (80.01, "does not fit")]
)
def test_fit_verdict_keeps_ten_percent_headroom(gib, verdict):
    assert fit_verdict(gib * GiB, gpu_mem_gib=80) == verdict


CPU_EP2_ETP2 = ROOT / "ds_configs" / "cpu_ep2_etp2.json"


@pytest.mark.multirank
def test_profile_memory_predicts_a_measured_ep2_etp2_run_within_15_percent(tmp_path):
    """EP 2 x ETP 2 on 4 CPU ranks through the deepspeed launcher, next to the predicted GPU scales.

    DeepSpeed allocates its whole gradient bucket (5e8 elements by default) even for a tiny model; at
    that size the bucket alone would make any prediction that counts it look right, so the measured
    JSON asks for a bucket of 5e5 elements (2 MB) and the bound then tests the rest of the model. The
    allocator's peak moves between otherwise equal launches (the live bytes at a moment depend on when
    gloo's threads allocate and free): over 2 profiled steps the largest rank's peak was 48.8-53.1 MiB
    in three launches (10.2% to 1.2% under the prediction), over 4 steps 54.4 MiB, and once, on a CI
    machine busier than before, 47.7 MiB (11.4% under); over 6 steps 48.8 MiB in CI (10.2% under). The
    peak of one launch spans 47.7-54.4 MiB, 14% of its size, so no 10% bound holds for one launch: the
    bound is 15% either way, which the optimizer state (25% of the prediction) left out, or any part counted
    twice, still breaks. The activations, which the prediction counts most closely, are made
    the largest part (the full 128-token context)."""
    ds = json.loads(CPU_EP2_ETP2.read_text())
    ds["zero_optimization"]["reduce_bucket_size"] = 500_000
    config = tmp_path / "cpu_ep2_etp2.json"
    config.write_text(json.dumps(ds))
    out = tmp_path / "mem"
    proc = check(
        python(
            ROOT / "tools" / "profile_memory.py",
            [
                "--preset",
                "tiny-moe",
                "--measure",
                str(config),
                "--vocab_size",
                "512",
                "--seq_len",
                "128",
                "--max_steps",
                "6",
                "--timed_steps",
                "1",
                "--output_dir",
                str(out),
            ],
            timeout=600,
        )
    )
    report = (out / "report.md").read_text()
    for scale in ("ep1", "ep2", "ep4", "ep8", "cpu_ep2_etp2 (run)"):
        assert f"| {scale} |" in report, proc.stdout
    rows = {r["config"]: r for r in json.loads((out / "memory.json").read_text())["rows"]}
    assert [rows[f"ep{n}"]["world_size"] for n in (1, 2, 4, 8)] == [1, 2, 4, 8]
    assert all(rows[f"ep{n}"]["verdict"] == "fits" for n in (1, 2, 4, 8))  # tiny-moe on 80 GiB GPUs
    run = rows["cpu_ep2_etp2 (run)"]
    assert (run["world_size"], run["ep_size"], run["etp_size"], run["precision"]) == (4, 2, 2, "fp32")
    assert len(run["allocated_mb_per_rank"]) == 4 and run["measured_mb"] > run["allocated_mb"] > 0  # RSS > tensors
    assert run["predicted"]["buffers"] == 4 * 500_000
    # The prediction (every part alive at once) against the largest rank's allocator peak: within 15%, the
    # bound docs/parallelism.md states.
    assert abs(run["predicted_over_allocated"]) <= 0.15, (run["predicted"], run["allocated_mb_per_rank"])
    assert run["tok_s"] > 0 and run["train_flops_per_rank_step"] > 0
    import matplotlib.image

    assert matplotlib.image.imread(out / "memory.png").shape[2] in (3, 4)


def test_measured_gpu_row_reports_allocated_reserved_and_nvml_and_is_judged_on_reserved_plus_context():
    import importlib

    profile_memory = importlib.import_module("tools.profile_memory")
    args = profile_memory.parse_args(["--output_dir", "unused", "--cuda_context_mb", "500"])
    gpu = {
        "peak_mem_mb": 1000.0,
        "allocated_mb_per_rank": [1000.0, 900.0],
        "peak_reserved_mb_per_rank": [1500.0, 1200.0],
        "nvml_used_mb_per_rank": [1800.0, 1600.0],
    }
    row = profile_memory.measured_fields(gpu, args)
    assert row["allocated_mb_per_rank"] == [1000.0, 900.0] and row["reserved_mb_per_rank"] == [1500.0, 1200.0]
    assert row["nvml_used_mb_per_rank"] == [1800.0, 1600.0]
    assert row["judged_mb"] == 2000.0  # the largest reserved peak + the context, above allocated and NVML
    no_nvml = profile_memory.measured_fields({**gpu, "nvml_used_mb_per_rank": []}, args)
    assert no_nvml["nvml_used_mb_per_rank"] is None and no_nvml["judged_mb"] == 2000.0
    # CPU runs: RSS as before, no allocator or NVML fields.
    # CPU runs: RSS as before, the profiler's allocator peak, no reserve or NVML.
    cpu = profile_memory.measured_fields(
        {
            "peak_mem_mb": 600.0,
            "allocated_mb_per_rank": [40.0, 41.0],
            "peak_reserved_mb_per_rank": [],
            "nvml_used_mb_per_rank": [],
        },
        args,
    )
    assert cpu == {
        "measured_mb": 600.0,
        "allocated_mb_per_rank": [40.0, 41.0],
        "reserved_mb_per_rank": None,
        "nvml_used_mb_per_rank": None,
        "judged_mb": 600.0,
    }
