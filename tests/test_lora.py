"""LoRA's model core (moe_dist/model/lora.py): the adapted model is base + scale * B @ A on every path.

One process, CPU: the loop and grouped expert paths, GPT-2 and SwiGLU blocks, shared experts and a dense
layer; frozen base weights; merging; the ETP cut of the adapters; bad configurations.
"""

import copy
import json

import pytest
import torch
from launcher import ROOT, check, deepspeed, leftover_shm

from moe_dist import MoEForCausalLM
from moe_dist.checkpoint.formats import slice_dim
from moe_dist.model.lora import (
    FFN_PROJECTIONS,
    TARGETS,
    LoRAConfig,
    LoRALinear,
    adapter_parameters,
    apply_lora,
    merge_lora,
)
from moe_dist.model.moe import FeedForward, LocalExperts
from moe_dist.parallel.expert_tensor_parallel import slice_expert
from moe_dist.parallel.optim import param_groups

RANK = 3  # not a multiple of 8: the grouped path pads it


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture(params=["tiny-moe", "tiny-modern"], ids=["gpt2", "swiglu"])
def base_model(request, make_config) -> MoEForCausalLM:
    """A dense first layer, then an MoE layer with top-2 routed experts and a shared expert, dropless."""
    config = make_config(
        request.param, num_experts_per_tok=2, num_shared_experts=1, skip_first_moe=1, capacity_factor=None
    )
    return MoEForCausalLM(config).eval()


def lora_model(base: MoEForCausalLM, targets=TARGETS) -> MoEForCausalLM:
    """A copy of `base` with adapters whose B is random (at init B = 0 would hide every mistake)."""
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=RANK, alpha=6.0, targets=targets))
    with torch.no_grad():
        for name, param in adapter_parameters(model):
            if name.endswith("lora_B"):
                param.normal_(std=0.2)
    return model


def reference(base: MoEForCausalLM, model: MoEForCausalLM) -> MoEForCausalLM:
    """`base` with every adapted weight replaced by W + scale * B @ A, computed here from the keys."""
    ref = copy.deepcopy(base)
    scale = 6.0 / RANK
    with torch.no_grad():
        for name, a in adapter_parameters(model):
            if name.endswith("lora_A"):
                proj = name.removesuffix(".lora_A")
                ref.get_parameter(f"{proj}.weight").add_(scale * model.get_parameter(f"{proj}.lora_B") @ a)
    return ref


def set_impl(model: MoEForCausalLM, impl: str) -> None:
    for experts in (m for m in model.modules() if isinstance(m, LocalExperts)):
        experts.impl = impl


def logits(model: MoEForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def test_every_target_gets_its_own_adapters_under_stable_keys(base_model):
    model = lora_model(base_model)
    names = {n for n, _ in adapter_parameters(model)}
    E = model.config.num_local_experts
    projs = ("gate_proj", "up_proj", "down_proj") if model.config.hidden_act == "swiglu" else ("up_proj", "down_proj")
    for p in projs:
        for e in range(E):
            assert {f"model.layers.1.mlp.experts.{e}.{p}.lora_A", f"model.layers.1.mlp.experts.{e}.{p}.lora_B"} <= names
        assert f"model.layers.1.mlp.shared_mlp.{p}.lora_A" in names
        assert f"model.layers.0.mlp.{p}.lora_B" in names
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"model.layers.0.self_attn.{p}.lora_A" in names
    assert set(model.state_dict()) - names == set(base_model.state_dict())  # base keys unchanged
    assert len(names) == 2 * (4 * 2 + len(projs) * (E + 2))
    a = [model.get_parameter(f"model.layers.1.mlp.experts.{e}.up_proj.lora_A") for e in range(2)]
    assert a[0].shape == (RANK, model.config.hidden_size) and not torch.equal(a[0], a[1])


def test_one_target_adapts_only_its_projections(base_model):
    names = {n for n, _ in adapter_parameters(lora_model(base_model, targets=("shared_experts",)))}
    assert names and all(".shared_mlp." in n for n in names)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_lora_logits_equal_the_merged_reference(base_model, impl):
    model = lora_model(base_model)
    set_impl(model, impl)
    ref = reference(base_model, model)
    torch.testing.assert_close(logits(model, IDS), logits(ref, IDS), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(model, IDS), logits(base_model, IDS), atol=1e-3)  # the adapters count


def test_the_expert_paths_agree_on_adapter_gradients(base_model):
    model = lora_model(base_model).train()
    grads = []
    for impl in ("loop", "grouped"):
        set_impl(model, impl)
        model.zero_grad(set_to_none=True)
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in adapter_parameters(model)})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_only_adapters_train_and_a_step_leaves_the_base_bitwise_unchanged(base_model):
    model = lora_model(base_model).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-2)
    model(input_ids=IDS, labels=IDS).loss.backward()
    for name, param in model.named_parameters():
        is_adapter = name.endswith((".lora_A", ".lora_B"))
        assert param.requires_grad == is_adapter, name
        assert (param.grad is not None) == is_adapter, name
    optimizer.step()
    for name, param in model.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name
    assert all(p.requires_grad for group in optimizer.param_groups for p in group["params"])


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_merge_gives_the_same_logits_and_plain_linears(base_model, impl):
    model = lora_model(base_model)
    set_impl(model, impl)
    want = logits(model, IDS)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(base_model.state_dict())
    torch.testing.assert_close(logits(model, IDS), want, rtol=0, atol=1e-6)


def adapted_expert(activation: str, bias: bool) -> FeedForward:
    """One expert as `apply_lora` leaves it: frozen base, an adapter on every projection, B random."""
    expert = FeedForward(32, 48, activation, bias).requires_grad_(False)
    for name in FFN_PROJECTIONS:
        if getattr(expert, name) is not None:
            setattr(expert, name, LoRALinear(getattr(expert, name), RANK, 4.0, 0.0))
            torch.nn.init.normal_(getattr(expert, name).lora_B, std=0.2)
    return expert


@pytest.mark.parametrize("activation, bias", [("gelu", True), ("swiglu", False)])
def test_eps_capacity_buffer_path_and_shard_carry_the_adapters(activation, bias):
    """Under EP the experts run as one batched matmul per projection on a [E, C, D] buffer (`forward_buffer`),
    inside DeepSpeed's expert container, which must tag the adapters as expert parameters too."""
    from moe_dist.parallel.expert_parallel import _expert_shard_class

    local = LocalExperts(adapted_expert(activation, bias) for _ in range(3))
    shard = _expert_shard_class()(local, "ep_size_2")
    x_ECD = torch.randn(3, 5, 32)
    want = torch.stack([expert(x_ECD[e]) for e, expert in enumerate(local)])
    torch.testing.assert_close(local.forward_buffer(x_ECD), want, rtol=0, atol=1e-5)
    adapters = [(n, p) for n, p in shard.named_parameters() if n.endswith((".lora_A", ".lora_B"))]
    assert len(adapters) == 3 * 2 * (3 if activation == "swiglu" else 2)
    assert all(p.allreduce is False and p.group_name == "ep_size_2" for _, p in adapters)


@pytest.mark.parametrize("activation, bias", [("gelu", True), ("swiglu", False)])
def test_etp_slices_of_an_adapted_expert_sum_to_the_whole_expert(activation, bias):
    """As ETP runs it: gate/up by output columns (B cut by rows, A whole), down by input rows (A cut by columns,
    B whole), the partial outputs summed. A cut factor's gradients join to the whole one's; a whole factor's
    are partial on each slice and sum to the whole one's (what ETP must add up over its group)."""
    expert = adapted_expert(activation, bias)
    x, g = torch.randn(10, 32), torch.randn(10, 32)
    y = expert(x)
    (y * g).sum().backward()
    slices = [slice_expert(expert, t, 2) for t in range(2)]
    total = sum(s(x) for s in slices)
    (total * g).sum().backward()
    torch.testing.assert_close(total, y, rtol=0, atol=1e-5)
    for name, param in expert.named_parameters():
        dim = slice_dim(name)
        held = [s.get_parameter(name) for s in slices] if name != "down_proj.bias" else [slices[0].down_proj.bias]
        assert all(p.requires_grad == param.requires_grad for p in held), name
        if not param.requires_grad:
            assert all(p.grad is None for p in held), name
        elif dim is None:
            assert all(p.shape == param.shape for p in held), name
            torch.testing.assert_close(sum(p.grad for p in held), param.grad, rtol=0, atol=1e-5, msg=name)
        else:
            torch.testing.assert_close(torch.cat([p.grad for p in held], dim=dim), param.grad, msg=name)
    for name in ("up_proj.lora_B", "down_proj.lora_A"):
        assert slices[0].get_parameter(name).numel() * 2 == expert.get_parameter(name).numel()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rank": 0, "alpha": 1.0}, "lora_rank=0"),
        ({"rank": -2, "alpha": 1.0}, "lora_rank=-2"),
        ({"rank": 4, "alpha": 1.0, "targets": ("experts", "router")}, "lora_targets='experts,router'"),
        ({"rank": 4, "alpha": 1.0, "targets": ()}, "lora_targets=''"),
        ({"rank": 4, "alpha": 0.0}, "lora_alpha=0.0"),
        ({"rank": 4, "alpha": 1.0, "dropout": 1.0}, "lora_dropout=1.0"),
    ],
)
def test_bad_configurations_are_refused_in_one_line(kwargs, field):
    with pytest.raises(ValueError) as info:
        LoRAConfig(**kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(field) and "valid" in message
    if "targets" in kwargs:
        assert "attention, experts, shared_experts, mlp" in message


def test_adapting_twice_is_refused(base_model):
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(lora_model(base_model), LoRAConfig(rank=2, alpha=2.0))


@pytest.mark.multirank
@pytest.mark.parametrize("ep, etp", [(2, 1), (1, 2)], ids=["ep2", "etp2"])
def test_sharded_lora_gives_the_one_process_loss_and_adapter_gradients(tmp_path, ep, etp):
    """Through the deepspeed launcher on 2 CPU ranks (tests/scripts/lora_equivalence.py). Under ETP the whole
    factors' gradients are summed over the group (`_sum_whole_adapter_grads`); without that sum they are off
    by about 1e-2."""
    out = tmp_path / "result.json"
    proc = check(deepspeed(ROOT / "tests" / "scripts" / "lora_equivalence.py", [str(out), str(ep), str(etp)]))
    assert leftover_shm(proc) == []
    results = json.loads(out.read_text())
    assert set(results) == {f"{p}/{r}" for p in ("gpt2", "modern") for r in ("top2-dropless", "top2-capacity1.0")}
    for case, result in results.items():
        assert result["adapters_checked"] >= 96 and result["base_with_grad"] == 0, case
        assert result["loss_diff"] <= 1e-5 and result["max_grad_diff"] <= 1e-5, case
