"""One view of every setting: the table of values and sources that rank 0 prints and run.json keeps, and a flag that
contradicts the DeepSpeed JSON refused with one line."""

import json
import re

import pytest
from launcher import CPU_EP2, DATA_ARGS, TRAIN, check, deepspeed, python

from moe_dist.parallel.ds_config import ConfigError
from moe_dist.train.args import parse_args
from moe_dist.train.plan import plan_run

SHORT = ["--model", "tiny-moe", *DATA_ARGS, "--log_every", "1", "--warmup_steps", "1", "--max_steps", "2"]


def sources(tmp_path, *args, output="run") -> dict:
    plan = plan_run(*parse_args([*DATA_ARGS, *args, "--output_dir", str(tmp_path / output)]))
    names = [s.name for s in plan.settings]
    assert len(names) == len(set(names))  # run.json keys them by name
    return {s.name: (s.value, s.source) for s in plan.settings}


def test_an_accelerate_run_names_flags_presets_defaults_and_the_tokenizer(tmp_path):
    got = sources(tmp_path, "--model", "tiny-moe", "--micro_batch_size", "4", "--max_steps", "1000")
    assert got["preset"] == ("tiny-moe", "flag")
    assert got["micro_batch_size"] == (4, "flag")
    assert got["max_steps"] == (1000, "flag")  # typed at its default value: still the user's word
    assert got["grad_accum"] == (1, "default") and got["grad_clip"] == (1.0, "default")
    assert got["engine"] == ("accelerate", "default") and got["world_size"] == (1, "default")
    assert got["num_local_experts"][1] == "preset" and got["router_type"] == ("softmax", "default")
    assert got["capacity_factor"] == (None, "default")  # one device routes dropless
    assert got["vocab_size"] == (512, "tokenizer")  # train:512, rounded up to 64
    assert got["tokenizer"] == ("train:512", "flag") and got["seq_len"][1] == "default"
    assert "ep_size" not in got  # no DeepSpeed JSON, no expert parallelism


def test_a_deepspeed_run_names_the_json(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    got = sources(tmp_path, "--deepspeed", CPU_EP2, "--micro_batch_size", "8", "--num_experts", "4")
    assert got["engine"] == ("deepspeed", "flag") and got["world_size"] == (2, "env")
    assert got["ep_size"] == (2, "deepspeed json") and got["etp_size"] == (1, "default")
    assert got["zero_stage"] == (2, "deepspeed json")
    assert got["micro_batch_size"] == (8, "flag = deepspeed json")  # the flag repeats the JSON's value
    assert got["grad_clip"] == (1.0, "deepspeed json") and got["precision"] == ("fp32", "default")
    assert got["num_local_experts"] == (4, "flag") and got["preset"] == ("tiny-moe", "default")


@pytest.mark.parametrize(
    "flag,expected",
    [
        (["--micro_batch_size", "4"], r"micro_batch_size: --micro_batch_size 4 \(flag\) contradicts "),
        (["--grad_clip", "0.5"], r"grad_clip: --grad_clip 0.5 \(flag\) contradicts gradient_clipping 1.0 in "),
        (["--precision", "bf16"], r"precision: --precision bf16 \(flag\) contradicts .*DeepSpeed's default"),
    ],
)
def test_a_flag_that_contradicts_the_json_is_refused_naming_both(tmp_path, monkeypatch, flag, expected):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=expected):
        sources(tmp_path, "--deepspeed", CPU_EP2, *flag)


CONTRADICTION = (
    f"error: micro_batch_size: --micro_batch_size 4 (flag) contradicts train_micro_batch_size_per_gpu 8 in "
    f"{CPU_EP2}; give one (with --deepspeed, set batch, accumulation, clipping and precision in the DeepSpeed JSON)"
)


def test_the_real_script_refuses_a_contradiction_with_one_line_and_exit_2(tmp_path):
    run_dir = tmp_path / "run"
    proc = python(TRAIN, [*SHORT, "--deepspeed", CPU_EP2, "--micro_batch_size", "4", "--output_dir", str(run_dir)])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [CONTRADICTION], proc.stderr
    assert not run_dir.exists()


@pytest.mark.multirank
def test_the_deepspeed_launcher_refuses_a_contradiction_with_one_line_and_exit_2(tmp_path):
    run_dir = tmp_path / "run"
    proc = deepspeed(TRAIN, [*SHORT, "--deepspeed", CPU_EP2, "--micro_batch_size", "4", "--output_dir", str(run_dir)])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and errors == [CONTRADICTION] and "Traceback" not in proc.stdout + proc.stderr
    assert not run_dir.exists()


def test_the_log_and_run_json_hold_the_table_an_old_run_json_resumes_and_its_export_starts_the_next(tmp_path):
    run_dir = tmp_path / "run"
    first = check(python(TRAIN, [*SHORT, "--output_dir", str(run_dir)]))
    table = first.stdout[first.stdout.index("settings (group, name, value, source):") :]
    assert re.search(r"\n  engine +micro_batch_size +8 +default\n", table)
    assert re.search(r"\n  run +max_steps +2 +flag\n", table)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["settings"]["max_steps"] == {"value": 2, "source": "flag"}
    assert record["settings"]["vocab_size"]["source"] == "tokenizer"

    del record["settings"]  # as a run.json written before the table existed
    (run_dir / "run.json").write_text(json.dumps(record, indent=1))
    resumed = check(python(TRAIN, [*SHORT[:-1], "3", "--output_dir", str(run_dir)]))
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert json.loads((run_dir / "run.json").read_text())["settings"]["max_steps"]["value"] == 3

    # The run's export as the next run's start: the folder's config.json is the model, a routing flag wins over it.
    got = sources(tmp_path, "--init_from", str(run_dir), "--capacity_factor", "2.0", output="next")
    assert got["init_from"] == (str(run_dir / "hf"), "flag") and "preset" not in got
    assert got["hidden_size"][1] == "init_from config" and got["vocab_size"] == (512, "init_from config")
    assert got["capacity_factor"] == (2.0, "flag")
