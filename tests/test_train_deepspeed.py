"""Expert-parallel training through the real `deepspeed` launcher on 2 CPU ranks (EP=2, ZeRO-2, fp32)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from launcher import ROOT, STEPS, check, deepspeed, leftover_shm, metrics
from safetensors.torch import load_file

pytestmark = pytest.mark.multirank


def test_ep2_loss_and_gradients_equal_single_process_ep1(tmp_path):
    out = tmp_path / "result.json"
    proc = check(deepspeed(ROOT / "tests" / "scripts" / "ep_equivalence.py", [str(out)]))
    assert leftover_shm(proc) == []
    results = json.loads(out.read_text())
    assert set(results) == {"top1-dropless", "top2-capacity1.0"}
    for result in results.values():
        assert result["params_checked"] >= 80  # every parameter, experts included
        assert result["loss_diff"] <= 1e-5
        assert result["max_grad_diff"] <= 1e-5


def test_ep2_training_loss_falls(ep2_run):
    run_dir = ep2_run
    train = metrics(run_dir)
    first = np.mean([train[s]["loss"] for s in (1, 2, 3)])
    last = np.mean([train[s]["loss"] for s in (STEPS - 2, STEPS - 1, STEPS)])
    assert last < first - 1.0, (first, last)
    assert metrics(run_dir, "eval")[STEPS]["loss"] < 5.5


def test_summary_has_every_contract_key(ep2_run):
    from moe_dist.train.logging_io import REQUIRED_SUMMARY_KEYS

    summary = json.loads((ep2_run / "summary.json").read_text())
    assert set(REQUIRED_SUMMARY_KEYS) <= set(summary)
    assert summary["steps"] == STEPS and summary["ep_size"] == 2 and summary["world_size"] == 2
    assert summary["model"] == "tiny-moe" and summary["num_local_experts"] == 8
    assert 0 < summary["params_active"] < summary["params_total"]
    assert summary["best_val_ppl"] <= summary["final_val_ppl"] < 300
    assert summary["max_tok_s"] > 0 and summary["peak_mem_mb"] > 0
    assert len(summary["peak_mem_mb_per_rank"]) == 2 and min(summary["peak_mem_mb_per_rank"]) > 0


def test_checkpoint_holds_one_file_per_global_expert(ep2_run):
    ckpt_root = ep2_run / "checkpoints"
    latest = ckpt_root / (ckpt_root / "latest").read_text()
    assert latest.name == f"step{STEPS:08d}"
    names = {p.name for p in latest.iterdir()}
    for layer in range(4):
        for expert in range(8):
            assert f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt" in names
    assert {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "MANIFEST.json",
        "config.json",
        "trainer_state.json",
    } <= names
    assert sorted(p.name for p in (latest / "ranks").iterdir()) == ["rank00000.pt", "rank00001.pt"]
    # The expert file's keys name the global expert, whichever rank wrote it.
    keys = torch.load(latest / "layer_2_expert_7_mp_rank_00_model_states.pt", weights_only=True)
    assert all(".deepspeed_experts.7." in k for k in keys)


def test_hf_export_loads_with_from_pretrained_and_generates(ep2_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moe_dist  # noqa: F401  (registers the Auto classes)

    hf = ep2_run / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    assert type(model).__name__ == "MoEForCausalLM" and tok.eos_token_id is not None
    assert len(model.model.layers[0].mlp.experts) == 8  # every EP rank's experts, consolidated
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert isinstance(tok.decode(out[0]), str)


def test_exported_model_reproduces_the_trainers_last_evaluation(ep2_run):
    from moe_dist.model.modeling import MoEForCausalLM
    from moe_dist.train.data import validation_shard
    from moe_dist.train.evaluation import evaluate

    run_dir = ep2_run
    summary = json.loads((run_dir / "summary.json").read_text())
    blocks = np.load(next((run_dir / "cache").glob("valid-*.npy")))
    model = MoEForCausalLM.from_pretrained(run_dir / "hf")
    # The trainer evaluated every block on 2 ranks (EP=2); one process here must agree.
    loss = evaluate(
        model,
        blocks,
        validation_shard(len(blocks), rank=0, world_size=1, micro_batch_size=8),
        device=torch.device("cpu"),
    )["loss"]
    assert abs(loss - summary["final_val_loss"]) <= 1e-6


def test_offline_export_equals_end_of_training_export(ep2_run, tmp_path):
    run_dir = ep2_run
    ckpt = run_dir / "checkpoints" / f"step{STEPS:08d}"
    proc = subprocess.run(
        [sys.executable, "-m", "moe_dist.export", str(ckpt), str(tmp_path / "hf")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    check(proc)
    offline, online = load_file(tmp_path / "hf" / "model.safetensors"), load_file(run_dir / "hf" / "model.safetensors")
    assert offline.keys() == online.keys()
    assert all(torch.equal(offline[k], online[k]) for k in online)
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads(
        (run_dir / "hf" / "config.json").read_text()
    )


# Resume after a crash (steps N+1..2N equal the straight run's) is shown, with kills at three
# points of a save, by tests/faults/test_checkpoint_faults.py on this same reference run.
