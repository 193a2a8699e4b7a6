"""`launch/generate.py --chat`: the user's message rendered by the folder's chat template, the folder's stop ids,
the reply alone on stdout; a folder without a template is one line and exit 2.

The fixture is an export-shaped folder made in-process (a random 2-layer tiny-moe, the bundled GPT-2 tokenizer
with the ChatML template saved beside it, as a run trained on conversations exports them): a few seconds, where
a training run and its export take minutes on a loaded 2-core machine.
"""

import json
import shutil

import pytest
from launcher import ROOT

from launch.generate import main
from moe_dist.generation import chat_prompts
from moe_dist.train.data import BUNDLED_GPT2, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHATML = ROOT / "data" / "conversations" / "chatml.jinja"
SYSTEM, MESSAGE = "You write short stories.", "Tell me about a dog."


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    import torch

    from moe_dist import MoEConfig, MoEForCausalLM

    folder = tmp_path_factory.mktemp("chat") / "hf"
    tokenizer = load_tokenizer(BUNDLED_GPT2)
    tokenizer.chat_template = CHATML.read_text()
    torch.manual_seed(0)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = MoEConfig.from_preset("tiny-moe", vocab_size=50304, num_hidden_layers=2, **ids)
    MoEForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def chat(capsys, tmp_path, model_path, *args):
    """main() in-process: (exit code, the one sample from --json, stdout, stderr lines)."""
    out = tmp_path / f"chat-{len(list(tmp_path.iterdir()))}.json"
    argv = ["--model_path", str(model_path), "--device", "cpu", "--temperature", "0", "--json", str(out)]
    code = main([*argv, "--chat", *map(str, args)])
    captured = capsys.readouterr()
    sample = json.loads(out.read_text())["samples"][0] if code == 0 else None
    return code, sample, captured.out, captured.err.strip().splitlines()


def test_the_model_sees_the_template_rendering_and_only_the_reply_is_printed(chat_dir, tmp_path, capsys):
    code, sample, out, _ = chat(
        capsys, tmp_path, chat_dir, "--system", SYSTEM, "--prompt", MESSAGE, "--max_new_tokens", 6
    )
    assert code == 0
    want = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{MESSAGE}<|im_end|>\n<|im_start|>assistant\n"
    assert sample["prompt"] == want
    assert out == sample["continuation"] + "\n" and want not in out
    assert len(sample["new_token_ids"]) == sample["num_new_tokens"] == 6  # a random model: no stop yet


def test_generation_stops_at_a_stop_id_of_the_folders_generation_config(chat_dir, tmp_path, capsys):
    _, free, _, _ = chat(capsys, tmp_path, chat_dir, "--prompt", MESSAGE, "--max_new_tokens", 6)
    ids = free["new_token_ids"]
    stop = ids[2]
    folder = tmp_path / "stops"
    shutil.copytree(chat_dir, folder)
    settings = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**settings, "eos_token_id": [50256, stop]}))
    code, sample, _, _ = chat(capsys, tmp_path, folder, "--prompt", MESSAGE, "--max_new_tokens", 6)
    assert code == 0 and sample["new_token_ids"] == ids[: ids.index(stop) + 1]


def test_the_templates_plain_text_end_of_turn_marker_is_a_stop_string():
    tokenizer = load_tokenizer(BUNDLED_GPT2)
    tokenizer.chat_template = CHATML.read_text()
    texts, marker = chat_prompts(tokenizer, [MESSAGE], None)
    assert marker == "<|im_end|>" and texts == [f"<|im_start|>user\n{MESSAGE}<|im_end|>\n<|im_start|>assistant\n"]


def test_a_folder_without_a_chat_template_is_one_line_and_exit_2(chat_dir, tmp_path, capsys):
    folder = tmp_path / "plain"
    shutil.copytree(chat_dir, folder)
    (folder / "chat_template.jinja").unlink()
    code, _, out, err = chat(capsys, tmp_path, folder, "--prompt", MESSAGE)
    assert code == 2 and out == "" and len(err) == 1 and "no chat template" in err[0]


def test_system_without_chat_is_one_line_and_exit_2(chat_dir, capsys):
    assert main(["--model_path", str(chat_dir), "--system", SYSTEM]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--system" in err[0]
