"""Exports to stock transformers classes: GPT-2, Mixtral and Ernie 4.5 MoE load the folder with no
moe_dist and no trust_remote_code, and reproduce our model; what a class cannot represent is refused up front.

Seeded tiny models are saved in the accelerate checkpoint layout (`formats.ACCELERATE_WEIGHTS`) inside a run
folder with its tokenizer, which is what the exporter reads. tests/test_export_standard_ep.py exports a real
EP=2 DeepSpeed run.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from launcher import FIXTURES, run_without_moe_dist
from safetensors.torch import save_file

from moe_dist import MoEConfig, MoEForCausalLM
from moe_dist.checkpoint.formats import ACCELERATE_WEIGHTS
from moe_dist.convert.standard import fitting_formats
from moe_dist.export import build_model
from moe_dist.export.cli import main
from moe_dist.train.data import SEPARATOR, build_tokenizer

SHAPE = dict(
    hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64
)
MODERN_SHAPE = dict(SHAPE, num_key_value_heads=2, moe_intermediate_size=64)
CLASS = {"gpt2": "GPT2LMHeadModel", "mixtral": "MixtralForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    stories = [s.strip() for s in (FIXTURES / "stories.txt").read_text().split(SEPARATOR) if s.strip()]
    return build_tokenizer("train:512", stories, tmp_path_factory.mktemp("tok") / "tokenizer")


def make_run(root: Path, tokenizer, preset: str, **overrides) -> Path:
    """A run folder holding one checkpoint of a seeded `preset` model (tiny shape) and the tokenizer."""
    shape = SHAPE if preset in ("tiny-dense", "tiny-moe") else MODERN_SHAPE
    torch.manual_seed(0)
    config = MoEConfig.from_preset(
        preset,
        **{**shape, **overrides},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = MoEForCausalLM(config)
    for router in model.routers():
        if config.router_bias_update_rate > 0:  # a trained aux-free bias is non-zero: let it change the choice
            router.score_bias.normal_(std=0.05)
    ckpt = root / "run" / "checkpoints" / "step00000001"
    (ckpt / ACCELERATE_WEIGHTS).parent.mkdir(parents=True)
    config.save_pretrained(ckpt)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / ACCELERATE_WEIGHTS)
    (ckpt.parent / "latest").write_text(ckpt.name)
    tokenizer.save_pretrained(root / "run" / "tokenizer")
    return root / "run"


def stock_outputs(folders: list[Path], ids: torch.Tensor, tmp_path: Path, *, generate: bool) -> list[dict]:
    """Per folder, in a fresh interpreter without moe_dist: class, fp32 logits on `ids`, and (with `generate`)
    greedy tokens with the KV cache and a `pipeline("text-generation")` result."""
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM, pipeline
ids, rows = torch.load("ids.pt", weights_only=True), []
for i, folder in enumerate({[str(f) for f in folders]!r}):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.save(model(input_ids=ids, use_cache=False).logits, f"logits{{i}}.pt")
    row = {{"class": type(model).__name__}}
    if {generate!r}:
        row["tokens"] = model.generate(ids[:1, :8], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                       use_cache=True)[0].tolist()
        row["text"] = pipeline("text-generation", model=folder, dtype=torch.float32)(
            "Once upon a time", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    rows.append(row)
rows.append(sorted(m for m in sys.modules if m.split(".")[0] == "moe_dist"))
print(json.dumps(rows))
"""
    proc = run_without_moe_dist(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *rows, imported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert imported == []
    for i, row in enumerate(rows):
        row["logits"] = torch.load(tmp_path / f"logits{i}.pt", weights_only=True)
    return rows


def fixed_batch(vocab_size: int) -> torch.Tensor:
    return torch.randint(vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "preset, fmt", [("tiny-dense", "gpt2"), ("mixtral-tiny", "mixtral"), ("ernie-tiny", "ernie4_5_moe")]
)
def test_export_loads_in_the_stock_class_with_our_logits_greedy_tokens_and_a_pipeline(
    tmp_path, tokenizer, capsys, preset, fmt
):
    run = make_run(tmp_path, tokenizer, preset)
    out = tmp_path / "out"
    assert main([str(run), str(out), "--format", fmt]) == 0
    assert f"as {fmt}" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model_type"] == fmt
    assert {"generation_config.json", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert CLASS[fmt] in (out / "README.md").read_text()

    ours = build_model(run / "checkpoints" / "step00000001")
    ids = fixed_batch(ours.config.vocab_size)
    with torch.no_grad():
        our_logits = ours(input_ids=ids, use_cache=False).logits
        our_tokens = ours.generate(ids[:1, :8], max_new_tokens=12, min_new_tokens=12, do_sample=False)[0].tolist()
    (stock,) = stock_outputs([out], ids, tmp_path, generate=True)
    assert stock["class"] == CLASS[fmt]
    assert (stock["logits"] - our_logits).abs().max().item() <= 1e-4
    assert stock["tokens"] == our_tokens
    assert stock["text"].startswith("Once upon a time")


def test_a_bf16_export_is_checked_against_our_model_on_the_same_rounded_weights(tmp_path, tokenizer, capsys):
    from safetensors import safe_open

    run = make_run(tmp_path, tokenizer, "mixtral-tiny")
    assert main([str(run), str(tmp_path / "out"), "--format", "mixtral", "--dtype", "bf16"]) == 0
    assert "as mixtral (max |logit difference|" in capsys.readouterr().out
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16


def refused(capsys, run: Path, out: Path, fmt: str) -> str:
    """Export `run` as `fmt`, expecting a refusal: exit 2, one line, nothing written beside `out`."""
    assert main([str(run), str(out), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not out.exists() and not list(out.parent.glob(out.name + ".tmp-*"))
    return err


@pytest.mark.parametrize(
    "preset, overrides, fmt, field, able",
    [
        ("tiny-moe", {}, "gpt2", "num_local_experts=8", "native"),  # GPT-2-style MoE: no stock class has that block
        ("tiny-moe", {}, "mixtral", "norm_type='layernorm'", "native"),
        ("tiny-dense", {}, "llama", "norm_type='layernorm'", "gpt2, native"),
        ("mixtral-tiny", {"router_type": "random"}, "mixtral", "router_type='random'", "native"),
        ("mixtral-tiny", {"norm_topk_prob": False}, "mixtral", "norm_topk_prob=False", "native"),
        ("mixtral-tiny", {"norm_topk_prob": False}, "ernie4_5_moe", "norm_topk_prob=False", "native"),
        (
            "mixtral-tiny",
            {"norm_topk_prob": False, "qk_norm": "head"},
            "mixtral",
            "qk_norm='head'",
            "qwen3_moe, native",
        ),
        (
            "mixtral-tiny",
            {"qk_norm": "projection", "clip_qkv": 3.0},
            "qwen3_moe",
            "qk_norm='projection'",
            "olmoe, native",
        ),
        (
            "mixtral-tiny",
            {"router_bias_update_rate": 1e-3},
            "mixtral",
            "router_bias_update_rate=0.001",
            "ernie4_5_moe, native",
        ),
        ("mixtral-tiny", {"num_shared_experts": 1}, "mixtral", "num_shared_experts=1", "ernie4_5_moe, native"),
        ("mixtral-tiny", {"eval_capacity_factor": 1.0}, "mixtral", "eval_capacity_factor=1.0", "native"),
        ("ernie-tiny", {"eval_capacity_factor": 1.0}, "ernie4_5_moe", "eval_capacity_factor=1.0", "native"),
        ("ernie-tiny", {}, "mixtral", "skip_first_moe=1", "ernie4_5_moe, native"),
        ("ernie-tiny", {"skip_first_moe": 0, "moe_every": 2}, "ernie4_5_moe", "moe_every=2", "native"),
        ("tiny-modern", {"hidden_act": "gelu"}, "ernie4_5_moe", "hidden_act='gelu'", "native"),
    ],
)
def test_a_field_the_class_cannot_represent_is_refused_before_writing(
    tmp_path, tokenizer, capsys, preset, overrides, fmt, field, able
):
    run = make_run(tmp_path, tokenizer, preset, **overrides)
    expected = f"error: {field} cannot be exported as {fmt}; formats that represent this model: {able}"
    assert refused(capsys, run, tmp_path / "out", fmt) == expected


def test_a_trained_selection_bias_is_refused_for_mixtral_even_with_the_update_rate_off(tmp_path, tokenizer, capsys):
    run = make_run(tmp_path, tokenizer, "ernie-tiny", skip_first_moe=0, num_shared_experts=0)
    config = json.loads((run / "checkpoints" / "step00000001" / "config.json").read_text())
    config["router_bias_update_rate"] = 0.0  # the bias stays in the weights: it still changes the routing
    (run / "checkpoints" / "step00000001" / "config.json").write_text(json.dumps(config))
    err = refused(capsys, run, tmp_path / "out", "mixtral")
    assert "model.layers.0.mlp.router.score_bias is non-zero" in err and "ernie4_5_moe, native" in err


def test_an_export_the_stock_class_does_not_reproduce_to_1e_4_is_refused_and_removed(tmp_path, tokenizer, capsys):
    # Logits in the 1e5s: the stock class's fp32 rounding (Ernie's interleaved RoPE sums q.k in another
    # order) alone moves them by more than 1e-4, so the folder written for the check must go again.
    run = make_run(tmp_path, tokenizer, "ernie-tiny")
    ckpt = run / "checkpoints" / "step00000001"
    from safetensors.torch import load_file

    weights = load_file(ckpt / ACCELERATE_WEIGHTS)
    weights["lm_head.weight"] *= 1e6
    save_file(weights, ckpt / ACCELERATE_WEIGHTS)
    err = refused(capsys, run, tmp_path / "out", "ernie4_5_moe")
    assert "Ernie4_5_MoeForCausalLM does not reproduce the model: max |logit difference|" in err


def test_auto_picks_the_first_exact_class_and_falls_back_to_native(tmp_path, tokenizer, capsys):
    expected = {
        "tiny-dense": ["gpt2"],
        "seed-baseline": ["gpt2"],
        "mixtral-tiny": ["mixtral", "ernie4_5_moe"],
        "ernie-tiny": ["ernie4_5_moe"],
        "modern-moe": ["ernie4_5_moe"],
        "tiny-modern": ["ernie4_5_moe"],
        "tiny-moe": [],
    }
    assert {p: fitting_formats(MoEConfig.from_preset(p)) for p in expected} == expected
    run = make_run(tmp_path, tokenizer, "tiny-moe")
    assert main([str(run), str(tmp_path / "out"), "--format", "auto"]) == 0
    said = capsys.readouterr().out
    assert "--format auto: no standard class represents this model (gpt2: num_local_experts=8;" in said
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "moe_dist"


def test_auto_moves_on_when_the_weights_rule_a_class_out(tmp_path, tokenizer, capsys):
    # Mixtral's fields fit, but a selection bias left in the weights does not: Ernie 4.5 MoE takes it.
    run = make_run(tmp_path, tokenizer, "ernie-tiny", skip_first_moe=0, num_shared_experts=0)
    config = json.loads((run / "checkpoints" / "step00000001" / "config.json").read_text())
    config["router_bias_update_rate"] = 0.0
    (run / "checkpoints" / "step00000001" / "config.json").write_text(json.dumps(config))
    assert main([str(run), str(tmp_path / "out"), "--format", "auto"]) == 0
    said = capsys.readouterr().out
    assert "score_bias is non-zero" in said and "as ernie4_5_moe" in said
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "ernie4_5_moe"


def test_the_console_script_takes_the_format_flag():
    import subprocess

    script = Path(sys.executable).parent / "moe-dist-export"
    proc = subprocess.run([str(script), "--help"], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "{native,gpt2,llama,qwen3,mixtral,qwen3_moe,olmoe,ernie4_5_moe,auto}" in proc.stdout


def test_a_max_shard_size_below_the_model_writes_shards_that_both_classes_load(tmp_path, tokenizer, capsys):
    from moe_dist.convert.stock_import import check_import, init_config, read_init_config
    from moe_dist.output_guard import fingerprints

    run = make_run(tmp_path, tokenizer, "mixtral-tiny")
    out, native = tmp_path / "out", tmp_path / "native"
    assert main([str(run), str(out), "--format", "mixtral", "--max_shard_size", "100KB"]) == 0
    assert main([str(run), str(native), "--max_shard_size", "0.1MB"]) == 0
    capsys.readouterr()
    ours = build_model(run / "checkpoints" / "step00000001")
    ids = fixed_batch(ours.config.vocab_size)
    with torch.no_grad():
        our_logits = ours(input_ids=ids, use_cache=False).logits
    for folder in (out, native):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and not (folder / "model.safetensors").exists()
        assert set(shards) <= set(fingerprints(folder))  # each shard is recorded as ours, by size and sha256
    (stock,) = stock_outputs([out], ids, tmp_path, generate=False)
    assert (stock["logits"] - our_logits).abs().max().item() <= 1e-4
    init = read_init_config(out)  # our class reads the sharded stock folder as it reads a hub one
    assert check_import(init, init_config(init)) <= 1e-4
    with torch.no_grad():
        loaded = MoEForCausalLM.from_pretrained(native).eval()(input_ids=ids, use_cache=False).logits
    assert (loaded - our_logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("size", ["50XB", "0", "-5GB", "GB", "infGB"])
def test_a_bad_max_shard_size_is_one_line_before_any_work(tmp_path, tokenizer, capsys, size):
    run = make_run(tmp_path, tokenizer, "mixtral-tiny")
    assert main([str(run), str(tmp_path / "out"), "--format", "mixtral", f"--max_shard_size={size}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --max_shard_size {size!r} is not a size such as 50GB, 500MB or 1000000 (bytes)"
    assert not (tmp_path / "out").exists()
