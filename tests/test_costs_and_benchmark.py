"""The analytic parameter and FLOPs counts against the built model, and `tools/benchmark.py` end to end."""

import json

import pytest
import torch
from launcher import ROOT, check, python
from torch import nn

from moe_dist import PRESETS, MoEConfig, MoEForCausalLM
from moe_dist.analysis.costs import flops_per_rank, flops_per_token, parameter_counts
from moe_dist.model.moe import LocalExperts
from moe_dist.model.routing import Router

VARIANTS = [(p, {}) for p in PRESETS] + [
    ("tiny-moe", dict(num_shared_experts=2, expert_bias=True, moe_every=2, skip_first_moe=1, tie_word_embeddings=True)),
    ("tiny-modern", dict(num_shared_experts=1, bias=True, num_experts_per_tok=3)),
]


def meta_model(preset: str, **overrides) -> MoEForCausalLM:
    with torch.device("meta"):
        return MoEForCausalLM(MoEConfig.from_preset(preset, **overrides))


def attention_score_flops(config: MoEConfig, context: int) -> int:
    """QK^T and softmax(.)V: 2 FLOPs per multiply-add, every query head over the full context."""
    return config.num_hidden_layers * 2 * 2 * context * config.num_attention_heads * config.head_dim


@pytest.mark.parametrize("preset, overrides", VARIANTS)
def test_parameter_counts_match_the_built_model(preset, overrides):
    model = meta_model(preset, **overrides)
    counts = parameter_counts(model.config)
    assert counts["total"] == model.num_parameters()
    assert counts["active"] == model.num_active_parameters()
    assert counts["total"] - counts["embedding"] == model.num_parameters(exclude_embeddings=True)
    experts = sum(p.numel() for m in model.modules() if isinstance(m, LocalExperts) for p in m.parameters())
    assert counts["expert"] == experts and counts["dense"] == counts["total"] - experts


@pytest.mark.parametrize("preset, overrides", VARIANTS)
def test_flops_per_token_are_two_per_matmul_weight_a_token_passes_plus_attention_scores(preset, overrides):
    model = meta_model(preset, **overrides)
    config = model.config
    in_experts = {id(p) for m in model.modules() if isinstance(m, LocalExperts) for p in m.parameters()}
    share = config.num_experts_per_tok / max(config.num_local_experts, 1)  # a token visits k of E experts
    matmul = sum(
        m.weight.numel() * (share if id(m.weight) in in_experts else 1)
        for m in model.modules()
        if isinstance(m, nn.Linear)
    )
    matmul += sum(r.weight.numel() for r in model.modules() if isinstance(r, Router))
    flops = flops_per_token(config, context=100)
    assert flops["total"] == pytest.approx(2 * matmul + attention_score_flops(config, 100), rel=1e-12)
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total")


def test_attention_flops_grow_with_context_and_gqa_shrinks_only_the_kv_projections():
    mha, gqa = (MoEConfig.from_preset("tiny-modern", num_key_value_heads=n) for n in (4, 1))
    short, long = flops_per_token(mha, context=64), flops_per_token(mha, context=128)
    assert long["attention_scores"] == 2 * short["attention_scores"]
    assert long["total"] - short["total"] == attention_score_flops(mha, 64)
    grouped = flops_per_token(gqa, context=64)
    assert grouped["attention_scores"] == short["attention_scores"]
    D, kv = mha.hidden_size, gqa.head_dim  # one KV head: k and v are head_dim wide
    assert short["attention_proj"] - grouped["attention_proj"] == mha.num_hidden_layers * 2 * 2 * D * (D - kv)


@pytest.mark.parametrize("etp_size", [1, 2, 4])
def test_etp_divides_expert_flops_per_row_by_t_and_multiplies_the_rows_by_t(etp_size):
    """Without EP the experts run the exact routes: a rank's slices on the T-fold gathered tokens cost what its own
    tokens cost through whole experts, so the per-rank FLOPs equal tokens x `flops_per_token` for every T."""
    config = MoEConfig.from_preset("tiny-modern")  # SwiGLU, top-2
    tokens, seq = 4 * 64, 64
    flops = flops_per_rank(config, tokens_per_rank=tokens, seq_len=seq, etp_size=etp_size)
    assert flops["forward"] == tokens * flops_per_token(config, context=seq)["total"]
    assert flops["train"] == 3 * flops["forward"]
    row = 2 * 3 * config.hidden_size * config.moe_intermediate_size // etp_size  # one slice of one expert
    assert flops["routed_experts"] == len(config.moe_layer_indices) * etp_size * tokens * 2 * row


def test_ep_expert_flops_count_every_slot_of_the_capacity_buffer():
    """With EP DeepSpeed's buffer computes all E x C slots, empty ones too; ETP gathers T x the tokens into it."""
    config = MoEConfig.from_preset("tiny-moe", capacity_factor=1.25)  # 8 experts, top-1, GELU
    tokens = 512
    C = -(-tokens * 5 // 4 // 8)  # ceil(512 x 1.25 / 8) = 80
    per_slot = 2 * 2 * config.hidden_size * config.moe_intermediate_size
    ep = flops_per_rank(config, tokens_per_rank=tokens, seq_len=128, ep_size=2)
    assert ep["routed_experts"] == config.num_hidden_layers * 8 * C * per_slot
    etp = flops_per_rank(config, tokens_per_rank=tokens, seq_len=128, ep_size=2, etp_size=2)
    assert etp["routed_experts"] == config.num_hidden_layers * 8 * (2 * C) * per_slot // 2
    assert etp["non_expert"] == ep["non_expert"]


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense"])
def test_benchmark_reports_sizes_flops_and_latencies_as_json(tmp_path, preset):
    out = tmp_path / "bench.json"
    check(
        python(
            ROOT / "tools" / "benchmark.py",
            ["--preset", preset, "--prompt_len", "8", "--new_tokens", "3", "--repeats", "1", "--json", str(out)],
        )
    )
    result = json.loads(out.read_text())
    model = meta_model(preset)
    assert result["params_total"] == model.num_parameters()
    assert result["params_active"] == model.num_active_parameters()
    if model.config.is_moe:
        assert result["params_active"] < result["params_total"]
    else:
        assert result["params_active"] == result["params_total"]
    context = result["context"]
    assert context == model.config.max_position_embeddings
    expected = 2 * model.num_active_parameters(exclude_embeddings=True) + attention_score_flops(model.config, context)
    assert result["flops_per_token"]["total"] == pytest.approx(expected, rel=0.05)
    assert [row["batch"] for row in result["batches"]] == [1, 8]
    for row in result["batches"]:
        assert row["prefill_ms"] > 0 and row["decode_ms"] > 0 and row["generate_tok_s"] > 0
        assert row["peak_mem_mb"] > 0
