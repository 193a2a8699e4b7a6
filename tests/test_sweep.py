"""`launch/sweep.py`: grids as train.py commands, resumable runs, failures reported at the end.

The end-to-end tests run two real tiny runs of the strategy grid on the accelerate path
(plain python), three times: interrupted by an injected crash, resumed, then skipped.
"""

import json
import re

import pytest
from launcher import DATA_ARGS, ROOT, check, python

SWEEP = ROOT / "launch" / "sweep.py"
RUNS = ("moe-e4-top1", "moe-e4-random2")
STEPS, CRASH_AFTER = 4, 2
SWEEP_ARGS = [
    "--grid",
    "strategy",
    "--scale",
    "tiny",
    "--only",
    ",".join(RUNS),
    "--",
    *DATA_ARGS,
    "--max_steps",
    str(STEPS),
    "--eval_every",
    "2",
    "--save_every",
    "2",
    "--log_every",
    "1",
    "--seq_len",
    "32",
    "--micro_batch_size",
    "4",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Crash every run after step 2 (its checkpoint is saved), re-run the sweep, then run it once more."""
    runs_dir = tmp_path_factory.mktemp("sweep")
    args = ["--runs_dir", str(runs_dir), *SWEEP_ARGS]
    grid_dir = runs_dir / "strategy"
    crashed = python(SWEEP, args, env={"MOE_DIST_FAULT": f"exit@after_step:{CRASH_AFTER}"})
    finished_after_crash = [name for name in RUNS if (grid_dir / name / "summary.json").exists()]
    resumed = check(python(SWEEP, args))
    before = {name: _fingerprint(grid_dir / name) for name in RUNS}
    again = check(python(SWEEP, args))
    after = {name: _fingerprint(grid_dir / name) for name in RUNS}
    return dict(
        grid_dir=grid_dir,
        crashed=crashed,
        finished_after_crash=finished_after_crash,
        resumed=resumed,
        again=again,
        before=before,
        after=after,
    )


def _fingerprint(run_dir):
    """What a started run would change: summary.json's mtime, and the metrics and log contents."""
    return (
        (run_dir / "summary.json").stat().st_mtime_ns,
        (run_dir / "metrics.jsonl").read_text(),
        (run_dir / "train.log").read_text(),
    )


def test_a_failed_run_is_reported_and_the_sweep_goes_on(sweep):
    crashed = sweep["crashed"]
    assert crashed.returncode == 1
    assert "[sweep 1/2] moe-e4-top1: FAILED with exit 17" in crashed.stdout
    assert "[sweep 2/2] moe-e4-random2: starting" in crashed.stdout  # the next run still started
    assert re.search(r"2 run\(s\) failed:\n  moe-e4-top1 \(exit 17.*\n  moe-e4-random2 \(exit 17", crashed.stderr)
    assert sweep["finished_after_crash"] == []


def test_rerun_resumes_each_interrupted_run_from_its_checkpoint(sweep):
    out = sweep["resumed"].stdout
    for name in RUNS:
        run_dir = sweep["grid_dir"] / name
        assert f"{name}: unfinished, re-running" in out
        assert re.search(
            rf"resumed from {re.escape(str(run_dir))}/checkpoints/step0+{CRASH_AFTER} "
            rf"\(step {CRASH_AFTER}\)",
            out,
        )
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, STEPS + 1))  # once each, in order


def test_rerun_skips_finished_runs_without_starting_them(sweep):
    out = sweep["again"].stdout
    for i, name in enumerate(RUNS, 1):
        assert f"[sweep {i}/2] {name}: finished (summary.json exists), skipping" in out
    assert "$ " not in out  # no command was started
    assert sweep["after"] == sweep["before"]  # summary untouched (same mtime), nothing logged


def test_manifest_records_every_runs_command(sweep):
    manifest = json.loads((sweep["grid_dir"] / "sweep.json").read_text())
    assert (manifest["grid"], manifest["scale"]) == ("strategy", "tiny")
    # the whole grid, also the points this sweep left out with --only
    assert [r["name"] for r in manifest["runs"]] == ["moe-e4-top1", "moe-e4-top2", "moe-e4-random1", "moe-e4-random2"]
    random2 = manifest["runs"][3]["command"]
    assert random2[1] == str(ROOT / "launch" / "train.py")
    flags = " ".join(random2)
    assert "--model tiny-moe --num_experts 4 --top_k 2 --router_type random" in flags
    assert f"--output_dir {sweep['grid_dir'] / 'moe-e4-random2'}" in flags and f"--max_steps {STEPS}" in flags


def test_report_reads_the_sweeps_run_folders(sweep, tmp_path):
    check(python(ROOT / "tools" / "report.py", [str(sweep["grid_dir"]), "--out", str(tmp_path)]))
    md = (tmp_path / "report.md").read_text()
    for name in RUNS:
        best = json.loads((sweep["grid_dir"] / name / "summary.json").read_text())["best_val_ppl"]
        assert re.search(rf"^\| {name} \| [\d.]+ \| {best:.2f} \|", md, re.M)
    assert (tmp_path / "routing_strategies.png").is_file()  # top-1 against random-2


# ---- grids and commands, in process ----------------------------------------------------


def test_dry_run_prints_every_command_and_creates_nothing(tmp_path):
    from moe_dist.analysis.sweep import run_sweep

    printed = []
    assert run_sweep("router", "tiny", tmp_path / "runs", dry_run=True, echo=printed.append) == []
    commands = [line for line in printed if "] $ " in line]
    assert len(commands) == 9
    assert all("--capacity_factor" in c for c in commands)  # else the accelerate path would be dropless
    assert not (tmp_path / "runs").exists()


def test_grids_hold_the_study_points():
    from moe_dist.analysis.sweep import grid_points

    assert [p.name for p in grid_points("experts", "tiny")] == ["dense", "moe-e4-top1", "moe-e8-top1", "moe-e16-top1"]
    assert len({p.name for p in grid_points("router", "seed")}) == 9
    assert [p.name for p in grid_points("strategy", "seed")] == [
        "moe-e4-top1",
        "moe-e4-top2",
        "moe-e4-random1",
        "moe-e4-random2",
    ]
    balance = {p.name: " ".join(p.args) for p in grid_points("balance", "tiny")}
    assert "--aux_loss_coef 0 --bias_update_rate 1e-3 --z_loss_coef 1e-3" in balance["moe-e8-top2-auxfree-zloss"]
    assert "--aux_loss_coef 0 --bias_update_rate 0 --z_loss_coef 0" in balance["moe-e8-top2-noaux"]


@pytest.mark.parametrize(
    "scale,presets",
    [("tiny", {"tiny-dense", "tiny-moe"}), ("seed", {"seed-baseline", "seed-moe-e4", "seed-moe-e8", "seed-moe-e16"})],
)
def test_scale_picks_the_presets(scale, presets):
    from moe_dist.analysis.sweep import GRIDS, grid_points
    from moe_dist.model.configuration import PRESETS

    used = {p.args[p.args.index("--model") + 1] for grid in GRIDS for p in grid_points(grid, scale)}
    assert used == presets and used <= set(PRESETS)


def test_deepspeed_runs_go_through_the_launcher_with_the_config(tmp_path):
    from moe_dist.analysis.sweep import Launcher, grid_points

    point = grid_points("experts", "tiny", ["moe-e8-top1"])[0]
    cmd = Launcher("ds_configs/cpu_ep2.json", 2).command(point, tmp_path / "run", ["--max_steps", "3"])
    assert cmd[0].endswith("deepspeed") and cmd[1:3] == ["--num_gpus", "2"]
    assert cmd[3] == str(ROOT / "launch" / "train.py")
    assert cmd[-2:] == ["--deepspeed", "ds_configs/cpu_ep2.json"] and "--max_steps" in cmd


@pytest.mark.parametrize("extra", [["--top_k", "2"], ["--capacity_factor=2"], ["--output_dir", "x"]])
def test_extra_args_may_not_override_what_the_sweep_sets(extra):
    from moe_dist.analysis.sweep import SweepError, check_extra_args, grid_points

    with pytest.raises(SweepError, match=extra[0].split("=")[0]):
        check_extra_args(grid_points("router", "tiny"), extra)
    check_extra_args(grid_points("router", "tiny"), ["--max_steps", "5", "--seed=3"])
