"""bf16 under DeepSpeed on CPU with EP=2: it trains with the routers in fp32, resumes
exactly, and its export takes the fp32 masters, in the dtype asked for.

DeepSpeed saves the module's weights in bf16; its ZeRO-1/2 shards hold the fp32 masters those are
rounded from. The export must be the masters: rounding them to bf16 gives the saved module weights,
and they are not themselves bf16-rounded. The run goes through `tests/scripts/train_probe.py` (the
real trainer, with the routers observed) and saves at steps 2 and 4.
"""

import json
import math

import pytest
import torch
from launcher import CPU_EP2, DATA_ARGS, ROOT, TRAIN, check, deepspeed, metrics, truncate_run
from safetensors.torch import load_file

from moe_dist.export import load_hf_state_dict
from moe_dist.export.cli import main as export_main

pytestmark = pytest.mark.multirank

PROBE = ROOT / "tests" / "scripts" / "train_probe.py"
STEPS = 4


def test_bf16_deepspeed_ep2_trains_with_fp32_routers_resumes_and_exports_its_fp32_masters(tmp_path):
    config = json.loads(open(CPU_EP2).read())
    config["bf16"] = {"enabled": True}
    ds_json = tmp_path / "bf16_ep2.json"
    ds_json.write_text(json.dumps(config))
    run = tmp_path / "run"
    args = [
        "--deepspeed",
        str(ds_json),
        "--model",
        "tiny-moe",
        *DATA_ARGS,
        "--seq_len",
        "32",
        "--max_steps",
        str(STEPS),
        "--eval_every",
        str(STEPS),
        "--save_every",
        "2",
        "--log_every",
        "1",
        "--lr",
        "2e-3",
    ]
    check(deepspeed(PROBE, [str(tmp_path), *args, "--output_dir", str(run)]))
    # It trains; the model computes in bf16 and every router in fp32, on both ranks.
    losses = {step: row["loss"] for step, row in metrics(run).items()}
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(map(math.isfinite, losses.values()))
    for rank in (0, 1):
        probe = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert probe["router_dtypes"] == ["input:torch.bfloat16", "loss:torch.float32", "weight:torch.float32"]

    # Stopped after its step-2 checkpoint and relaunched, it continues exactly as it went on.
    resumed = tmp_path / "resumed"
    truncate_run(run, resumed, keep_step=2)
    check(deepspeed(TRAIN, [*args, "--output_dir", str(resumed)]))
    again = {step: row["loss"] for step, row in metrics(resumed).items()}
    assert sorted(again) == list(range(1, STEPS + 1))
    assert all(again[step] == losses[step] for step in range(3, STEPS + 1)), (losses, again)

    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    saved = load_hf_state_dict(ckpt)  # what DeepSpeed saved as the module: bf16 weights
    # (the routers' balancing biases stay fp32 by design and are not optimizer parameters)
    module = {k: v for k, v in saved.items() if v.dtype == torch.bfloat16}
    assert all(k.endswith("router.score_bias") for k in saved.keys() - module.keys())

    assert export_main([str(run), str(tmp_path / "fp32")]) == 0
    masters = load_file(tmp_path / "fp32" / "model.safetensors")
    rounded = 0
    for name, saved in module.items():
        assert masters[name].dtype == torch.float32, name
        assert torch.equal(masters[name].bfloat16(), saved), name  # the masters these were rounded from
        rounded += int(not torch.equal(masters[name].bfloat16().float(), masters[name]))
    assert rounded > len(module) // 2  # not bf16 values widened to fp32

    assert export_main([str(run), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    bf16 = load_file(tmp_path / "bf16" / "model.safetensors")
    for name, saved in module.items():
        assert bf16[name].dtype == torch.bfloat16 and torch.equal(bf16[name], saved), name
