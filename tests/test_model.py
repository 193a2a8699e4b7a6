"""Behaviour of MoEForCausalLM and MoEConfig: sizes, init, losses, generation, saving and validation."""

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from launcher import run_without_moe_dist

from moe_dist import PRESETS, MoEConfig, MoEForCausalLM
from moe_dist.model.modeling import CACHE_FIELD
from moe_dist.model.moe import FeedForward, MoEBlock
from moe_dist.parallel.expert_parallel import ExpertParallelError, validate_expert_parallel

VOCAB = 256  # conftest.TINY_SHAPE


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def tokens(*shape: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape)


def build(config) -> MoEForCausalLM:
    torch.manual_seed(0)
    return MoEForCausalLM(config)


# ---- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, millions",
    [
        ("seed-baseline", 70.51),
        ("seed-moe-e4", 108.26),
        ("seed-moe-e8", 158.60),
        ("seed-moe-e16", 259.29),
        ("seed-top2-e16", 158.62),
    ],
)
def test_seed_preset_parameter_counts_match_the_seed_table(preset, millions):
    with torch.device("meta"):
        model = MoEForCausalLM(MoEConfig.from_preset(preset, vocab_size=50257))
    total = model.num_parameters()
    assert abs(total / 1e6 - millions) < 0.05  # to 0.1M
    active = model.num_active_parameters()
    if model.config.is_moe:
        assert active < total
        assert abs(active / 1e6 - 70.5) < 0.1  # one expert of the dense FFN's size per token
    else:
        assert active == total


def test_tiny_moe_has_the_active_parameters_of_tiny_dense():
    with torch.device("meta"):
        dense = MoEForCausalLM(MoEConfig.from_preset("tiny-dense"))
        moe = MoEForCausalLM(MoEConfig.from_preset("tiny-moe"))
    assert moe.num_parameters() > 1.2 * dense.num_parameters()
    # Differences: the router (added) and the dense FFN biases (experts have none).
    assert abs(moe.num_active_parameters() - dense.num_active_parameters()) < 1e-3 * dense.num_parameters()


def test_shared_expert_adds_an_always_active_mlp(make_config):
    plain = build(make_config("tiny-moe"))
    shared = build(make_config("tiny-moe", num_shared_experts=1))
    block = shared.model.layers[0].mlp
    assert isinstance(block.shared_mlp, FeedForward) and plain.model.layers[0].mlp.shared_mlp is None
    assert block.shared_mlp.up_proj.out_features == shared.config.moe_intermediate_size
    added = sum(p.numel() for p in block.shared_mlp.parameters()) * len(shared.config.moe_layer_indices)
    assert shared.num_parameters() - plain.num_parameters() == added
    assert shared.num_active_parameters() - plain.num_active_parameters() == added
    # The shared MLP is in the forward pass, for every token.
    x = torch.randn(1, 4, shared.config.hidden_size)
    with torch.no_grad():
        before = block(x)[0]
        block.shared_mlp.down_proj.weight.add_(1.0)
        assert ((block(x)[0] - before).abs().amax(dim=-1) > 0).all()


def test_tied_embeddings_share_one_tensor_and_save_its_parameters(make_config):
    untied = build(make_config("tiny-moe"))
    tied = build(make_config("tiny-moe", tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == VOCAB * tied.config.hidden_size


def test_moe_every_and_skip_first_moe_place_moe_blocks_exactly(make_config):
    config = make_config("tiny-moe", num_hidden_layers=6, moe_every=2, skip_first_moe=1)
    model = build(config)
    moe_layers = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoEBlock)]
    assert moe_layers == config.moe_layer_indices == [1, 3, 5]
    assert all(isinstance(model.model.layers[i].mlp, FeedForward) for i in (0, 2, 4))
    assert sorted(model.routing_stats()) == []  # nothing recorded before a forward
    model(tokens(1, 8))
    assert sorted(model.routing_stats()) == [1, 3, 5]


# ---- initialisation -------------------------------------------------------------------------


def test_experts_of_a_layer_start_with_different_weights(make_config):
    model = build(make_config("tiny-moe"))
    for layer in model.model.layers:
        weights = [expert.up_proj.weight for expert in layer.mlp.experts]
        assert all(not torch.equal(weights[0], w) for w in weights[1:])
    assert not torch.equal(
        model.model.layers[0].mlp.experts[0].up_proj.weight, model.model.layers[1].mlp.experts[0].up_proj.weight
    )


def test_expert_init_depends_only_on_seed_layer_and_global_expert_id(make_config):
    def experts(num_experts: int, burn: int = 0):
        torch.manual_seed(7)
        torch.rand(burn)  # consumes the global RNG stream; the seed stays 7
        model = MoEForCausalLM(make_config("tiny-moe", num_local_experts=num_experts))
        return model, [layer.mlp.experts for layer in model.model.layers]

    eight_model, eight = experts(8)
    sixteen_model, sixteen = experts(16, burn=1000)
    for layer in range(2):  # layer 1 is built after 8 vs 16 experts of layer 0 drew from the stream
        for e in range(8):
            for (name, a), b in zip(eight[layer][e].named_parameters(), sixteen[layer][e].parameters()):
                assert torch.equal(a, b), f"layer {layer} expert {e} {name}"
    # The rest of the model does follow the global stream.
    assert not torch.equal(eight_model.model.embed_tokens.weight, sixteen_model.model.embed_tokens.weight)
    # GPT-2 residual scaling reaches the experts' output projections: std / sqrt(2 * layers).
    std = eight_model.config.initializer_range
    assert eight[0][0].up_proj.weight.std().item() == pytest.approx(std, rel=0.1)
    assert eight[0][0].down_proj.weight.std().item() == pytest.approx(std / 2, rel=0.1)


def test_random_router_is_initialised_and_frozen(make_config):
    model = build(make_config("tiny-moe", router_type="random", num_experts_per_tok=2))
    for router in model.routers():
        assert not router.weight.requires_grad
        assert router.weight.std().item() == pytest.approx(model.config.initializer_range, rel=0.2)
    model.train()
    out = model(tokens(2, 8), labels=tokens(2, 8))
    out.loss.backward()
    assert all(r.weight.grad is None for r in model.routers())
    assert out.aux_loss.item() == 0.0


# ---- forward, losses, block styles ----------------------------------------------------------


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny-dense", {}),
        ("tiny-moe", {}),
        ("tiny-modern", {}),
        ("tiny-dense", {"num_key_value_heads": 2}),
        ("tiny-dense", {"position_embedding_type": "rope"}),
        ("tiny-dense", {"hidden_act": "swiglu"}),
        ("tiny-dense", {"norm_type": "rmsnorm"}),
        ("tiny-moe", {"num_experts_per_tok": 2, "router_z_loss_coef": 1e-3, "router_jitter_noise": 0.1}),
    ],
    ids=["tiny-dense", "tiny-moe", "tiny-modern", "gqa", "rope", "swiglu", "rmsnorm", "top2-z-jitter"],
)
def test_block_style_trains_on_cpu_with_finite_loss_and_gradients(make_config, preset, overrides):
    model = build(make_config(preset, **overrides)).train()
    ids = tokens(2, 16)
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 16, VOCAB)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_training_loss_is_lm_loss_plus_router_losses_and_eval_loss_is_lm_loss(make_config):
    model = build(make_config("tiny-moe", router_aux_loss_coef=0.01, router_z_loss_coef=1e-3))
    ids = tokens(2, 16)

    def lm_loss(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))

    model.train()
    out = model(ids, labels=ids)
    assert out.aux_loss.item() > 0.01  # ~ coef * (aux ~1) per MoE layer, plus the z-loss
    torch.testing.assert_close(out.loss, lm_loss(out.logits) + out.aux_loss)
    out.loss.backward()
    assert all(r.weight.grad.abs().sum() > 0 for r in model.routers())

    model.eval()
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, lm_loss(out.logits))


def test_shift_labels_give_the_same_loss_as_hf_labels(make_config):
    model = build(make_config("tiny-moe")).eval()
    block = tokens(2, 17)  # a packed block of seq_len + 1 tokens
    ids = block[:, :-1]
    with torch.no_grad():
        hf = model(ids, labels=ids).loss  # HF shifts: position t predicts ids[t + 1], the last is ignored
        aligned = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
        shifted = model(ids, shift_labels=aligned).loss
        full = model(ids, shift_labels=block[:, 1:]).loss  # the trainer's use: every position has a target
    torch.testing.assert_close(shifted, hf)
    assert not torch.isclose(full, hf)


def test_dropped_tokens_pass_through_the_decoder_layer_on_the_residual(make_config):
    config = make_config("tiny-moe", num_hidden_layers=1, capacity_factor=1.0, min_capacity=1)
    model = build(config).train()
    layer = model.model.layers[0]
    with torch.no_grad():  # every token selects expert 0: 2 slots (16 tokens / 8 experts)
        layer.mlp.router.score_bias[0] = 1.0
    seen = {}
    layer.post_attention_norm.register_forward_pre_hook(lambda m, args: seen.update(residual=args[0]))
    layer.register_forward_hook(lambda m, args, kwargs, out: seen.update(out=out[0]), with_kwargs=True)
    model(tokens(2, 8))
    stats = layer.mlp.router.stats
    assert stats["drop_fraction"].item() == pytest.approx(14 / 16)
    kept_T = torch.zeros(16, dtype=torch.bool)
    kept_T[:2] = True  # the first two tokens in (batch, position) order
    residual, out = seen["residual"].reshape(16, -1), seen["out"].reshape(16, -1)
    assert torch.equal(out[~kept_T], residual[~kept_T])
    assert (out[kept_T] != residual[kept_T]).any(dim=-1).all()


def test_eval_logits_do_not_depend_on_batch_mates(make_config):
    model = build(make_config("tiny-moe")).eval()
    batch = tokens(8, 24)
    with torch.no_grad():
        together = model(batch).logits
        for i in (0, 5):
            alone = model(batch[i : i + 1]).logits
            torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=0)


def test_eval_forward_does_not_accumulate_tokens_for_the_bias_update(make_config):
    model = build(make_config("tiny-moe", router_bias_update_rate=1e-2)).eval()
    with torch.no_grad():
        model(tokens(2, 8))
    assert all(r.load_sum.sum().item() == 0 for r in model.routers())
    model.update_router_biases()
    assert all(r.score_bias.abs().sum().item() == 0 for r in model.routers())


def test_update_router_biases_steps_each_router_against_its_training_load(make_config):
    rate = 1e-2
    model = build(make_config("tiny-moe", router_bias_update_rate=rate)).train()
    model(tokens(2, 16))
    loads = {r.layer_idx: r.stats["selected_per_expert"].clone() for r in model.routers()}
    model.update_router_biases()
    for router in model.routers():
        load = loads[router.layer_idx].float()
        torch.testing.assert_close(router.score_bias, rate * torch.sign(load.mean() - load))
        assert router.score_bias.abs().sum() > 0
        assert router.load_sum.sum().item() == 0


def test_router_bias_stays_fp32_when_the_model_is_cast_to_bf16(make_config):
    model = build(make_config("tiny-moe", router_bias_update_rate=1e-3))
    with torch.no_grad():
        for router in model.routers():
            router.score_bias.fill_(1.001)  # bf16 would round this to 1.0
    model.to(torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    for router in model.routers():
        assert router.weight.dtype == torch.bfloat16
        assert router.score_bias.dtype == torch.float32
        assert (router.score_bias == torch.tensor(1.001)).all()
    out = model(tokens(1, 8))
    assert torch.isfinite(out.logits).all()


# ---- generation -----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe", "tiny-modern"])
def test_greedy_decoding_with_cache_matches_decoding_without(make_config, preset):
    model = build(make_config(preset)).eval()
    prompt = tokens(2, 6)
    kwargs = dict(max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])  # the 5.24 name and the older one
@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-modern"])
def test_incremental_forward_with_cache_matches_the_full_forward(make_config, preset, cache_name):
    # No position_ids passed: the model must take the positions from the cache length itself.
    model = build(make_config(preset)).eval()
    ids = tokens(2, 12)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :8], use_cache=True)
        steps = [out.logits]
        for t in range(8, 12):
            out = model(ids[:, t : t + 1], **{cache_name: getattr(out, CACHE_FIELD)}, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("eval_capacity_factor", [None, 1.0])
def test_batch_of_one_generation_works_for_top1_moe(make_config, eval_capacity_factor):
    # One token per decode step is fewer than min_capacity (DeepSpeed's gate asserts on that).
    model = build(make_config("tiny-moe", num_experts_per_tok=1, eval_capacity_factor=eval_capacity_factor)).eval()
    out = model.generate(tokens(1, 1), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)
    for router in model.routers():
        assert router.stats["drop_fraction"].item() == 0.0


@pytest.mark.parametrize("preset", ["tiny-modern", "tiny-moe", "tiny-dense"])  # RoPE and learned positions
def test_left_padded_batch_generation_matches_each_sequence_alone(make_config, preset):
    model = build(make_config(preset)).eval()
    long, short = tokens(1, 9), tokens(1, 5)
    pad = 0
    batch = torch.cat([long, torch.cat([torch.full((1, 4), pad), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=pad, output_scores=True, return_dict_in_generate=True)
    together = model.generate(batch, attention_mask=mask, **kwargs)
    for row, prompt in enumerate((long, short)):
        alone = model.generate(prompt, **kwargs)
        assert torch.equal(together.sequences[row, 9:], alone.sequences[0, prompt.shape[1] :])
        torch.testing.assert_close(
            torch.stack(together.scores)[:, row], torch.stack(alone.scores)[:, 0], atol=1e-4, rtol=0
        )


# ---- saving and loading ---------------------------------------------------------------------


def test_save_pretrained_round_trip_gives_identical_logits(make_config, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build(make_config("tiny-modern")).eval()  # RoPE, GQA, SwiGLU, balancing bias
    with torch.no_grad():
        for router in model.routers():
            router.score_bias.normal_(0, 1e-3)  # the learned balancing state must survive the trip
    ids = tokens(2, 12)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration.MoEConfig",
        "AutoModelForCausalLM": "modeling.MoEForCausalLM",
    }
    assert config["model_type"] == "moe_dist"
    assert "ep_size" not in config  # parallelism never lands in config.json
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MoEForCausalLM)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    # Non-persistent buffers (RoPE frequencies, the bias-update window) are rebuilt, not left uninitialised.
    for (name, a), b in zip(model.named_buffers(), loaded.buffers()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-6, rtol=0)


def test_trust_remote_code_loads_in_a_process_that_never_imported_moe_dist(make_config, tmp_path):
    model_dir = tmp_path / "model"
    model = build(make_config("tiny-modern", num_shared_experts=1)).eval()
    ids = tokens(1, 10)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    model.save_pretrained(model_dir)
    script = textwrap.dedent(f"""
        import sys
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
        assert "moe_dist" not in sys.modules, "moe_dist was imported"
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(expected["ids"]).logits
        torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=0)
        print("OK", type(model).__module__)
    """)
    result = run_without_moe_dist(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK transformers_modules." in result.stdout


# ---- configuration errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"num_experts_per_tok": 3, "num_local_experts": 2}, ["num_experts_per_tok=3", "[1, num_local_experts=2]"]),
        (
            {"num_attention_heads": 4, "num_key_value_heads": 3},
            ["num_key_value_heads=3", "must divide num_attention_heads=4"],
        ),
        ({"router_aux_loss_coef": -0.1}, ["router_aux_loss_coef=-0.1", ">= 0"]),
        ({"router_z_loss_coef": -1.0}, ["router_z_loss_coef=-1.0", ">= 0"]),
        ({"capacity_factor": 0.0}, ["capacity_factor=0.0", "> 0", "None"]),
        ({"num_local_experts": 1}, ["num_local_experts=1", ">= 2"]),
    ],
)
def test_bad_config_fails_naming_field_value_and_valid_range(overrides, words):
    with pytest.raises(ValueError) as err:
        MoEConfig.from_preset("tiny-moe", **overrides)
    for word in words:
        assert word in str(err.value)


def test_num_kv_heads_alias_is_validated_like_the_field():
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        MoEConfig.from_preset("tiny-modern", num_kv_heads=3)
    assert MoEConfig.from_preset("tiny-moe", num_experts=4).num_local_experts == 4


def test_unknown_preset_lists_the_valid_presets():
    with pytest.raises(ValueError) as err:
        MoEConfig.from_preset("tiny-moee")
    assert "'tiny-moee'" in str(err.value)
    assert all(name in str(err.value) for name in PRESETS)


def test_unknown_override_field_is_rejected_by_name():
    with pytest.raises(ValueError, match="hiden_size"):
        MoEConfig.from_preset("tiny-moe", hiden_size=64)


def test_expert_count_must_divide_by_the_expert_parallel_size():
    validate_expert_parallel(num_experts=8, ep_size=4, world_size=8)
    with pytest.raises(ExpertParallelError) as err:
        validate_expert_parallel(num_experts=6, ep_size=4, world_size=8)
    assert "ep_size=4" in str(err.value) and "num_experts=6" in str(err.value)
    assert "[1, 2, 3, 6]" in str(err.value)
    with pytest.raises(ExpertParallelError, match=r"world size 6.*\[1, 2, 3, 6\]"):
        validate_expert_parallel(num_experts=8, ep_size=4, world_size=6)
