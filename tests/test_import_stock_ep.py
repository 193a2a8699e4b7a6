"""A stock checkpoint trains under expert parallelism as in one process, and goes back to its own class.

Through the real launchers on CPU ranks: `--init_from` a random stock folder (tests/stock_models.py), 10 steps
under `deepspeed` EP=2 (EP=4 for a model of 8 experts on 4 ranks), the same 10 steps in one process with the
same global batch, then `python -m moe_dist.export --format auto`, which must pick the class the run came
from; the stock class then loads the export in an interpreter without moe_dist and gives our trained
model's logits. Each rank reads only its own experts (`TrainEngine.setup`), which these runs exercise.
"""

import json

import pytest
import torch
from launcher import CPU_EP1, CPU_EP2, FIXTURES, TRAIN, check, deepspeed, metrics, python
from stock_models import CHAT_TEMPLATE, save_stock, tokenizer_for_tests
from test_export_standard import stock_outputs

from moe_dist import MoEForCausalLM
from moe_dist.export.cli import main as export_main

pytestmark = pytest.mark.multirank

STEPS = 10
COMMON = [
    "--train_file",
    str(FIXTURES / "stories.txt"),
    "--valid_file",
    str(FIXTURES / "stories_valid.txt"),
    "--seq_len",
    "32",
    "--max_steps",
    str(STEPS),
    "--eval_every",
    str(STEPS),
    "--log_every",
    "1",
    "--warmup_steps",
    "2",
    "--lr",
    "2e-3",
]


# OLMoE clamps q/k/v (clip_qkv) and routes top-k without renormalising: its loss is a discontinuous function of
# the weights, and a 1e-7 difference of reduction order between EP=2 and one process can tip a clamp or a near
# tie of two experts. On this project's CPU machine the two runs agreed to 1e-6 for 3 steps, then drifted to
# 1.2e-3 by step 10, at the commit that had passed within 1e-5 in an earlier CI run. The first steps (the same
# forward, gradients and first updates) stay held to 1e-5 for every class.
LATE_TOLERANCE = {"olmoe": 5e-3}


def losses(run_dir) -> list[float]:
    return [row["loss"] for _, row in sorted(metrics(run_dir).items())]


def exported_logits_match(run_dir, fmt: str, tmp_path) -> None:
    """Export back with --format auto; the stock class without moe_dist gives our trained model's logits."""
    out = tmp_path / f"{fmt}-export"
    assert export_main([str(run_dir), str(out), "--format", "auto"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == fmt
    ours = MoEForCausalLM.from_pretrained(run_dir / "hf").eval()
    ids = torch.randint(ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    row = stock_outputs([out], ids, tmp_path, generate=False)[0]
    with torch.no_grad():
        mine = ours(input_ids=ids, use_cache=False).logits
    assert (torch.load(tmp_path / "logits0.pt") - mine).abs().max() <= 1e-4, row


@pytest.mark.parametrize(
    "fmt, experts, ranks",
    [("mixtral", 4, 2), ("olmoe", 4, 2), ("ernie4_5_moe", 4, 2), ("qwen3_moe", 8, 4), ("llama", 4, 2)],
)
def test_an_imported_model_trains_under_ep_as_in_one_process_and_exports_back_to_its_class(
    tmp_path, fmt, experts, ranks
):
    folder = save_stock(fmt, tmp_path / "stock", tokenizer_for_tests(tmp_path / "tokenizer"), experts=experts)
    args = [*COMMON, "--init_from", str(folder)]
    config = json.loads(open(CPU_EP2).read())
    # The same global batch of 16 sequences on `ranks` ranks as in one process (8 x 2 accumulation).
    config.update(train_micro_batch_size_per_gpu=16 // ranks, moe={"ep_size": ranks if experts % ranks == 0 else 1})
    (tmp_path / "ds.json").write_text(json.dumps(config))
    launched = check(
        deepspeed(
            TRAIN,
            [*args, "--deepspeed", str(tmp_path / "ds.json"), "--output_dir", str(tmp_path / "ep")],
            ranks=ranks,
            timeout=600,
        )
    )
    assert f"{fmt} converted exactly" in launched.stdout + launched.stderr
    check(python(TRAIN, [*args, "--deepspeed", CPU_EP1, "--output_dir", str(tmp_path / "one")], timeout=600))
    ep, one = losses(tmp_path / "ep"), losses(tmp_path / "one")
    assert len(ep) == STEPS and max(abs(a - b) for a, b in zip(ep, one)) <= LATE_TOLERANCE.get(fmt, 1e-5), (ep, one)
    assert max(abs(a - b) for a, b in zip(ep[:3], one[:3])) <= 1e-5, (ep, one)
    exported_logits_match(tmp_path / "ep", fmt, tmp_path)


@pytest.mark.parametrize("fmt", ["gpt2", "qwen3"])
def test_a_dense_import_trains_on_one_device_and_exports_back_to_its_class(tmp_path, fmt):
    folder = save_stock(fmt, tmp_path / "stock", tokenizer_for_tests(tmp_path / "tokenizer"))
    check(
        python(TRAIN, [*COMMON, "--init_from", str(folder), "--max_steps", "3", "--output_dir", str(tmp_path / "run")])
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == f"stock ({fmt})" and summary["steps"] == 3
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "hf").chat_template == CHAT_TEMPLATE  # the model's own
    exported_logits_match(tmp_path / "run", fmt, tmp_path)
