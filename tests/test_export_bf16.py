"""Export from a bf16 DeepSpeed run takes the fp32 masters, in the dtype asked for (issue 12).

DeepSpeed saves the module's weights in bf16; its ZeRO-1/2 shards hold the fp32 masters those are
rounded from. The export must be the masters: rounding them to bf16 gives the saved module weights,
and they are not themselves bf16-rounded.
"""
import json

import torch
from launcher import CPU_EP2, DATA_ARGS, TRAIN, check, deepspeed
from safetensors.torch import load_file

from moe_dist.export import load_hf_state_dict
from moe_dist.export.cli import main as export_main


def test_bf16_deepspeed_run_exports_its_fp32_masters_and_bf16_on_request(tmp_path):
    config = json.loads(open(CPU_EP2).read())
    config["bf16"] = {"enabled": True}
    ds_json = tmp_path / "bf16_ep2.json"
    ds_json.write_text(json.dumps(config))
    run = tmp_path / "run"
    check(deepspeed(TRAIN, ["--deepspeed", str(ds_json), "--model", "tiny-moe", *DATA_ARGS, "--max_steps", "3",
                            "--eval_every", "3", "--save_every", "3", "--lr", "2e-3", "--output_dir", str(run)]))
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
