"""The grouped expert GEMM against the per-expert loop, and the MoE block without host syncs."""

import pytest
import torch

from moe_dist import MoEForCausalLM
from moe_dist.model.moe import FeedForward, GroupedMatmul, LocalExperts, experts_impl, grouped_refusal
from moe_dist.model.routing import Routing, assign_positions, expert_capacity

T, D, FF = 48, 16, 32  # tokens, model width, expert width: multiples of 16 bytes in fp32 and bf16


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def experts(E: int, activation: str, bias: bool) -> LocalExperts:
    layer = LocalExperts(FeedForward(D, FF, activation, bias) for _ in range(E))
    for p in layer.parameters():  # nn.Linear's init leaves biases small; make every term count
        torch.nn.init.normal_(p, std=0.3)
    return layer


def routing(expert_idx_TK: torch.Tensor, E: int, capacity_factor: float | None) -> Routing:
    """A `Routing` as `Router._route` builds it, for hand-picked experts and random gate weights."""
    T, K = expert_idx_TK.shape
    capacity = (
        None
        if capacity_factor is None
        else expert_capacity(num_tokens=T, num_experts=E, top_k=K, capacity_factor=capacity_factor, min_capacity=1)
    )
    position_TK = assign_positions(expert_idx_TK, E)
    keep_TK = position_TK < capacity if capacity is not None else torch.ones_like(expert_idx_TK, dtype=torch.bool)
    weight_TK = torch.rand(T, K) * keep_TK
    return Routing(expert_idx_TK, weight_TK, position_TK, keep_TK, capacity, torch.zeros(()), E)


def random_choice(E: int, K: int) -> torch.Tensor:
    return torch.rand(T, E).topk(K, dim=-1).indices


def forward_and_grads(layer: LocalExperts, impl: str, x_TD: torch.Tensor, r: Routing, g_TD: torch.Tensor):
    layer.impl = impl
    layer.zero_grad(set_to_none=True)
    x_TD = x_TD.detach().requires_grad_()
    y_TD = layer(x_TD, r)
    (y_TD * g_TD).sum().backward()
    return y_TD.detach(), x_TD.grad, {name: p.grad for name, p in layer.named_parameters()}


def assert_grouped_equals_loop(layer: LocalExperts, r: Routing) -> None:
    x_TD, g_TD = torch.randn(T, D), torch.randn(T, D)
    loop, grouped = (forward_and_grads(layer, impl, x_TD, r, g_TD) for impl in ("loop", "grouped"))
    torch.testing.assert_close(grouped[0], loop[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped[1], loop[1], rtol=1e-5, atol=1e-5)
    assert grouped[2].keys() == loop[2].keys() and None not in grouped[2].values()
    for name in loop[2]:
        torch.testing.assert_close(grouped[2][name], loop[2][name], rtol=1e-5, atol=1e-5, msg=name)


def test_grouped_mm_can_run_fp32_and_bf16_on_cpu_but_the_cpu_takes_the_loop():
    assert grouped_refusal("cpu", torch.float32, D, FF) is None
    assert grouped_refusal("cpu", torch.bfloat16, D, FF) is None
    assert "float64" in grouped_refusal("cpu", torch.float64, D, FF)
    assert "16 bytes" in grouped_refusal("cpu", torch.float32, 18, FF)  # 72-byte rows: grouped_mm refuses them
    assert "16 bytes" in grouped_refusal("cpu", torch.bfloat16, 12, FF)  # 24 bytes
    assert "untested" in grouped_refusal("mps", torch.float32, D, FF)
    # On CPU grouped_mm is a serial loop of matmuls that measured slower (docs/bench): the loop is the default.
    assert experts_impl(torch.device("cpu"), torch.float32, D, FF) == "loop"
    assert experts_impl(torch.device("cpu"), torch.bfloat16, D, FF) == "loop"


def test_torch_without_grouped_mm_is_refused_the_grouped_path(monkeypatch):
    monkeypatch.delattr(torch.nn.functional, "grouped_mm")
    assert "has no grouped_mm" in grouped_refusal("cuda", torch.bfloat16, D, FF)


def test_forcing_the_grouped_path_where_grouped_mm_refuses_says_why():
    E = 4
    layer = experts(E, "gelu", True).double()
    r = routing(random_choice(E, 2), E, 1.0)
    x_TD = torch.randn(T, D, dtype=torch.float64)
    y = layer(x_TD, r)  # impl None: experts_impl picks the loop
    assert y.dtype == torch.float64 and torch.isfinite(y).all()
    layer.impl = "grouped"
    with pytest.raises(ValueError, match="impl='grouped' cannot run here: grouped_mm is not used for torch.float64"):
        layer(x_TD, r)


@pytest.mark.parametrize("activation, bias", [("gelu", True), ("swiglu", False), ("swiglu", True)])
@pytest.mark.parametrize("E, K", [(1, 1), (8, 1), (8, 2), (8, 3), (16, 1), (16, 2), (16, 3)])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_grouped_forward_and_gradients_equal_the_loop(E, K, capacity_factor, activation, bias):
    r = routing(random_choice(E, K), E, capacity_factor)
    if capacity_factor is not None and E > 1:
        assert not r.keep_TK.all()  # the case with dropped routes is exercised
    assert_grouped_equals_loop(experts(E, activation, bias), r)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_grouped_equals_the_loop_when_an_expert_gets_no_tokens(capacity_factor):
    E = 8
    choice = random_choice(E - 1, 2)  # expert 7 is never chosen
    assert not (choice == E - 1).any()
    assert_grouped_equals_loop(experts(E, "gelu", True), routing(choice, E, capacity_factor))


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_grouped_equals_the_loop_when_every_token_goes_to_one_expert(capacity_factor):
    E = 8
    r = routing(torch.full((T, 1), 3), E, capacity_factor)
    assert_grouped_equals_loop(experts(E, "gelu", True), r)


def test_dropped_routes_stay_finite_even_if_their_rows_would_be_nan():
    E = 4
    layer = experts(E, "gelu", True)
    r = routing(torch.full((T, 1), 0), E, 1.0)  # one expert, capacity T/4: most routes dropped
    x_TD = torch.randn(T, D)
    x_TD[~r.keep_TK[:, 0]] = float("nan")  # a dropped token's row must never reach its output
    y, dx, grads = forward_and_grads(layer, "grouped", x_TD, r, torch.randn(T, D))
    kept = r.keep_TK[:, 0]
    assert torch.isfinite(y[kept]).all() and (y[~kept] == 0).all()
    assert torch.isfinite(dx[kept]).all() and all(torch.isfinite(g).all() for g in grads.values())


def test_grouped_matmul_gradients_match_per_group_matmuls():
    offs = torch.tensor([3, 3, 9], dtype=torch.int32)  # expert 1 gets no rows; rows 9.. belong to none
    x = torch.randn(12, 8, requires_grad=True)
    w = torch.randn(3, 4, 8, requires_grad=True)  # [E, out, in], nn.Linear's layout
    y = GroupedMatmul.apply(x, w, offs)[:9]  # rows past offs[-1] are unspecified
    g = torch.randn(9, 4)
    (y * g).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.cat([x2[:3] @ w2[0].t(), x2[3:9] @ w2[2].t()])
    (ref * g).sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad[:9], x2.grad[:9])
    torch.testing.assert_close(w.grad, w2.grad)
    assert (w.grad[1] == 0).all()


def test_grouped_path_runs_in_bf16():
    E = 8
    layer = experts(E, "swiglu", True)
    r = routing(random_choice(E, 2), E, 1.0)
    x_TD = torch.randn(T, D)
    ref = forward_and_grads(layer, "loop", x_TD, r, torch.ones(T, D))[0]
    layer.to(torch.bfloat16)
    y = forward_and_grads(layer, "grouped", x_TD.bfloat16(), r, torch.ones(T, D, dtype=torch.bfloat16))[0]
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)


def test_grouped_path_under_autocast_runs_in_its_dtype_like_the_loop():
    E = 8
    layer = experts(E, "gelu", True)
    r = routing(random_choice(E, 1), E, 1.0)
    x_TD, g_TD = torch.randn(T, D), torch.randn(T, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loop, grouped = (forward_and_grads(layer, impl, x_TD, r, g_TD) for impl in ("loop", "grouped"))
    torch.testing.assert_close(grouped[0], loop[0], rtol=0.02, atol=0.02)
    for name in loop[2]:
        assert grouped[2][name].dtype == torch.float32  # fp32 parameters, bf16 matmuls
        torch.testing.assert_close(grouped[2][name], loop[2][name], rtol=0.05, atol=0.05, msg=name)


@pytest.mark.parametrize("ep_size", [1, 2])
@pytest.mark.parametrize("activation, bias", [("gelu", True), ("swiglu", False)])
def test_expert_shard_batched_matmul_equals_deepspeeds_expert_loop(ep_size, activation, bias):
    from deepspeed.moe.experts import Experts

    from moe_dist.parallel.expert_parallel import _expert_shard_class

    E_local, C = 4, 5
    shard = _expert_shard_class()(experts(E_local, activation, bias), "ep_size_2")
    x_GECD = torch.randn(ep_size, E_local, C, D)
    g_GECD = torch.randn(ep_size, E_local, C, D)
    results = []
    for forward in (Experts.forward, type(shard).forward):  # DeepSpeed's own loop, then ours
        shard.zero_grad(set_to_none=True)
        x = x_GECD.clone().requires_grad_()
        y = forward(shard, x)
        (y * g_GECD).sum().backward()
        results.append((y.detach(), x.grad, [p.grad for p in shard.parameters()]))
    (y_ds, dx_ds, grads_ds), (y, dx, grads) = results
    assert y.shape == x_GECD.shape
    torch.testing.assert_close(y, y_ds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ds, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ds, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def run_refusing_host_reads(model: MoEForCausalLM, monkeypatch) -> tuple[list[str], torch.Tensor]:
    """Forward and backward of `model` while `Tensor.item/tolist/__int__/__float__` raise: the calls tried, the loss."""
    input_ids = torch.randint(0, 256, (2, 32))
    model(input_ids=input_ids, labels=input_ids)  # warm-up outside the patch: one-time lazy setup
    synced = []

    def refuse(name):
        def sync(self, *args, **kwargs):
            synced.append(name)
            raise RuntimeError(f"host sync: Tensor.{name}")

        return sync

    loss = torch.tensor(float("nan"))
    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__int__", "__float__"):
            patch.setattr(torch.Tensor, name, refuse(name))
        try:
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
        except RuntimeError as e:
            if "host sync" not in str(e):
                raise
    return synced, loss


@pytest.mark.parametrize("train, capacity_factor", [(True, 1.0), (False, 1.0), (True, None), (False, None)])
def test_tiny_moe_forward_and_backward_make_no_host_sync(make_config, monkeypatch, train, capacity_factor):
    config = make_config("tiny-moe", capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor)
    model = MoEForCausalLM(config).train(train)
    # The grouped path, the default where a grouped kernel exists (CUDA bf16 on sm90). The
    # CPU's default loop reads each layer's expert counts once (next test): a CPU tensor waits on no device.
    for experts in (m for m in model.modules() if isinstance(m, LocalExperts)):
        experts.impl = "grouped"
    synced, loss = run_refusing_host_reads(model, monkeypatch)
    # Asserted after the patch is undone: pytest's own comparisons may read tensors.
    assert synced == []
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if ".experts." in n)


def test_the_expert_loop_reads_its_counts_on_the_host_and_the_patch_catches_it(make_config, monkeypatch):
    model = MoEForCausalLM(make_config("tiny-moe", capacity_factor=None)).train()
    assert all(m.impl is None for m in model.modules() if isinstance(m, LocalExperts))  # CPU default: the loop
    synced, _ = run_refusing_host_reads(model, monkeypatch)
    assert synced == ["tolist"]  # the first MoE layer's split sizes, where the run stops


def test_the_grouped_bias_gradient_under_bf16_is_summed_in_fp32():
    # 500 rows per expert, each with the output gradient 1 + 3/128 (exact in bf16). Their sum, 511.71875,
    # needs fp32: bf16 holds only even numbers there. Summed in bf16 (as the bias gather's backward was,
    # with bf16 atomics on CUDA) it would come out as 512 at best.
    E, tokens = 4, 2000
    layer = experts(E, "gelu", True)
    r = routing(torch.arange(tokens).remainder(E).unsqueeze(1), E, None)
    r.weight_TK.fill_(1.0)  # each route's output gradient is exactly the upstream one
    x_TD, g_TD = torch.randn(tokens, D), torch.full((tokens, D), 1 + 3 / 128)
    _, _, reference = forward_and_grads(layer, "loop", x_TD, r, g_TD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, grads = forward_and_grads(layer, "grouped", x_TD, r, g_TD)
    for e in range(E):
        name = f"{e}.down_proj.bias"
        assert torch.equal(reference[name], torch.full((D,), 511.71875)), name
        assert torch.equal(grads[name], reference[name]), (name, grads[name][:4])
