"""Generation from an exported folder: `launch/generate.py` (from_pretrained + generate) and HF's pipeline.

The fixture model is tiny-moe (2 layers, learned positions, context 128) trained for 40 AdamW
steps on the fixture stories, then saved like an export: model, model code and tokenizer in
`run/hf`. Most tests call the CLI's `main(argv)` in-process and read its --json output; two run
the real script.
"""

import json
import shutil

import pytest
import torch
from launcher import FIXTURES, ROOT, check, python

from launch.generate import main
from moe_dist.train.data import SEPARATOR

GENERATE = ROOT / "launch" / "generate.py"
PROMPT = "Once upon a time"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder whose hf/ holds a briefly trained tiny-moe and its byte-level BPE (~3 s)."""
    from moe_dist import MoEConfig, MoEForCausalLM
    from moe_dist.train.data import build_tokenizer

    root = tmp_path_factory.mktemp("gen")
    stories = [s.strip() for s in (FIXTURES / "stories.txt").read_text().split(SEPARATOR) if s.strip()]
    tokenizer = build_tokenizer("train:512", stories, root / "tokenizer")
    torch.manual_seed(0)
    config = MoEConfig.from_preset(
        "tiny-moe",
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = MoEForCausalLM(config).train()
    ids = tokenizer(SEPARATOR.join(stories), add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(ids[: len(ids) // 65 * 65]).view(-1, 65)  # shape: (N, seq 64 + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        batch = blocks[torch.randint(len(blocks), (16,))]
        model(input_ids=batch[:, :-1], shift_labels=batch[:, 1:], use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(root / "hf")  # what the exporter writes: config, weights, model code, tokenizer
    tokenizer.save_pretrained(root / "hf")
    return root


@pytest.fixture(scope="module")
def hf_dir(run_dir):
    return run_dir / "hf"


def generate(capsys, tmp_path, model_path, *args):
    """main() in-process: (exit code, samples from --json, stderr lines)."""
    out = tmp_path / f"samples-{len(list(tmp_path.iterdir()))}.json"
    code = main(["--model_path", str(model_path), "--device", "cpu", "--json", str(out), *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, json.loads(out.read_text())["samples"] if code == 0 else None, err


def texts(samples):
    return [s["text"] for s in samples]


def test_real_script_prints_every_sample_of_every_prompt_from_a_run_folder(run_dir, tmp_path):
    out = tmp_path / "samples.json"
    proc = check(
        python(
            GENERATE,
            [
                "--model_path",
                str(run_dir),
                "--prompt",
                PROMPT,
                "--prompt",
                "Sam was",
                "--num_samples",
                "2",
                "--temperature",
                "1.0",
                "--max_new_tokens",
                "30",
                "--json",
                str(out),
            ],
        )
    )
    record = json.loads(out.read_text())
    assert record["model_dir"] == str(run_dir / "hf")  # a run folder means its hf/ export
    assert [(s["prompt_index"], s["sample_index"]) for s in record["samples"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for s in record["samples"]:
        assert s["text"] == s["prompt"] + s["continuation"] and 1 <= s["num_new_tokens"] <= 30
        assert f"sample {s['sample_index'] + 1}/2" in proc.stdout and s["text"] in proc.stdout
    assert proc.stdout.count("=== prompt ") == 4


def test_greedy_output_is_deterministic(capsys, tmp_path, hf_dir):
    runs = [
        generate(capsys, tmp_path, hf_dir, "--prompt", PROMPT, "--temperature", 0, "--seed", seed) for seed in (0, 1)
    ]
    assert runs[0][0] == 0 and texts(runs[0][1]) == texts(runs[1][1])
    assert runs[0][1][0]["num_new_tokens"] > 0


def test_sampling_is_reproducible_with_the_same_seed_and_varies_with_another(capsys, tmp_path, hf_dir):
    def sample(seed):
        return texts(
            generate(
                capsys,
                tmp_path,
                hf_dir,
                "--prompt",
                PROMPT,
                "--temperature",
                1.0,
                "--num_samples",
                4,
                "--max_new_tokens",
                40,
                "--seed",
                seed,
            )[1]
        )

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert len(set(first)) > 1  # the samples of one prompt differ from each other too


@pytest.mark.parametrize("flag,value", [("--top_k", 1), ("--top_p", 1e-6)])
def test_sampling_restricted_to_the_top_token_equals_greedy(capsys, tmp_path, hf_dir, flag, value):
    greedy = generate(capsys, tmp_path, hf_dir, "--prompt", PROMPT, "--temperature", 0, "--max_new_tokens", 40)[1]
    sampled = generate(
        capsys,
        tmp_path,
        hf_dir,
        "--prompt",
        PROMPT,
        "--temperature",
        1.0,
        flag,
        value,
        "--max_new_tokens",
        40,
        "--seed",
        3,
    )[1]
    assert texts(sampled) == texts(greedy)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_repetition_penalty_changes_the_output(capsys, tmp_path, hf_dir, temperature):
    prompt = "Sam was a little mouse. Sam was a little mouse. Sam"
    plain, penalised = (
        texts(
            generate(
                capsys,
                tmp_path,
                hf_dir,
                "--prompt",
                prompt,
                "--temperature",
                temperature,
                "--num_samples",
                1 if temperature == 0 else 4,
                "--max_new_tokens",
                30,
                "--repetition_penalty",
                penalty,
            )[1]
        )
        for penalty in (1.0, 2.0)
    )
    assert plain != penalised


def test_batched_prompts_of_different_lengths_continue_as_they_do_alone(hf_dir):
    from moe_dist.generation import build_generation_config, load_model, load_tokenizer_for_generation
    from moe_dist.generation import generate as generate_samples

    model, tokenizer = load_model(hf_dir, torch.device("cpu")), load_tokenizer_for_generation(hf_dir)
    config = build_generation_config(
        tokenizer, max_new_tokens=30, temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0, num_samples=1
    )
    prompts = ["Sam", "Once upon a time, there was a happy dog named Sam. They looked under the trees", ""]
    batched = generate_samples(model, tokenizer, prompts, config, seed=0, batch_size=3)
    alone = [generate_samples(model, tokenizer, [p], config, seed=0)[0] for p in prompts]
    assert [(s.continuation, s.num_new_tokens) for s in batched] == [(s.continuation, s.num_new_tokens) for s in alone]
    assert len({s.num_new_tokens for s in alone}) > 1  # rows stopped at eos at different steps


def _greedy_without_cache(model, tokenizer, prompts, new_tokens):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(
        **batch, max_new_tokens=new_tokens, do_sample=False, use_cache=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def test_trained_model_decodes_the_same_with_and_without_the_cache_and_logs_no_deprecation(hf_dir, caplog):
    # transformers 5.24 passes the cache as `cache=`; a model that only read `past_key_values`
    # decoded every step without context, which only a trained model shows as different text.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moe_dist  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
    for prompts in ([PROMPT], [PROMPT, "Sam was", "The little dog"]):  # one prompt; a left-padded batch
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        with caplog.at_level("WARNING", logger="transformers"):
            cached = model.generate(
                **batch, max_new_tokens=30, do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id
            )
        assert tokenizer.batch_decode(cached, skip_special_tokens=True) == _greedy_without_cache(
            model, tokenizer, prompts, 30
        )
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]


def test_pipeline_and_cli_equal_the_greedy_continuation_without_cache(capsys, tmp_path, hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    import moe_dist  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
    reference = _greedy_without_cache(model, tokenizer, [PROMPT], 30)[0]
    pipe = pipeline("text-generation", model=str(hf_dir), tokenizer=str(hf_dir), device="cpu")
    assert pipe(PROMPT, max_new_tokens=30, do_sample=False)[0]["generated_text"] == reference
    cli = generate(capsys, tmp_path, hf_dir, "--prompt", PROMPT, "--temperature", 0, "--max_new_tokens", 30)[1]
    assert cli[0]["text"] == reference != PROMPT


def test_text_generation_pipeline_loads_the_exported_folder_and_matches_the_cli(capsys, tmp_path, hf_dir):
    from transformers import pipeline

    import moe_dist  # noqa: F401  (registers the Auto classes)

    pipe = pipeline("text-generation", model=str(hf_dir), tokenizer=str(hf_dir), device="cpu")
    out = pipe(PROMPT, max_new_tokens=30, do_sample=False)
    cli = generate(capsys, tmp_path, hf_dir, "--prompt", PROMPT, "--temperature", 0, "--max_new_tokens", 30)[1]
    assert out[0]["generated_text"] == cli[0]["text"] != PROMPT


def test_prompt_file_splits_on_separator_lines_and_otherwise_on_lines(tmp_path):
    from moe_dist.generation import read_prompt_file

    (tmp_path / "lines.txt").write_text("Once upon a time\n\nSam was\n")
    (tmp_path / "stories.txt").write_text(f"Once upon a time.\nThe end\n{SEPARATOR}\nSam was\n{SEPARATOR}\n")
    assert read_prompt_file(tmp_path / "lines.txt") == ["Once upon a time", "Sam was"]
    assert read_prompt_file(tmp_path / "stories.txt") == ["Once upon a time.\nThe end", "Sam was"]


def test_prompt_plus_new_tokens_past_the_context_is_clamped_with_a_warning(capsys, tmp_path, hf_dir):
    from moe_dist.generation import load_tokenizer_for_generation, prompt_lengths

    # A prompt two tokens short of the context: learned positions have no row past it, so a
    # third new token would crash inside the model if the CLI did not clamp.
    context = json.loads((hf_dir / "config.json").read_text())["max_position_embeddings"]
    tokenizer = load_tokenizer_for_generation(hf_dir)
    ids = tokenizer((FIXTURES / "stories.txt").read_text().replace(SEPARATOR, ""))["input_ids"]
    prompt = tokenizer.decode(ids[: context - 2])
    room = context - prompt_lengths(tokenizer, [prompt])[0]
    code, samples, err = generate(
        capsys, tmp_path, hf_dir, "--prompt", prompt, "--max_new_tokens", 50, "--temperature", 0
    )
    assert code == 0 and 1 <= room <= 3
    assert err == [
        f"warning: the longest prompt is {context - room} tokens and the context is {context}: "
        f"--max_new_tokens 50 clamped to {room}"
    ]
    assert samples[0]["num_new_tokens"] <= room


@pytest.mark.parametrize(
    "make_path,args,expected",
    [
        (lambda run: run / "tokenizer", [], "no model here (no config.json in it or in its hf/)"),
        (lambda run: run / "checkpoints", [], "does not exist"),
        (lambda run: run / "hf" / "config.json", [], "is not a folder"),
        (lambda run: run / "hf", ["--prompt", "Sam and Kai " * 80], "the model's context is 128 tokens"),
        (lambda run: run / "hf", ["--temperature", 0, "--num_samples", 2], "greedy decoding"),
        (lambda run: run / "hf", ["--top_p", 0], "--top_p 0.0: must be in (0, 1]"),
        (lambda run: run / "hf", ["--device", "tpu"], "expected auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, run_dir, make_path, args, expected):
    code, _, err = generate(capsys, tmp_path, make_path(run_dir), *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


@pytest.mark.parametrize(
    "break_folder,expected",
    [
        (lambda d: (d / "model.safetensors").unlink(), "config.json but no weights"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json' is not a valid JSON file"),
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
            "SafetensorError",
        ),
    ],
)
def test_a_broken_model_folder_exits_2_with_one_line(capsys, tmp_path, hf_dir, break_folder, expected):
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    break_folder(broken)
    code, _, err = generate(capsys, tmp_path, broken)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --model_path ") and expected in err[0], err


def test_real_script_without_a_gpu_refuses_device_cuda_with_one_line(hf_dir):
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this holds on a GPU machine too.
    proc = python(GENERATE, ["--model_path", str(hf_dir), "--device", "cuda"], env={"CUDA_VISIBLE_DEVICES": ""})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --device cuda: "), proc.stderr
    assert "use --device cpu or auto" in lines[0] and proc.stdout == ""
