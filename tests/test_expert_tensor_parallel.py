"""Expert tensor parallelism (issue 14): slices add up to the expert, the layout's groups, and, through the
real `deepspeed` launcher on CPU ranks, ETP=2 on 2 ranks and EP=2 x ETP=2 on 4 ranks against one process."""

import json

import pytest
import torch
from launcher import ROOT, check, deepspeed, leftover_shm

from moe_dist.model.moe import FeedForward
from moe_dist.parallel.expert_parallel import ExpertParallelError
from moe_dist.parallel.expert_tensor_parallel import EtpLayout, slice_expert, validate_expert_tensor_parallel

SCRIPT = ROOT / "tests" / "scripts" / "etp_equivalence.py"
CASES = {"gpt2/top1-dropless", "gpt2/top2-capacity1.0", "modern/top1-dropless", "modern/top2-capacity1.0"}


@pytest.mark.parametrize("activation,bias", [("gelu", True), ("swiglu", False), ("swiglu", True)])
def test_expert_slices_sum_to_the_full_expert(activation, bias):
    torch.manual_seed(0)
    expert = FeedForward(16, 24, activation, bias)
    x = torch.randn(5, 16)
    slices = [slice_expert(expert, t, 3) for t in range(3)]
    assert all(s.up_proj.out_features == 8 for s in slices)
    # The down bias is added once: slice 0 holds it, the others have none.
    assert [s.down_proj.bias is not None for s in slices] == [bias, False, False]
    torch.testing.assert_close(sum(s(x) for s in slices), expert(x), rtol=0, atol=1e-6)


def test_layout_groups_partition_the_world():
    layout = EtpLayout(world_size=8, ep_size=2, etp_size=2)
    assert layout.etp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.all_to_all_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert [layout.position(r) for r in (0, 3, 5)] == [(0, 0, 0), (0, 1, 1), (1, 0, 1)]
    assert layout.describe() == "DP 2 x EP 2 x ETP 2 on 8 rank(s)"


@pytest.mark.parametrize("kwargs,expected", [
    (dict(etp_size=3), r"moe.etp_size=3 does not divide the expert width moe_intermediate_size=512: valid etp_size "
                       r"values are \[1, 2, 4, 8, 16, 32, 64, 128, 256, 512\]"),
    (dict(etp_size=4), r"2 x 4 = 8 does not divide the world size 4: with ep_size=2, valid etp_size values here "
                       r"are \[1, 2\]"),
    (dict(ep_size=3, etp_size=1, world_size=3), r"moe.ep_size=3 does not divide num_experts=8"),
])
def test_bad_layouts_are_refused_with_the_valid_values(kwargs, expected):
    args = dict(num_experts=8, intermediate_size=512, ep_size=2, etp_size=2, world_size=4)
    args.update(kwargs)
    with pytest.raises(ExpertParallelError, match=expected):
        validate_expert_tensor_parallel(**args)


@pytest.fixture(scope="module", params=[(2, 1, 2), (4, 2, 2)], ids=["etp2-2ranks", "ep2xetp2-4ranks"])
def equivalence(request, tmp_path_factory):
    """One launch per layout checks every (block, routing) case; the tests below read its results."""
    ranks, ep, etp = request.param
    out = tmp_path_factory.mktemp("etp") / "result.json"
    proc = check(deepspeed(SCRIPT, [str(out), str(ep), str(etp)], ranks=ranks, timeout=600))
    assert leftover_shm(proc) == []
    return json.loads(out.read_text())


@pytest.mark.multirank
def test_loss_and_every_gradient_equal_the_single_process_run(equivalence):
    assert set(equivalence) == CASES
    for case, result in equivalence.items():
        assert result["params_checked"] >= 79, case  # every parameter, expert slices included
        assert result["loss_diff"] <= 1e-5, case
        assert result["max_grad_diff"] <= 1e-5, case


@pytest.mark.multirank
def test_etp_collective_bytes_equal_the_analytic_counts(equivalence):
    for case, result in equivalence.items():
        assert len(result["bytes_measured"]) == 4, case  # one entry per MoE layer
        assert all(layer == result["bytes_analytic"] for layer in result["bytes_measured"]), case
