"""An EP=2 DeepSpeed checkpoint exports straight to the stock Mixtral and Ernie 4.5 MoE classes, with the
native export's logits. Its own file: it launches 2 CPU ranks (the `multirank` worker)."""

import json

import pytest
import torch
from launcher import CPU_EP2, DATA_ARGS, TRAIN, check, deepspeed
from test_export_standard import CLASS, fixed_batch, stock_outputs

from moe_dist import MoEForCausalLM
from moe_dist.export.cli import main

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def ep2_modern_run(tmp_path_factory):
    """A short EP=2 DeepSpeed run of mixtral-tiny (2 CPU ranks). Mixtral's block is also an Ernie 4.5 MoE block
    (no dense layer, no shared expert, a zero selection bias), so this one run exports to both classes."""
    run = tmp_path_factory.mktemp("ep2_modern") / "run"
    check(
        deepspeed(
            TRAIN,
            [
                "--deepspeed",
                CPU_EP2,
                "--model",
                "mixtral-tiny",
                *DATA_ARGS,
                "--seq_len",
                "32",
                "--max_steps",
                "4",
                "--eval_every",
                "4",
                "--save_every",
                "4",
                "--log_every",
                "1",
                "--lr",
                "2e-3",
                "--warmup_steps",
                "1",
                "--output_dir",
                str(run),
            ],
        )
    )
    return run


def test_an_ep2_deepspeed_checkpoint_exports_to_mixtral_and_ernie_with_the_native_exports_logits(
    ep2_modern_run, tmp_path
):
    ckpt = ep2_modern_run / "checkpoints" / "step00000004"
    assert json.loads((ckpt / "trainer_state.json").read_text())["ep_size"] == 2
    assert main([str(ep2_modern_run), str(tmp_path / "native")]) == 0
    summary = json.loads((ep2_modern_run / "summary.json").read_text())
    for fmt in ("mixtral", "ernie4_5_moe"):
        assert main([str(ep2_modern_run), str(tmp_path / fmt), "--format", fmt]) == 0
        card = (tmp_path / fmt / "README.md").read_text()
        assert CLASS[fmt] in card and f"Validation perplexity: {summary['final_val_ppl']:.3f} (final)" in card
        command = next(line for line in card.splitlines() if line.startswith("- Command (latest launch): "))
        assert "launch/train.py" in command and "--model mixtral-tiny" in command and "--deepspeed" in command
        assert "- Data: local files " in card and "stories.txt" in card
    native = MoEForCausalLM.from_pretrained(tmp_path / "native", dtype=torch.float32).eval()
    ids = fixed_batch(native.config.vocab_size)
    with torch.no_grad():
        native_logits = native(input_ids=ids, use_cache=False).logits
    rows = stock_outputs([tmp_path / "mixtral", tmp_path / "ernie4_5_moe"], ids, tmp_path, generate=False)
    assert [r["class"] for r in rows] == [CLASS["mixtral"], CLASS["ernie4_5_moe"]]
    for row in rows:
        assert (row["logits"] - native_logits).abs().max().item() <= 1e-4
