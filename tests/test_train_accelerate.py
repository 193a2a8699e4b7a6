"""The same trainer without a DeepSpeed engine: `python launch/train.py` through accelerate (EP=1),
its run folder, resume, and checkpoints that move between the two engines."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from launcher import ACCEL_ARGS, CPU_EP2, DATA_ARGS, STEPS, TRAIN, check, deepspeed, metrics, python

from moe_dist.train.cli import main
from moe_dist.train.logging_io import REQUIRED_SUMMARY_KEYS


def test_accelerate_run_trains_and_fills_the_run_folder_contract(accel_run):
    train = metrics(accel_run)
    assert np.mean([train[s]["loss"] for s in (STEPS - 2, STEPS - 1, STEPS)]) < train[1]["loss"] - 1.0
    summary = json.loads((accel_run / "summary.json").read_text())
    assert set(REQUIRED_SUMMARY_KEYS) <= set(summary)
    assert summary["engine"] == "accelerate" and summary["ep_size"] == 1 and summary["world_size"] == 1
    for path in (
        "metrics.jsonl",
        "tb",
        "checkpoints/latest",
        "checkpoints/best",
        "hf/config.json",
        "hf/model.safetensors",
        "hf/tokenizer.json",
        "tokenizer/tokenizer.json",
    ):
        assert (accel_run / path).exists(), path
    assert list((accel_run / "tb").glob("events.out.tfevents.*"))
    latest = accel_run / "checkpoints" / (accel_run / "checkpoints" / "latest").read_text()
    assert (latest / "accelerate" / "model.safetensors").is_file() and (latest / "MANIFEST.json").is_file()


def test_routing_is_dropless_by_default_on_one_device(accel_run):
    summary = json.loads((accel_run / "summary.json").read_text())
    assert summary["capacity_factor"] is None
    drops = [v for row in metrics(accel_run).values() for k, v in row.items() if k.endswith("drop_fraction")]
    assert drops and max(drops) == 0.0


def test_accelerate_resume_after_a_crash_matches_the_uninterrupted_run(accel_run, tmp_path):
    run_dir = tmp_path / "run"
    crashed = python(TRAIN, [*ACCEL_ARGS, "--output_dir", str(run_dir)], env={"MOE_DIST_FAULT": "exit@after_step:12"})
    assert crashed.returncode != 0
    resumed = check(python(TRAIN, [*ACCEL_ARGS, "--output_dir", str(run_dir)]))
    assert re.search(r"resumed from .*step00000012 \(step 12\)", resumed.stderr + resumed.stdout)
    straight, again = metrics(accel_run), metrics(run_dir)
    for step in range(13, STEPS + 1):
        assert abs(again[step]["loss"] - straight[step]["loss"]) <= 1e-5, step


def _first_loss(run_dir: Path) -> float:
    return metrics(run_dir)[1]["loss"]


@pytest.mark.multirank
def test_a_deepspeed_export_continues_training_on_accelerate(ep2_run, accel_run, tmp_path):
    run_dir = tmp_path / "from_ep2"
    check(
        python(
            TRAIN,
            [
                "--init_from",
                str(ep2_run / "hf"),
                *DATA_ARGS[:4],
                "--max_steps",
                "4",
                "--eval_every",
                "4",
                "--warmup_steps",
                "1",
                "--lr",
                "1e-4",
                "--output_dir",
                str(run_dir),
            ],
        )
    )
    # It starts where the EP=2 run ended, not from scratch, and keeps its tokenizer.
    assert _first_loss(run_dir) < _first_loss(accel_run) - 1.5
    assert (run_dir / "tokenizer" / "tokenizer.json").read_text() == (ep2_run / "hf" / "tokenizer.json").read_text()


@pytest.mark.multirank
def test_an_accelerate_export_continues_training_on_deepspeed_ep2(accel_run, tmp_path):
    run_dir = tmp_path / "from_accel"
    check(
        deepspeed(
            TRAIN,
            [
                "--deepspeed",
                CPU_EP2,
                "--init_from",
                str(accel_run / "hf"),
                *DATA_ARGS[:4],
                "--max_steps",
                "4",
                "--eval_every",
                "4",
                "--warmup_steps",
                "1",
                "--lr",
                "1e-4",
                "--output_dir",
                str(run_dir),
            ],
        )
    )
    assert _first_loss(run_dir) < _first_loss(accel_run) - 1.5
    assert json.loads((run_dir / "summary.json").read_text())["ep_size"] == 2


def test_resuming_an_accelerate_folder_with_deepspeed_is_refused(accel_run, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["--deepspeed", CPU_EP2, "--model", "tiny-moe", *DATA_ARGS, "--output_dir", str(accel_run)])
    err = capsys.readouterr().err
    assert code == 2
    assert "holds a accelerate run; this command uses deepspeed" in err and "--init_from" in err


def test_resuming_a_deepspeed_folder_without_deepspeed_is_refused(ep2_run, capsys):
    code = main(["--model", "tiny-moe", *DATA_ARGS, "--output_dir", str(ep2_run)])
    assert code == 2 and "add --deepspeed" in capsys.readouterr().err


def test_a_folder_holding_a_different_model_is_refused(accel_run, capsys):
    code = main(["--model", "tiny-dense", *DATA_ARGS, "--output_dir", str(accel_run)])
    err = capsys.readouterr().err
    assert code == 2 and "holds a run of a different model" in err and "num_local_experts: 8 -> 0" in err
    assert "new --output_dir" in err


@pytest.mark.multirank
def test_accelerate_launch_with_two_processes_is_plain_data_parallel(tmp_path):
    launcher = Path(sys.executable).parent / "accelerate"
    run_dir = tmp_path / "ddp"
    # --multi_gpu selects accelerate's torchrun launcher; on a CPU-only machine it runs gloo data parallel.
    proc = check(
        python(
            launcher,
            [
                "launch",
                "--multi_gpu",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                str(TRAIN),
                *ACCEL_ARGS[:-8],
                "--max_steps",
                "6",
                "--eval_every",
                "6",
                "--save_every",
                "6",
                "--output_dir",
                str(run_dir),
            ],
        )
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ep_size"] == 1 and summary["engine"] == "accelerate", proc.stdout
    assert summary["tokens_per_step"] == 2 * 8 * 128
