"""Atomic checkpoints under real faults: ranks SIGKILLed mid-save, truncated and corrupted files.

The reference is the shared uninterrupted EP=2 run (`ep2_run`, 24 steps; it saves at 8,
12, 16 and 24: improved evals at 8/16/24, --save_every 12). Every relaunch is the same command.
"""

import json
import re
import shutil

import pytest
from launcher import ACCEL_ARGS, EP2_ARGS, STEPS, TRAIN, check, deepspeed, metrics, python

from moe_dist.train.checkpoint import CheckpointError, CheckpointStore, verify

pytestmark = [pytest.mark.faults, pytest.mark.multirank]


def resumed_from(proc) -> int | None:
    found = re.search(r"resumed from \S+step(\d{8}) \(step \d+\)", proc.stdout + proc.stderr)
    return int(found.group(1)) if found else None


def test_sigkill_during_saves_resumes_from_the_last_complete_checkpoint(ep2_run, tmp_path):
    run, args = tmp_path / "run", [*EP2_ARGS, "--output_dir", str(tmp_path / "run")]
    ckpts = run / "checkpoints"

    # 1. Rank 0 dies after the step-12 staging folder exists, before any shard is written.
    first = deepspeed(TRAIN, args, env={"MOE_DIST_FAULT": "kill@save_begin:12:0"})
    assert first.returncode != 0
    assert (ckpts / "step00000012.partial").is_dir() and (ckpts / "latest").read_text() == "step00000008"

    # 2. Rank 1 dies between expert files of the step-12 save (after its 3rd file).
    second = deepspeed(TRAIN, args, env={"MOE_DIST_FAULT": "kill@save_file:3:1"})
    assert second.returncode != 0 and resumed_from(second) == 8
    partial = ckpts / "step00000012.partial"
    assert 0 < len(list(partial.glob("layer_*_expert_*"))) < 32  # some expert files, not all

    # 3. Killed after every shard is written and sealed, before it is renamed and pointed at.
    third = deepspeed(TRAIN, args, env={"MOE_DIST_FAULT": "kill@before_commit:16:0"})
    assert third.returncode != 0 and resumed_from(third) == 8
    assert (ckpts / "step00000016.partial" / "MANIFEST.json").is_file()
    assert (ckpts / "latest").read_text() == "step00000012"

    # 4. Clean relaunch: takes step 12, the newest complete one, and matches the straight run.
    fourth = check(deepspeed(TRAIN, args))
    assert resumed_from(fourth) == 12
    straight, again = metrics(ep2_run), metrics(run)
    assert sorted(again) == list(range(1, STEPS + 1))
    for step in range(9, STEPS + 1):
        assert abs(again[step]["loss"] - straight[step]["loss"]) <= 1e-5, step
    assert not list(ckpts.glob("*.partial"))


def test_corrupted_latest_checkpoint_is_named_and_the_previous_one_is_used(ep2_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ep2_run, run)
    (run / "summary.json").unlink()
    latest = run / "checkpoints" / "step00000024"
    victim = latest / "layer_1_expert_5_mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the checksum can tell
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="layer_1_expert_5.*corrupted"):
        verify(latest)

    proc = check(deepspeed(TRAIN, [*EP2_ARGS, "--output_dir", str(run)]))
    out = proc.stdout + proc.stderr
    assert re.search(r"checkpoint file \S+layer_1_expert_5_mp_rank_00_model_states\.pt is corrupted", out)
    assert resumed_from(proc) == 16
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS


def test_no_intact_checkpoint_stops_with_one_line(accel_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(accel_run, run)
    for ckpt in (run / "checkpoints").glob("step*"):
        weights = ckpt / "accelerate" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])  # truncated
    proc = python(TRAIN, [*ACCEL_ARGS, "--output_dir", str(run)])
    assert proc.returncode == 2
    assert "model.safetensors is truncated" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no intact checkpoint in")


def test_retention_keeps_the_last_k_and_the_best_and_never_the_only_good_one(tmp_path):
    store = CheckpointStore(tmp_path, is_main=True, barrier=lambda: None)

    def save(step, best=False, keep_last=2):
        staging = store.begin(step)
        (staging / "weights.bin").write_bytes(bytes([step]) * 10)
        store.seal(staging)
        return store.publish(staging, best=best, keep_last=keep_last)

    save(1, best=True)
    for step in (2, 3, 4):
        save(step)
    assert [p.name for p in store.complete()] == ["step00000001", "step00000003", "step00000004"]
    assert store.pointer("best").name == "step00000001" and store.pointer("latest").name == "step00000004"
    save(5, keep_last=1)
    assert [p.name for p in store.complete()] == ["step00000001", "step00000005"]
    (store.root / "step00000005" / "weights.bin").write_bytes(b"x" * 10)  # corrupt the newest
    assert [p.name for p in store.candidates()] == ["step00000001"]
