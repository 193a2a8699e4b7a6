"""Fine-tuning on conversations through the real entry points: an imported and an upcycled model, the router
frozen under EP = 2 and across a resume, routing drift, and bad conversation files refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launcher import CPU_EP2, ROOT, check, deepspeed, metrics, python
from safetensors.torch import load_file
from stock_models import save_stock, tokenizer_for_tests

from moe_dist.model.configuration import MoEConfig
from moe_dist.model.modeling import MoEForCausalLM
from moe_dist.train.cli import main

TRAIN = ROOT / "launch" / "train.py"
SAMPLE = ROOT / "data" / "conversations"
CHATML = str(SAMPLE / "chatml.jinja")
SFT_DATA = ["--train_file", str(SAMPLE / "train.jsonl"), "--valid_file", str(SAMPLE / "valid.jsonl")]
SHORT = ["--chat_template", CHATML, "--truncate_conversations", "true", "--log_every", "1", "--max_valid_blocks", "4"]


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    tokenizer = tokenizer_for_tests(root / "tok")
    return {fmt: save_stock(fmt, root / fmt, tokenizer) for fmt in ("qwen3_moe", "llama")}


def test_an_imported_moe_fine_tunes_on_conversations_and_exports_to_its_class(stock, tmp_path):
    run = tmp_path / "run"
    args = ["--init_from", str(stock["qwen3_moe"]), *SFT_DATA, *SHORT, "--seq_len", "64", "--max_steps", "3"]
    proc = check(python(TRAIN, [*args, "--eval_every", "3", "--output_dir", str(run)], timeout=600))
    assert "supervised" in proc.stderr + proc.stdout  # the packing line: conversations, rows, real share
    evals = metrics(run, "eval")
    assert evals[3]["loss"] > 0 and any(k.startswith("routing_drift/") for k in evals[3])
    saved = json.loads((run / "tokenizer" / "tokenizer_config.json").read_text())
    assert saved.get("chat_template") or (run / "tokenizer" / "chat_template.jinja").is_file()
    out = tmp_path / "export"
    check(python("-m", ["moe_dist.export", str(run), str(out), "--format", "qwen3_moe"]))
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()


def test_an_upcycled_model_fine_tunes_on_conversations(stock, tmp_path):
    run = tmp_path / "run"
    args = ["--init_from", str(stock["llama"]), "--upcycle_experts", "4", "--top_k", "2", *SFT_DATA, *SHORT]
    check(python(TRAIN, [*args, "--seq_len", "64", "--max_steps", "2", "--eval_every", "2", "--output_dir", str(run)]))
    assert metrics(run, "eval")[2]["loss"] > 0


def _routers(folder) -> dict[str, torch.Tensor]:
    weights = load_file(folder / "model.safetensors")
    return {k: v for k, v in weights.items() if k.endswith("router.weight")}


@pytest.mark.multirank
def test_a_frozen_router_stays_bitwise_under_ep2_and_across_a_resume_and_does_not_drift(tmp_path):
    run = tmp_path / "run"
    ds = json.loads(Path(CPU_EP2).read_text())
    ds["train_micro_batch_size_per_gpu"] = 2  # 20 steps in CI time; EP=2 all the same
    (tmp_path / "ep2.json").write_text(json.dumps(ds))
    base = ["--model", "tiny-moe", *SFT_DATA, *SHORT, "--seq_len", "64", "--freeze_router", "true"]
    base += ["--deepspeed", str(tmp_path / "ep2.json"), "--lr", "3e-3", "--eval_every", "10"]
    base += ["--save_every", "10", "--output_dir", str(run)]
    check(deepspeed(TRAIN, [*base, "--max_steps", "20"], timeout=900))
    config = MoEConfig.from_pretrained(run / "hf")
    torch.manual_seed(0)  # the trainer's seed: transformers.set_seed(0) before building the model
    initial = {k: v for k, v in MoEForCausalLM(config).state_dict().items() if k.endswith("router.weight")}
    after_20 = _routers(run / "hf")
    assert after_20.keys() == initial.keys() and len(initial) == config.num_hidden_layers
    assert all(torch.equal(after_20[k], initial[k]) for k in initial)
    check(deepspeed(TRAIN, [*base, "--max_steps", "24"], timeout=900))  # resumes from step 20
    after_24 = _routers(run / "hf")
    assert all(torch.equal(after_24[k], initial[k]) for k in initial)
    evals = metrics(run, "eval")
    assert {10, 20, 24} <= evals.keys()
    assert all(v == 0.0 for row in evals.values() for k, v in row.items() if k.startswith("routing_drift/"))
    moved = load_file(run / "hf" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(moved, MoEForCausalLM(config).state_dict()["model.layers.0.self_attn.q_proj.weight"])


def test_routing_drifts_on_a_single_topic_set_when_the_router_trains(tmp_path):
    topic = tmp_path / "count.jsonl"
    rows = [{"prompt": f"Count from {n}.", "completion": " ".join(str(n + i) for i in range(12))} for n in range(300)]
    topic.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = tmp_path / "run"
    args = ["--model", "tiny-moe", "--train_file", str(topic), "--valid_file", str(topic), *SHORT, "--seq_len", "64"]
    args += ["--lr", "5e-3", "--warmup_steps", "1", "--max_steps", "8", "--eval_every", "4", "--output_dir", str(run)]
    check(python(TRAIN, args, timeout=600))
    last = metrics(run, "eval")[8]
    assert max(v for k, v in last.items() if k.startswith("routing_drift/")) > 0.0


BAD = {  # each the third line of a file whose first two are good
    "not JSON": "{oops",
    "no assistant turn": '{"messages": [{"role": "user", "content": "hi"}]}',
    "unknown role": '{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
    "content not a string": '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}',
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_conversation_file_is_one_line_naming_its_line_before_any_work(capsys, tmp_path, case):
    good = '{"prompt": "a", "completion": "b"}\n'
    (tmp_path / "train.jsonl").write_text(good * 2 + BAD[case] + "\n")
    (tmp_path / "valid.jsonl").write_text(good)
    run = tmp_path / "run"
    args = ["--model", "tiny-moe", "--train_file", str(tmp_path / "train.jsonl")]
    args += ["--valid_file", str(tmp_path / "valid.jsonl"), "--chat_template", CHATML]
    code = main([*args, "--max_steps", "1", "--output_dir", str(run)])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(errors) == 1, errors
    assert "line 3" in errors[0] and "train_file" in errors[0], errors[0]
    assert not run.exists()


def test_conversations_with_no_chat_template_anywhere_are_refused_before_any_work(capsys, tmp_path):
    run = tmp_path / "run"
    code = main(["--model", "tiny-moe", *SFT_DATA, "--max_steps", "1", "--output_dir", str(run)])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(errors) == 1 and "--chat_template" in errors[0], errors
    assert not run.exists()


def test_a_frozen_selection_bias_stays_while_the_router_weights_train(tmp_path):
    run = tmp_path / "run"
    args = ["--model", "ernie-tiny", *SFT_DATA, *SHORT, "--seq_len", "64", "--freeze_router_bias", "true"]
    check(python(TRAIN, [*args, "--lr", "3e-3", "--max_steps", "3", "--eval_every", "3", "--output_dir", str(run)]))
    config = MoEConfig.from_pretrained(run / "hf")
    assert config.router_bias_update_rate > 0  # ernie-tiny balances by the selection bias: frozen here
    weights = load_file(run / "hf" / "model.safetensors")
    biases = [v for k, v in weights.items() if k.endswith("router.score_bias")]
    assert biases and all(not b.any() for b in biases)  # as initialised: zeros
    torch.manual_seed(0)
    initial = MoEForCausalLM(config).state_dict()
    routers = [k for k in weights if k.endswith("router.weight")]
    assert routers and not all(torch.equal(weights[k], initial[k]) for k in routers)
