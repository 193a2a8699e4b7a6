"""Behaviour of the router math (moe_dist.model.routing) and the MoE block (moe_dist.model.moe), without a model."""

import copy
import math

import pytest
import torch

from moe_dist import MoEConfig
from moe_dist.model.moe import MoEBlock
from moe_dist.model.routing import (
    Router,
    assign_positions,
    aux_free_bias_update,
    expert_capacity,
    load_balancing_loss,
    router_z_loss,
    routing_entropy,
)

D = 16  # model width of the block-level tests


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def config(**overrides) -> MoEConfig:
    base = dict(
        vocab_size=32,
        hidden_size=D,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        capacity_factor=None,
        min_capacity=1,
        router_aux_loss_coef=0.0,
    )
    return MoEConfig(**{**base, **overrides})


def make_block(**overrides) -> MoEBlock:
    block = MoEBlock(config(**overrides), layer_idx=0)
    torch.nn.init.normal_(block.router.weight)  # outside a model nothing initialises the router
    return block


def force_expert_zero(router: Router) -> None:
    """Make every token select expert 0 through the selection bias (logits stay zero: uniform gates)."""
    with torch.no_grad():
        router.weight.zero_()
        router.score_bias[0] = 1.0


# ---- pure functions -------------------------------------------------------------------------


def test_load_balancing_loss_is_one_for_uniform_routing_and_above_one_when_collapsed():
    T, E = 16, 4
    uniform = load_balancing_loss(
        probs_TE=torch.full((T, E), 1 / E), expert_idx_TK=torch.arange(T).remainder(E)[:, None], num_experts=E
    )
    assert uniform.item() == pytest.approx(1.0)
    collapsed_probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(T, 1)
    collapsed = load_balancing_loss(
        probs_TE=collapsed_probs, expert_idx_TK=torch.zeros(T, 1, dtype=torch.long), num_experts=E
    )
    assert collapsed.item() == pytest.approx(E * 0.97)
    assert collapsed.item() > 1.5


def test_z_loss_is_nonnegative_and_its_gradient_reaches_the_logits():
    logits = torch.randn(8, 4, requires_grad=True)
    z = router_z_loss(logits_TE=logits)
    assert z.item() >= 0
    assert z.item() == pytest.approx(torch.logsumexp(logits, -1).square().mean().item())
    z.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # Even logits whose log-partition is ~0 give a loss >= 0.
    assert router_z_loss(logits_TE=torch.full((3, 4), -math.log(4))).item() == pytest.approx(0.0, abs=1e-6)


def test_routing_entropy_is_log_num_experts_for_uniform_and_zero_for_one_hot():
    E = 8
    assert routing_entropy(torch.full((5, E), 1 / E)).item() == pytest.approx(math.log(E), rel=1e-6)
    assert routing_entropy(torch.eye(E)).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "T, E, K, factor, min_cap, expected",
    [
        (64, 8, 1, 1.0, 4, 8),  # fair share T*K/E
        (64, 8, 2, 1.25, 4, 20),  # capacity_factor * T*K/E
        (10, 4, 1, 1.0, 1, 3),  # rounded up
        (8, 8, 1, 1.0, 4, 4),  # raised to min_capacity
        (2, 8, 1, 1.0, 4, 2),  # but never above T: an expert sees a token at most once
        (16, 4, 2, 4.0, 4, 16),  # large factor capped at T
    ],
)
def test_expert_capacity_is_factor_times_fair_share_within_min_capacity_and_tokens(T, E, K, factor, min_cap, expected):
    assert (
        expert_capacity(num_tokens=T, num_experts=E, top_k=K, capacity_factor=factor, min_capacity=min_cap) == expected
    )


def test_assign_positions_fills_every_first_choice_before_any_second_choice():
    # token:         0       1       2
    idx_TK = torch.tensor([[0, 1], [1, 0], [0, 1]])
    # expert 0 sees first choices of tokens 0 and 2 (slots 0, 1), then token 1's second choice (slot 2);
    # expert 1 sees token 1's first choice (slot 0), then second choices of tokens 0, 2 (slots 1, 2).
    assert assign_positions(idx_TK, num_experts=2).tolist() == [[0, 1], [0, 2], [1, 2]]


def test_aux_free_bias_update_lowers_overloaded_and_raises_underloaded_experts():
    bias = torch.zeros(4)
    new = aux_free_bias_update(bias, torch.tensor([10, 2, 2, 2]), rate=0.1)
    assert new.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])
    assert aux_free_bias_update(bias, torch.tensor([4, 4, 4, 4]), rate=0.1).tolist() == [0.0] * 4


# ---- sparse activation ----------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
def test_each_token_output_depends_on_exactly_its_top_k_experts(top_k):
    block = make_block(num_experts_per_tok=top_k).train()
    x = torch.randn(1, 6, D)
    with torch.no_grad():
        base = block(x)[0][0]
        selected_TK = block.router(x[0]).expert_idx_TK
        for e in range(block.router.num_experts):
            perturbed = copy.deepcopy(block)
            for p in perturbed.experts[e].parameters():
                p.add_(torch.randn_like(p))
            changed_T = (perturbed(x)[0][0] - base).abs().amax(dim=-1) > 1e-6
            assert changed_T.tolist() == (selected_TK == e).any(dim=1).tolist(), f"expert {e}"
    assert all(len(set(row)) == top_k for row in selected_TK.tolist())  # k distinct experts per token


def test_gradient_reaches_only_selected_experts_and_the_router_through_raw_gates():
    # Top-1 with raw (unnormalised) gate weights and no router losses: the router learns
    # only through the gate value that scales its chosen expert.
    block = make_block(num_local_experts=8, norm_topk_prob=False, router_z_loss_coef=0.0).train()
    x = torch.randn(1, 3, D)  # 3 tokens cannot reach all 8 experts
    y, router_loss = block(x)
    assert router_loss.item() == 0.0
    y.square().sum().backward()
    selected = set(block.router.stats["selected_per_expert"].nonzero().flatten().tolist())
    assert 1 <= len(selected) <= 3
    for e, expert in enumerate(block.experts):
        grad = torch.cat([p.grad.flatten() for p in expert.parameters()])  # every expert gets a grad tensor
        assert (grad.abs().sum() > 0) == (e in selected), f"expert {e}"
    assert block.router.weight.grad.abs().sum() > 0


# ---- capacity -------------------------------------------------------------------------------


def test_capacity_drops_overflow_tokens_to_exactly_zero_output():
    T, E = 16, 4
    block = make_block(num_local_experts=E, capacity_factor=1.0).train()
    with torch.no_grad():  # every token prefers expert 0 by a wide margin
        block.router.weight.zero_()
        block.router.weight[0] = 1.0
    x = torch.rand(1, T, D) + 0.5
    y = block(x)[0][0]
    capacity = T // E  # capacity_factor 1.0 = the fair share
    assert block.router.stats["tokens_per_expert"].tolist() == [capacity, 0, 0, 0]
    assert block.router.stats["drop_fraction"].item() == pytest.approx((T - capacity) / T)
    # Token order decides who fits: the first `capacity` tokens are served, the rest get exactly 0.
    assert (y[:capacity].abs().amax(dim=-1) > 0).all()
    assert torch.equal(y[capacity:], torch.zeros_like(y[capacity:]))


def test_dropless_routing_serves_every_token_of_a_collapsed_router():
    T = 16
    block = make_block(capacity_factor=None).train()
    force_expert_zero(block.router)
    y = block(torch.randn(1, T, D))[0][0]
    assert block.router.stats["drop_fraction"].item() == 0.0
    assert block.router.stats["tokens_per_expert"].tolist() == [T, 0, 0, 0]
    assert (y.abs().amax(dim=-1) > 0).all()


def test_capacity_drops_second_choices_before_first_choices():
    # Tokens 0-3 choose (0, 1), tokens 4-7 choose (1, 0): each expert has 4 first choices and
    # 4 second choices and room for 4 (T*K/E = 8*2/4). Route-major priority keeps exactly the
    # first choices, although the second choices of tokens 0-3 come earlier in token order.
    router = make_block(num_local_experts=4, num_experts_per_tok=2, capacity_factor=1.0).router.train()
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, :2] = torch.tensor([10.0, 5.0])
        router.weight[1, :2] = torch.tensor([5.0, 10.0])
    x = torch.zeros(8, D)
    x[:4, 0] = 1.0
    x[4:, 1] = 1.0
    routing = router(x)
    assert routing.capacity == 4
    assert routing.expert_idx_TK.tolist() == [[0, 1]] * 4 + [[1, 0]] * 4
    assert routing.keep_TK[:, 0].all() and not routing.keep_TK[:, 1].any()
    assert (routing.weight_TK[:, 1] == 0).all() and (routing.weight_TK[:, 0] > 0).all()
    assert router.stats["drop_fraction"].item() == pytest.approx(0.5)


# ---- aux-loss-free balancing ----------------------------------------------------------------


def test_aux_loss_free_bias_moves_a_skewed_router_toward_balance():
    router = make_block(num_local_experts=4, router_bias_update_rate=0.02).router.train()
    x = torch.randn(256, D) + 0.3
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        router.weight[0] += 0.4  # expert 0 is over-loaded
    imbalance = []
    for step in range(30):
        router(x)
        router.accumulate_load()
        load = router.stats["selected_per_expert"]
        imbalance.append((load.max() / load.float().mean()).item())
        before = router.score_bias.clone()
        router.update_bias()
        if step == 0:
            assert load.argmax().item() == 0
            assert router.score_bias[0] < before[0]
            assert (router.score_bias[1:] > before[1:]).all()
        assert router.load_sum.sum().item() == 0  # the window restarts after each update
    assert imbalance[0] > 2.0
    assert imbalance[-1] < 1.5
    assert min(imbalance[-5:]) < imbalance[0] / 2


def test_selection_bias_changes_which_experts_are_chosen_but_not_their_gate_weights():
    router = make_block(num_local_experts=4).router.eval()
    x = torch.randn(10, D)
    probs_TE = (x @ router.weight.t()).softmax(-1)
    unbiased = router(x)
    with torch.no_grad():
        router.score_bias[3] = 2.0  # larger than any probability gap
    biased = router(x)
    assert (biased.expert_idx_TK[:, 0] == 3).all()
    assert not (unbiased.expert_idx_TK[:, 0] == 3).all()
    torch.testing.assert_close(biased.weight_TK[:, 0], probs_TE[:, 3])  # the unbiased probability


# ---- jitter and the random router -----------------------------------------------------------


def test_router_jitter_perturbs_routing_input_only_in_training():
    router = make_block(router_jitter_noise=0.5).router
    x = torch.randn(32, D)
    clean = (x @ router.weight.t()).softmax(-1).gather(1, router.eval()(x).expert_idx_TK)
    router.eval()
    first, second = router(x), router(x)
    assert torch.equal(first.weight_TK, second.weight_TK)
    torch.testing.assert_close(first.weight_TK, clean)
    router.train()
    noisy_a, noisy_b = router(x), router(x)
    assert not torch.allclose(noisy_a.weight_TK, noisy_b.weight_TK)
    assert not torch.allclose(noisy_a.weight_TK, first.weight_TK)


def test_random_router_is_frozen_deterministic_and_weights_its_k_experts_equally():
    block = make_block(
        router_type="random", num_experts_per_tok=2, router_aux_loss_coef=0.01, router_z_loss_coef=0.01
    ).train()
    router = block.router
    assert not router.weight.requires_grad
    x = torch.randn(12, D)
    a, b = router(x), router(x)
    assert torch.equal(a.expert_idx_TK, b.expert_idx_TK)
    assert torch.equal(a.weight_TK, torch.full((12, 2), 0.5))
    assert a.loss.item() == 0.0  # nothing to balance through: the router is not trained


def test_router_stays_fp32_under_bf16_autocast(monkeypatch):
    # The accelerate engine and bench_train run the model under bf16 autocast, which would
    # recast the router's F.linear to bf16 despite its .float() calls.
    import moe_dist.model.routing as routing

    seen_logits, z_loss = [], routing.router_z_loss

    def recording_z_loss(*, logits_TE, real_T=None):
        seen_logits.append(logits_TE)
        return z_loss(logits_TE=logits_TE, real_T=real_T)

    monkeypatch.setattr(routing, "router_z_loss", recording_z_loss)
    router = make_block(
        num_experts_per_tok=2, capacity_factor=1.0, router_aux_loss_coef=0.01, router_z_loss_coef=0.01
    ).router.eval()
    x = torch.randn(64, D).bfloat16()  # the block's input under autocast is bf16
    reference = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(x.float(), router.weight).dtype == torch.bfloat16  # autocast is on
        routed = router(x)
    ref_logits, logits = seen_logits
    assert logits.dtype == routed.weight_TK.dtype == routed.loss.dtype == torch.float32
    assert router.stats["aux_loss"].dtype == router.stats["z_loss"].dtype == torch.float32
    assert torch.equal(routed.expert_idx_TK, reference.expert_idx_TK)
    assert torch.equal(routed.keep_TK, reference.keep_TK)
    assert torch.equal(logits, ref_logits)  # the same fp32 math as without autocast, bit for bit
    assert torch.equal(routed.weight_TK, reference.weight_TK)
    assert torch.equal(routed.loss, reference.loss)
