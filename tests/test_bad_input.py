"""Bad input ends the run early with exit status 2 and one line naming the field and what is valid.

These mistakes are all caught while planning, before any process group or model exists, so
most tests call the CLI in-process; one runs the real script to pin the exit status.
"""

import json
import re

import pytest
from launcher import CPU_EP2, DATA_ARGS, FIXTURES, TRAIN, python

from moe_dist.train.cli import main


def run_cli(capsys, args, tmp_path):
    code = main([*args, "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def write_json(tmp_path, payload, name="ds.json"):
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return str(path)


def ds_json(**changes):
    config = json.loads(open(CPU_EP2).read())
    config.update(changes)
    return config


@pytest.mark.parametrize(
    "make_path,expected",
    [
        (lambda tmp: str(tmp / "missing.json"), r"missing\.json: does not exist"),
        (lambda tmp: write_json(tmp, "{not json"), r"not valid JSON"),
        (lambda tmp: str(tmp), r"is a directory"),
        (lambda tmp: write_json(tmp, ds_json(zero_optimization={"stage": 3})), r"stage=3 is not supported.*ZeRO-3"),
        (
            lambda tmp: write_json(tmp, ds_json(zero_optimization={"stage": 2, "overlap_com": True})),
            r"unknown zero_optimization key\(s\) \['overlap_com'\]",
        ),
        (lambda tmp: write_json(tmp, {k: v for k, v in ds_json().items() if k != "moe"}), r'missing "moe"'),
        (lambda tmp: write_json(tmp, ds_json(optimizer={"type": "Adam"})), r"remove the 'optimizer' block"),
        (
            lambda tmp: write_json(
                tmp, ds_json(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})
            ),
            r"zero_optimization\.offload_optimizer is not supported: .*CPU tensor over NCCL",
        ),
        (
            lambda tmp: write_json(tmp, ds_json(zero_optimization={"stage": 2, "offload_param": {"device": "nvme"}})),
            r"zero_optimization\.offload_param is not supported",
        ),
    ],
)
def test_bad_deepspeed_json_is_refused_with_one_line(capsys, tmp_path, make_path, expected):
    code, err = run_cli(capsys, ["--deepspeed", make_path(tmp_path), *DATA_ARGS], tmp_path)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: ")
    assert re.search(expected, err[0]), err[0]


def test_ep_size_must_divide_the_world_size(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, err = run_cli(capsys, ["--deepspeed", CPU_EP2, *DATA_ARGS], tmp_path)
    assert code == 2 and "moe.ep_size=2 does not divide the world size 3" in err[0] and "[1, 3]" in err[0]


def test_ep_size_must_divide_the_number_of_experts(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = run_cli(capsys, ["--deepspeed", CPU_EP2, "--num_experts", "3", *DATA_ARGS], tmp_path)
    assert code == 2 and "moe.ep_size=2 does not divide num_experts=3" in err[0]


def test_invalid_model_config_names_field_and_range(capsys, tmp_path):
    code, err = run_cli(capsys, ["--num_experts", "4", "--top_k", "5", *DATA_ARGS], tmp_path)
    assert code == 2 and "num_experts_per_tok=5" in err[0] and "[1, num_local_experts=4]" in err[0]


def test_unknown_preset_lists_the_valid_ones(capsys, tmp_path):
    code, err = run_cli(capsys, ["--model", "tiny-mo", *DATA_ARGS], tmp_path)
    assert code == 2 and "unknown preset 'tiny-mo'" in err[0] and "tiny-moe" in err[0]


@pytest.mark.parametrize("flag", ["--train_file", "--valid_file"])
def test_missing_data_file_is_named(capsys, tmp_path, flag):
    args = dict(zip(DATA_ARGS[::2], DATA_ARGS[1::2]), **{flag: str(tmp_path / "nope.txt")})
    code, err = run_cli(capsys, [x for kv in args.items() for x in kv], tmp_path)
    assert code == 2 and f"{flag} {tmp_path / 'nope.txt'} does not exist" in err[0]


def test_corpus_of_only_separators_is_empty(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("<|endoftext|>\n\n<|endoftext|>\n")
    args = ["--train_file", str(empty), "--valid_file", str(FIXTURES / "stories_valid.txt"), "--tokenizer", "train:512"]
    code, err = run_cli(capsys, args, tmp_path)
    assert code == 2 and "is empty" in err[0] and "--train_file" in err[0]


def test_tokenizer_larger_than_the_model_vocabulary(capsys, tmp_path):
    code, err = run_cli(capsys, [*DATA_ARGS[:4], "--tokenizer", "train:2048", "--vocab_size", "1024"], tmp_path)
    assert code == 2 and "makes 2048 tokens but the model's vocab_size is 1024" in err[0]


def test_max_steps_zero_is_refused(capsys, tmp_path):
    code, err = run_cli(capsys, [*DATA_ARGS, "--max_steps", "0"], tmp_path)
    assert code == 2 and "--max_steps=0 is invalid: must be >= 1" in err[0]


@pytest.mark.parametrize(
    "flag,value,valid",
    [
        ("--lr", "-1", "[0, inf)"),
        ("--weight_decay", "-1", "[0, inf)"),
        ("--beta1", "1.5", "[0, 1)"),
        ("--beta2", "1", "[0, 1)"),
        ("--adam_eps", "0", "(0, inf)"),
        ("--min_lr_ratio", "2", "[0, 1]"),
        ("--lr", "nan", "[0, inf)"),
    ],
)
def test_impossible_optimizer_setting_names_flag_value_and_range(capsys, tmp_path, flag, value, valid):
    code, err = run_cli(capsys, [*DATA_ARGS, flag, value], tmp_path)
    assert code == 2 and len(err) == 1
    assert err[0] == f"error: {flag}={float(value):g} is invalid: must be in {valid}"


def test_fp16_on_the_accelerate_path_is_refused_not_ignored(capsys, tmp_path, monkeypatch):
    code, err = run_cli(capsys, [*DATA_ARGS, "--precision", "fp16"], tmp_path)
    assert code == 2 and len(err) == 1 and "--precision='fp16' is invalid" in err[0] and "bf16 or fp32" in err[0]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch --mixed_precision fp16
    code, err = run_cli(capsys, DATA_ARGS, tmp_path)
    assert code == 2 and len(err) == 1 and "ACCELERATE_MIXED_PRECISION=fp16" in err[0]


def test_zero_offload_switched_off_is_accepted(tmp_path):
    from moe_dist.parallel.ds_config import load_deepspeed_config

    path = write_json(tmp_path, ds_json(zero_optimization={"stage": 2, "offload_optimizer": {"device": "none"}}))
    assert load_deepspeed_config(path, world_size=2).zero_stage == 2


def test_output_dir_that_is_a_file_is_refused_and_left_alone(capsys, tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    code = main([*DATA_ARGS, "--output_dir", str(existing)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"--output_dir {existing} is an existing file" in err[0]
    assert existing.read_text() == "keep me"


def test_batch_flags_conflict_with_deepspeed_json(capsys, tmp_path):
    code, err = run_cli(capsys, ["--deepspeed", CPU_EP2, "--micro_batch_size", "4", *DATA_ARGS], tmp_path)
    assert code == 2 and "set batch" in err[0] and "DeepSpeed JSON" in err[0]


def test_the_real_script_exits_2_and_prints_one_line(tmp_path):
    proc = python(TRAIN, ["--deepspeed", str(tmp_path / "nope.json"), *DATA_ARGS, "--output_dir", str(tmp_path / "r")])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --deepspeed")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing half-written for the next launch to trip over


# ---- expert tensor parallelism: "moe": {"ep_size": P, "etp_size": T} ---------------------------------------


@pytest.mark.parametrize(
    "world,moe,extra,expected",
    [
        (4, {"ep_size": 2, "etp_size": 0}, [], r"moe\.etp_size=0 is invalid: must be an integer >= 1"),
        (
            6,
            {"ep_size": 2, "etp_size": 3},
            [],
            r"moe\.etp_size=3 does not divide the expert width "
            r"moe_intermediate_size=512: valid etp_size values are \[1, 2, 4, ",
        ),
        (
            2,
            {"ep_size": 2, "etp_size": 2},
            [],
            r"moe\.ep_size x moe\.etp_size = 2 x 2 = 4 does not divide the world "
            r"size 2: with ep_size=2, valid etp_size values here are \[1\]",
        ),
        (
            6,
            {"ep_size": 3, "etp_size": 2},
            [],
            r"moe\.ep_size=3 does not divide num_experts=8: valid ep_size values "
            r"are \[1, 2, 4, 8\]",
        ),
        (
            2,
            {"ep_size": 1, "etp_size": 2},
            ["--model", "tiny-dense"],
            r"moe\.etp_size=2 slices experts, but this "
            r"model has none",
        ),
    ],
)
def test_bad_etp_layout_is_refused_with_one_line(capsys, tmp_path, monkeypatch, world, moe, extra, expected):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    path = write_json(tmp_path, ds_json(moe=moe))
    code, err = run_cli(capsys, ["--deepspeed", path, *DATA_ARGS, *extra], tmp_path)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert re.search(expected, err[0]), err[0]
    assert not (tmp_path / "run").exists()


def test_bad_etp_layout_through_the_real_script_exits_2_with_one_line(tmp_path):
    path = write_json(tmp_path, ds_json(moe={"ep_size": 2, "etp_size": 2}))
    proc = python(TRAIN, ["--deepspeed", path, *DATA_ARGS, "--output_dir", str(tmp_path / "r")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: moe.ep_size x moe.etp_size = 2 x 2 = 4 does not divide "
        "the world size 1: ep_size=2 alone does not fit; valid ep_size "
        "values here are [1]"
    )
    assert not (tmp_path / "r").exists()


# ---- generation with sliced experts: launch/generate.py --etp_size T ---------------------------------------


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    """{"moe": folder, "dense": folder}: random 2-layer models (expert width 128) with a trained BPE, as exported."""
    import torch

    from moe_dist import MoEConfig, MoEForCausalLM
    from moe_dist.train.data import build_tokenizer

    root = tmp_path_factory.mktemp("gen_exports")
    tokenizer = build_tokenizer("train:300", (FIXTURES / "stories_valid.txt").read_text().split("<|endoftext|>"), None)
    folders = {}
    for name, preset in (("moe", "tiny-moe"), ("dense", "tiny-dense")):
        torch.manual_seed(0)
        config = MoEConfig.from_preset(
            preset,
            vocab_size=len(tokenizer),
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=128,
            max_position_embeddings=64,
        )
        MoEForCausalLM(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders[name] = root / name
    return folders


@pytest.mark.parametrize(
    "export,etp,world,expected",
    [
        (
            "moe",
            3,
            "3",
            (
                "--etp_size 3 does not divide the expert width moe_intermediate_size=128: valid values are "
                "[1, 2, 4, 8, 16, 32, 64, 128]"
            ),
        ),
        (
            "moe",
            2,
            None,
            (
                "--etp_size 2 needs one rank per slice, but this launch has WORLD_SIZE=1: valid here is "
                "--etp_size 1; slice over 2 ranks with `deepspeed --num_gpus 2 launch/generate.py --etp_size 2"
            ),
        ),
        ("moe", 2, "4", "WORLD_SIZE=4: valid here is --etp_size 1 or 4;"),
        ("dense", 2, "2", "is a dense model (num_local_experts=0), it has no experts to slice; valid value: 1"),
        ("moe", 0, None, "--etp_size 0: must be >= 1"),
    ],
)
def test_bad_generate_etp_size_is_refused_with_one_line_before_any_process_group(
    capsys, monkeypatch, tiny_exports, export, etp, world, expected
):
    import torch.distributed as dist

    from launch.generate import main as generate_main

    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    code = generate_main(["--model_path", str(tiny_exports[export]), "--device", "cpu", "--etp_size", str(etp)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not dist.is_initialized()
