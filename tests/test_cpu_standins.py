"""CPU stand-ins for multi-node and multi-GPU layouts, through the real launchers.

Two "nodes" are two `torchrun --nnodes 2 --nproc_per_node 1 --node_rank i` processes on localhost,
so each rank has LOCAL_RANK 0 while its global rank is 0 or 1: the mapping a second machine gives.

Every run here is tiny (seq_len 32, at most 6 steps, dropless, no router losses) and compares with
one of two shared runs, to keep the suite's time budget: the 2-rank EP=2 reference, and one process
with the same global batch. A constant learning rate (no warmup, min_lr_ratio 1) makes the schedule
independent of --max_steps, so a run stopped at step 4 and resumed to 6 must give the reference's
six losses.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from launcher import CPU_EP1, CPU_EP2, DATA_ARGS, ROOT, TRAIN, _env, check, deepspeed, metrics, python, truncate_run

from moe_dist.parallel.process_group import free_port

pytestmark = pytest.mark.multirank

STEPS = 6
SMALL = [
    "--model",
    "tiny-moe",
    *DATA_ARGS,
    "--seq_len",
    "32",
    "--max_valid_blocks",
    "16",
    "--dropless",
    # The Switch aux loss and the z-loss are statistics of each micro-batch: with them, 4 ranks
    # x 4 sequences cannot match 2 ranks x 8. Off, so that every layout below must agree exactly.
    "--aux_loss_coef",
    "0",
    "--z_loss_coef",
    "0",
    "--eval_every",
    "100",
    "--save_every",
    "4",
    "--log_every",
    "1",
    "--keep_last",
    "5",
    "--lr",
    "2e-3",
    "--warmup_steps",
    "0",
    "--min_lr_ratio",
    "1.0",
]


def two_nodes(args_per_node: list[list[str]], *, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """`launch/train.py` on two torchrun "nodes" (one rank each) on localhost; each node's own args."""
    torchrun = Path(sys.executable).parent / "torchrun"
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                str(torchrun),
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                str(TRAIN),
                *args,
            ],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node, args in enumerate(args_per_node)
    ]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


def check_nodes(procs: list[subprocess.CompletedProcess]) -> None:
    for node, proc in enumerate(procs):
        try:
            check(proc)
        except AssertionError as e:
            raise AssertionError(f"node {node}: {e}") from None


def losses(run: Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in metrics(run).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """`deepspeed --num_gpus 2`, EP=2, six steps, checkpoints at 4 and 6: what every layout must match."""
    run = tmp_path_factory.mktemp("standin") / "ref"
    check(deepspeed(TRAIN, ["--deepspeed", CPU_EP2, *SMALL, "--max_steps", str(STEPS), "--output_dir", str(run)]))
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    return run


def test_two_nodes_train_resume_and_export_like_one_node(reference, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    import moe_dist  # noqa: F401  (registers the model class with the Auto classes)

    run = tmp_path / "run"
    args = ["--deepspeed", CPU_EP2, *SMALL, "--output_dir", str(run)]
    check_nodes(two_nodes([[*args, "--max_steps", "4"]] * 2))
    assert (run / "checkpoints" / "step00000004").is_dir()
    resumed = two_nodes([[*args, "--max_steps", str(STEPS)]] * 2)
    check_nodes(resumed)
    assert "resumed from " in resumed[0].stderr and "(step 4)" in resumed[0].stderr
    want, got = losses(reference), losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert abs(want[step] - got[step]) <= 1e-6, (step, want[step], got[step])
    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_run_folder_not_shared_by_every_node_stops_every_rank_with_one_line(tmp_path):
    common = ["--deepspeed", CPU_EP2, *SMALL, "--max_steps", "2"]
    nodes = two_nodes([[*common, "--output_dir", str(tmp_path / f"node{n}")] for n in range(2)], timeout=180)
    # Each torchrun agent reports its worker's status 2 (torchrun itself exits 1, with its own report).
    # On failure: each node's exit status and torchrun's per-worker report lines (one CI run saw a node without
    # "exitcode  : 2"; the truncated message did not say which node or what status it had instead).
    report = [
        (
            n,
            p.returncode,
            [
                line
                for line in p.stderr.splitlines()
                if "exitcode" in line or "error_file" in line or "traceback" in line
            ],
            p.stderr[-600:],
        )
        for n, p in enumerate(nodes)
    ]
    assert all(p.returncode != 0 and "exitcode  : 2" in p.stderr for p in nodes), report
    out = "".join(p.stdout + p.stderr for p in nodes)
    line = (
        f"error: --output_dir {tmp_path / 'node0'} is not shared by every rank: rank 0 cannot see ranks [1]; "
        "put it on storage every node sees"
    )
    assert out.count("is not shared by every rank") == 1, out[-3000:]
    assert line in out
    assert f'File "{ROOT / "moe_dist"}' not in out  # no traceback from the trainer, only torchrun's report
    # Rank 0 stopped before preparing any data, so nothing but the empty marker folder is there.
    assert not (tmp_path / "node0" / "cache").exists() and not (tmp_path / "node0" / "checkpoints").exists()


def test_deepspeed_ep2_run_resumes_at_deepspeed_ep1_on_one_process(reference, tmp_path):
    run = tmp_path / "run"
    truncate_run(reference, run, keep_step=4)
    proc = check(python(TRAIN, ["--deepspeed", CPU_EP1, *SMALL, "--max_steps", str(STEPS), "--output_dir", str(run)]))
    assert (
        "resharded step00000004 from deepspeed EP=2 on 2 rank(s) to deepspeed EP=1 on 1 rank(s); "
        "optimizer state carried over" in proc.stderr
    )
    want, got = losses(reference), losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in (5, 6):
        assert math.isfinite(got[step]) and abs(want[step] - got[step]) <= 1e-5, (step, want[step], got[step])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The same global batch (16 sequences: micro-batch 8 x accumulation 2) on one process, EP=1,
    for 4 steps: what the expert-data-parallel layouts below must reproduce."""
    run = tmp_path_factory.mktemp("one") / "run"
    check(python(TRAIN, ["--deepspeed", CPU_EP1, *SMALL, "--max_steps", "4", "--output_dir", str(run)]))
    return run


def _world4(tmp_path_factory, zero_stage: int) -> Path:
    """4 ranks at EP=2 (each expert on 2 ranks: expert-data-parallel replicas), micro-batch 4: the
    same global batch of 16 sequences, for 4 steps (checkpoint and export at 4)."""
    tmp = tmp_path_factory.mktemp(f"world4_zero{zero_stage}")
    ds = json.loads(Path(CPU_EP2).read_text())
    ds["train_micro_batch_size_per_gpu"] = 4
    ds["zero_optimization"]["stage"] = zero_stage
    (tmp / "ds.json").write_text(json.dumps(ds))
    run = tmp / "run"
    check(
        deepspeed(
            TRAIN, ["--deepspeed", str(tmp / "ds.json"), *SMALL, "--max_steps", "4", "--output_dir", str(run)], ranks=4
        )
    )
    return run


@pytest.fixture(scope="module")
def world4_zero1(tmp_path_factory) -> Path:
    return _world4(tmp_path_factory, 1)


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> Path:
    return _world4(tmp_path_factory, 2)


@pytest.mark.parametrize("layout", ["world4_zero1", "world4"])
def test_expert_replicas_on_4_ranks_train_like_one_process(layout, one_process, reference, request):
    from safetensors.torch import load_file

    replicas = request.getfixturevalue(layout)
    want, got = losses(one_process), losses(replicas)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in got:
        assert abs(want[step] - got[step]) <= 1e-5, (step, want[step], got[step])
        assert abs(losses(reference)[step] - got[step]) <= 1e-5, step  # and like 2 ranks at EP=2
    a, b = load_file(one_process / "hf" / "model.safetensors"), load_file(replicas / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and any(".experts." in k for k in a)
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-5, name


def test_world_4_run_resumes_on_2_ranks_at_the_same_ep_size(reference, world4, tmp_path):
    run = tmp_path / "run"
    truncate_run(world4, run, keep_step=4)
    args = ["--deepspeed", CPU_EP2, *SMALL, "--max_steps", str(STEPS), "--output_dir", str(run)]
    proc = check(deepspeed(TRAIN, args))
    assert "step00000004" in proc.stderr and "(step 4)" in proc.stderr
    want, got = losses(reference), losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in (5, 6):
        assert abs(want[step] - got[step]) <= 1e-5, (step, want[step], got[step])
