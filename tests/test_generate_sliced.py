"""Generation with sliced experts: `launch/generate.py --etp_size T` on T ranks, each holding slice t
of every expert, gives the single-process greedy text.

Two exports, both with random weights and random expert biases (a bias added on every slice, or
on none, shows): a GPT-2 block (GELU, biases everywhere, top-2) and a modern one (SwiGLU, RoPE,
GQA, a shared expert, a dense first layer whose FFN must stay whole). One process checks that the
slices read from the safetensors are training's `slice_expert` slices and that their partial
outputs add up to each MoE block's output; one `deepspeed --num_gpus 2` launch generates from
both exports on 2 CPU ranks, compared with the one-process CLI.
"""

import json

import pytest
import torch
from launcher import FIXTURES, ROOT, check, deepspeed

from launch.generate import main
from moe_dist.train.data import SEPARATOR

DRIVER = ROOT / "tests" / "scripts" / "generate_sliced.py"
PROMPTS = ["Once upon a time", "Sam was a little dog. One day"]
NEW_TOKENS = 24
EXPORTS = {
    "gpt2-bias-top2": {"preset": "tiny-moe", "expert_bias": True, "num_experts_per_tok": 2},
    "modern-swiglu-shared": {"preset": "ernie-tiny"},  # skip_first_moe=1: layer 0 is dense
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{name: hf folder}: 2-layer random models (seeded) with this byte-level BPE, saved like an export."""
    from moe_dist import MoEConfig, MoEForCausalLM
    from moe_dist.train.data import build_tokenizer

    root = tmp_path_factory.mktemp("sliced")
    stories = [s.strip() for s in (FIXTURES / "stories.txt").read_text().split(SEPARATOR) if s.strip()]
    tokenizer = build_tokenizer("train:512", stories, None)
    folders = {}
    for seed, (name, spec) in enumerate(EXPORTS.items()):
        spec = dict(spec)
        config = MoEConfig.from_preset(
            spec.pop("preset"),
            vocab_size=len(tokenizer),
            num_hidden_layers=2,
            initializer_range=0.05,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **spec,
        )
        torch.manual_seed(seed)
        model = MoEForCausalLM(config).eval()
        with torch.no_grad():
            for key, param in model.named_parameters():
                if ".mlp." in key and key.endswith("bias"):
                    param.normal_(std=0.5)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def test_slices_are_training_slices_and_their_partial_outputs_add_up_to_the_block(exports):
    from moe_dist.generation import load_model
    from moe_dist.model.moe import MoEBlock
    from moe_dist.parallel.expert_tensor_parallel import slice_expert
    from moe_dist.parallel.sliced_experts import SlicedExperts, load_sliced_model

    cpu = torch.device("cpu")
    for name, folder in exports.items():
        full = load_model(folder, cpu)
        ranks = [load_sliced_model(folder, t, 2, cpu) for t in range(2)]
        blocks = [[m for m in model.modules() if isinstance(m, (MoEBlock, SlicedExperts))] for model in [full, *ranks]]
        full_blocks = [m for m in blocks[0] if isinstance(m, MoEBlock)]
        sliced = [[m for m in b if isinstance(m, SlicedExperts)] for b in blocks[1:]]
        assert len(full_blocks) == len(sliced[0]) == len(sliced[1]) == (2 if name.startswith("gpt2") else 1)
        assert ranks[0].config.moe_intermediate_size == full.config.moe_intermediate_size  # the export's width
        x_TD = torch.randn(40, full.config.hidden_size)
        with torch.no_grad():
            for i, block in enumerate(full_blocks):
                for t in range(2):
                    for e, expert in enumerate(block.experts):
                        want = slice_expert(expert, t, 2).state_dict()
                        got = sliced[t][i].experts[e].state_dict()
                        if t > 0 and "down_proj.bias" in got:  # slice_expert drops it; the loader zeroes it
                            assert not got.pop("down_proj.bias").any()
                        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
                routing = block.router(x_TD)
                expected = block.experts(x_TD, routing)
                if block.shared_mlp is not None:
                    expected = expected + block.shared_mlp(x_TD)
                parts = [sliced[t][i].partial(x_TD, routing) for t in range(2)]
                torch.testing.assert_close(parts[0] + parts[1], expected, rtol=0, atol=1e-5)
                assert (parts[0] - expected).abs().max() > 0.1  # one slice alone is far off


@pytest.mark.multirank
def test_sliced_generation_on_2_ranks_equals_single_process_greedy(exports, tmp_path, capsys):
    common = ["--temperature", "0", "--max_new_tokens", str(NEW_TOKENS)]
    for prompt in PROMPTS:
        common += ["--prompt", prompt]
    calls = [["--model_path", str(folder), *common] for folder in exports.values()]
    (tmp_path / "calls.json").write_text(json.dumps(calls))
    proc = check(deepspeed(DRIVER, [str(tmp_path)], timeout=300))
    assert proc.stdout.count("=== prompt ") == len(exports) * len(PROMPTS)  # rank 0 alone prints
    for i, (name, folder) in enumerate(exports.items()):
        sliced = json.loads((tmp_path / f"{i}.json").read_text())
        assert sliced["settings"]["etp_size"] == 2
        reference = tmp_path / f"single-{i}.json"
        assert main(["--model_path", str(folder), "--device", "cpu", *common, "--json", str(reference)]) == 0
        single = json.loads(reference.read_text())["samples"]
        assert [s["text"] for s in sliced["samples"]] == [s["text"] for s in single], name
        assert [s["num_new_tokens"] for s in single] == [NEW_TOKENS] * len(PROMPTS), name  # no early stop
    capsys.readouterr()
