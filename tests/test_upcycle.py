"""Sparse upcycling: a dense model's FFNs become E experts, and the step-0 model is what the flags say.

With renormalised top-k gates the upcycled model computes the dense function (fp32, 1e-5) for k = 1 and 2;
noise and Drop-Upcycling's re-initialisation change exactly what they are asked to; bad input is one line
and exit 2 with nothing written; a resume with other upcycling flags is refused.
"""

import json

import pytest
import torch
from launcher import ACCEL_ARGS, DATA_ARGS, TRAIN, check, python

from moe_dist import MoEConfig, MoEForCausalLM
from moe_dist.convert.stock_import import read_init_config, weight_source
from moe_dist.convert.upcycle import Upcycling, moe_fields, step0_description
from moe_dist.train.cli import main as train_main
from moe_dist.train.metrics import expert_similarity, pairwise_cosine

SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module", params=["tiny-dense", "tiny-modern"])
def dense(request, tmp_path_factory):
    """An export of a seeded dense model: GPT-2 block with biases, or the modern block (SwiGLU, no bias)."""
    torch.manual_seed(0)
    extra = {"num_local_experts": 0, "num_key_value_heads": 2} if request.param == "tiny-modern" else {}
    model = MoEForCausalLM(MoEConfig.from_preset(request.param, **SHAPE, **extra))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # biases and norms away from their init too
    folder = tmp_path_factory.mktemp("dense") / "hf"
    model.save_pretrained(folder)
    return folder


def upcycled(folder, upcycling: Upcycling, num_experts_per_tok: int = 1, **overrides) -> MoEForCausalLM:
    """The upcycled model as the trainer builds it; `num_experts_per_tok` counts copies, as --top_k does."""
    init = read_init_config(folder)
    fields = moe_fields(init.fields, upcycling, num_experts_per_tok)
    config = MoEConfig(
        **{
            k: v
            for k, v in {**fields, **overrides}.items()
            if k in MoEConfig.__dataclass_fields__
            and k not in ("architectures", "transformers_version", "dtype", "_name_or_path")
        }
    )
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    model.load_weights(weight_source(init, config, upcycling))
    return model.eval()


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("top_k", [1, 2])
def test_renormalised_top_k_keeps_the_dense_function(dense, top_k):
    reference = logits(MoEForCausalLM.from_pretrained(dense).eval())
    model = upcycled(dense, Upcycling(experts=8), num_experts_per_tok=top_k, norm_topk_prob=True, capacity_factor=None)
    assert model.config.num_local_experts == 8 and model.config.expert_bias == model.config.bias
    assert (logits(model) - reference).abs().max() <= 1e-5
    assert "the dense FFN exactly" in step0_description(model.config, Upcycling(experts=8))


@pytest.mark.parametrize("granularity, top_k", [(2, 1), (2, 2), (4, 2)])
def test_fine_grained_slices_keep_the_dense_function(dense, granularity, top_k):
    reference = logits(MoEForCausalLM.from_pretrained(dense).eval())
    upcycling = Upcycling(experts=4, granularity=granularity)
    model = upcycled(dense, upcycling, num_experts_per_tok=top_k, norm_topk_prob=True, capacity_factor=None)
    c = model.config
    assert (c.num_local_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (
        4 * granularity,
        top_k * granularity,
        128 // granularity,
    )
    assert (logits(model) - reference).abs().max() <= 1e-5
    # Slice s of copy e holds the dense channels [s * I, (s + 1) * I); its down-projection is scaled by G.
    dense_up = MoEForCausalLM.from_pretrained(dense).state_dict()["model.layers.0.mlp.up_proj.weight"]
    weights = model.state_dict()
    width = 128 // granularity
    for expert in range(4 * granularity):
        s = expert % granularity
        assert torch.equal(
            weights[f"model.layers.0.mlp.experts.{expert}.up_proj.weight"], dense_up[s * width : (s + 1) * width]
        )
    assert (
        upcycling.describe() == f"4 copies split into {granularity} ({4 * granularity} experts of "
        f"1/{granularity} the dense width)"
    )


def test_fine_grained_unnormalised_and_shared_layers_compute_what_the_coarse_ones_do(dense):
    """A copy's slices share its router row, so each gets 1/G of its gate: the slices of the chosen copies
    sum to the coarse layer's output even where the gates are not renormalised; 2 shared slices = 1 dense copy."""
    for fields in (
        dict(norm_topk_prob=False),
        dict(norm_topk_prob=True, num_shared_experts=2),
        dict(norm_topk_prob=False, router_type="random"),
    ):
        coarse_shared = {**fields, "num_shared_experts": fields.get("num_shared_experts", 0) // 2}
        coarse = upcycled(dense, Upcycling(experts=4), capacity_factor=None, **coarse_shared)
        fine = upcycled(dense, Upcycling(experts=4, granularity=2), capacity_factor=None, **fields)
        assert (logits(fine) - logits(coarse)).abs().max() <= 1e-5, fields
    # Random routing weighs the chosen copies equally, so it too starts as the dense function.
    reference = logits(MoEForCausalLM.from_pretrained(dense).eval())
    assert (logits(fine) - reference).abs().max() <= 1e-5
    assert step0_description(fine.config, Upcycling(experts=4, granularity=2)).startswith("the dense FFN exactly")


def test_unnormalised_top_1_scales_the_ffn_by_its_gate_and_says_so(dense):
    reference = logits(MoEForCausalLM.from_pretrained(dense).eval())
    model = upcycled(dense, Upcycling(experts=8), norm_topk_prob=False, capacity_factor=None)
    assert (logits(model) - reference).abs().max() > 1e-3
    said = step0_description(model.config, Upcycling(experts=8))
    assert "times its gate weight" in said and "--norm_topk_prob true keeps the dense function" in said


def test_noise_and_reinit_change_each_copy_as_asked(dense):
    base = upcycled(dense, Upcycling(experts=4), norm_topk_prob=True, capacity_factor=None)
    noisy = upcycled(dense, Upcycling(experts=4, noise=0.01), norm_topk_prob=True, capacity_factor=None)
    dropped = upcycled(dense, Upcycling(experts=4, reinit=0.25), norm_topk_prob=True, capacity_factor=None)
    key = "model.layers.0.mlp.experts.{}.up_proj.weight"
    plain, states = base.state_dict(), (noisy.state_dict(), dropped.state_dict())
    for e in range(4):
        ratio = states[0][key.format(e)] / plain[key.format(e)] - 1
        assert abs(ratio.std().item() - 0.01) < 0.002  # multiplicative noise of the asked std
        changed_rows = (states[1][key.format(e)] != plain[key.format(e)]).any(dim=1).sum().item()
        assert changed_rows == 128 // 4  # a quarter of the intermediate channels, drawn again
    assert not torch.equal(states[0][key.format(0)], states[0][key.format(1)])  # each copy its own draw
    assert (logits(noisy) - logits(base)).abs().max() > 0


def test_identical_copies_have_cosine_one_and_the_metric_sees_them_drift(dense):
    model = upcycled(dense, Upcycling(experts=4), norm_topk_prob=True, capacity_factor=None)
    width = model.config.moe_intermediate_size
    same = expert_similarity(model.named_parameters(), lambda obj: [obj], width=width)
    assert same["routing/layer0/expert_cos_mean"] == pytest.approx(1.0, abs=1e-9)
    noisy = upcycled(dense, Upcycling(experts=4, reinit=0.5), norm_topk_prob=True, capacity_factor=None)
    drifted = expert_similarity(noisy.named_parameters(), lambda obj: [obj], width=width)
    assert drifted["routing/layer0/expert_cos_mean"] < 0.9
    mean, top = pairwise_cosine(torch.eye(3))
    assert mean == 0 and top == 0


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--upcycle_experts", "4"], "--upcycle_experts needs --init_from DENSE"),
        (
            ["--upcycle_noise", "0.1"],
            "--upcycle_noise, --upcycle_reinit and --upcycle_granularity need --upcycle_experts",
        ),
        (["--upcycle_granularity", "2"], "--upcycle_granularity need --upcycle_experts"),
        (
            ["@dense", "--upcycle_experts", "4", "--upcycle_granularity", "3"],
            "--upcycle_granularity=3 is invalid: must be >= 1 and divide the dense FFN width (intermediate_size=128)",
        ),
        (["@dense", "--upcycle_experts", "4", "--upcycle_granularity", "0"], "--upcycle_granularity=0 is invalid"),
        (
            ["@dense", "--upcycle_experts", "4", "--upcycle_granularity", "2", "--num_shared_experts", "1"],
            "--num_shared_experts=1 is invalid with --upcycle_granularity 2: must be a multiple of 2",
        ),
        (["@dense", "--upcycle_experts", "1"], "--upcycle_experts=1 is invalid: must be >= 2"),
        (["@dense", "--upcycle_experts", "4", "--top_k", "5"], "--top_k=5 is invalid with --upcycle_experts 4"),
        (["@dense", "--upcycle_experts", "4", "--upcycle_noise", "-1"], "--upcycle_noise=-1.0 is invalid"),
        (["@dense", "--upcycle_experts", "4", "--upcycle_reinit", "1"], "--upcycle_reinit=1.0 is invalid"),
        (["@dense", "--upcycle_experts", "4", "--num_experts", "4"], "--num_experts and --upcycle_experts"),
        (["@moe", "--upcycle_experts", "4"], "already has experts (num_local_experts=8)"),
    ],
)
def test_bad_upcycling_input_is_one_line_and_writes_nothing(dense, tmp_path, capsys, args, expected):
    moe = tmp_path / "moe"
    MoEForCausalLM(MoEConfig.from_preset("tiny-moe", **SHAPE)).save_pretrained(moe)
    capsys.readouterr()  # save_pretrained's progress bar
    args = [
        a
        for arg in args
        for a in ({"@dense": ["--init_from", str(dense)], "@moe": ["--init_from", str(moe)]}.get(arg, [arg]))
    ]
    assert train_main([*DATA_ARGS, *args, "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_resume_with_other_upcycling_flags_is_refused(dense, tmp_path, capsys):
    run = tmp_path / "run"
    assert ACCEL_ARGS[:2] == ["--model", "tiny-moe"]  # left out: --init_from names the model
    base = [
        *ACCEL_ARGS[2:],
        "--init_from",
        str(dense),
        "--upcycle_experts",
        "4",
        "--max_steps",
        "2",
        "--eval_every",
        "2",
        "--seq_len",
        "32",
        "--output_dir",
        str(run),
    ]
    check(python(TRAIN, base))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["upcycling"]["experts"] == 4 and summary["upcycled_from"]["path"] == str(dense.resolve())
    assert train_main([*base, "--upcycle_noise", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run upcycled with" in err[0] and "same --upcycle_* flags" in err[0], err
    assert train_main([*base, "--upcycle_granularity", "2"]) == 2
    assert "holds a run upcycled with" in capsys.readouterr().err

    # A run.json written before fine-grained upcycling existed has no "granularity": it was coarse, and resumes.
    record = json.loads((run / "run.json").read_text())
    del record["upcycle"]["granularity"]
    (run / "run.json").write_text(json.dumps(record))
    resumed = check(python(TRAIN, [*base, "--max_steps", "3"]))
    assert "resumed from " in resumed.stderr and json.loads((run / "summary.json").read_text())["steps"] == 3
