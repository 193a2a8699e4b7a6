"""No command removes or replaces a file or folder it did not write (issue 23).

Each command that writes a folder (or a JSON file) is pointed at (a) a missing folder, (b) an empty one,
(c) its own previous output, (d) a folder holding an unrelated file, (e) a folder where an unrelated file
has a name the command writes. (a)-(c) work; (d) works without touching the file or ends with one line
and exit 2; (e) ends with one line and exit 2. Every unrelated file keeps its bytes and its mtime.
"""

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from launcher import ACCEL_ARGS, DATA_ARGS, FIXTURES, ROOT, TRAIN, _env, check, python
from test_export_standard import make_run, tokenizer  # noqa: F401 - the module fixture make_run needs

from moe_dist.export.cli import main as export_main
from moe_dist.output_guard import RECORD, OutputRefused, check_replace, claim, owned
from moe_dist.train.cli import main as train_main


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below `folder`: its bytes and mtime (ns)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(path: Path, files: dict[str, str]) -> dict:
    """A folder of the user's holding `files`; returns its snapshot."""
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    os.utime(path / next(iter(files)), ns=(10**18, 10**18))  # an mtime no rewrite could keep by chance
    return snapshot(path)


def one_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- the rule itself --------------------------------------------------------------------------


def test_a_name_is_ours_only_when_recorded_under_the_same_kind(tmp_path):
    claim(tmp_path, "report", ["report.md"])
    (tmp_path / "report.md").write_text("ours")
    claim(tmp_path, "report", ["report.md"])  # our own earlier output: fine
    with pytest.raises(OutputRefused, match="report.md"):
        claim(tmp_path, "train", ["report.md"])  # another command's output is not this one's to replace
    (tmp_path / "notes.txt").write_text("user")
    with pytest.raises(OutputRefused, match="notes.txt"):
        check_replace(tmp_path, "report")
    assert owned(tmp_path) == {"report.md": "report"}


# ---- export -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):  # noqa: F811 - the imported module fixture
    return make_run(tmp_path_factory.mktemp("export"), tokenizer, "mixtral-tiny")


@pytest.mark.parametrize("fmt", ["native", "mixtral"])
def test_export_fills_a_missing_or_empty_folder_and_replaces_its_own_export(tmp_path, run, capsys, fmt):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty", tmp_path / "new"):
        assert export_main([str(run), str(out), "--format", fmt]) == 0, capsys.readouterr().err
    written = {p.name for p in (tmp_path / "new").iterdir()}
    assert RECORD in written and "config.json" in written and "model.safetensors" in written
    assert set(owned(tmp_path / "new")) == written - {RECORD}
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("fmt", ["native", "mixtral"])
@pytest.mark.parametrize("files", [{"keep.txt": "notes"}, {"config.json": '{"model_type": "llama"}'},
                                   {"sub/model.safetensors": "user weights"}], ids=["unrelated", "taken", "nested"])
def test_export_refuses_a_folder_holding_what_it_did_not_write(tmp_path, run, capsys, fmt, files):
    out = tmp_path / "models"
    before = user_folder(out, files)
    assert export_main([str(run), str(out), "--format", fmt]) == 2
    one_error_line(capsys.readouterr().err, str(out), next(iter(files)).split("/")[0])
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no staging folder left beside it


def test_a_user_file_inside_our_export_keeps_it_from_being_replaced(tmp_path, run, capsys):
    out = tmp_path / "hf"
    assert export_main([str(run), str(out)]) == 0
    capsys.readouterr()  # the first export's progress bar
    before = user_folder(out, {"notes.txt": "mine"})
    assert export_main([str(run), str(out)]) == 2
    one_error_line(capsys.readouterr().err, "notes.txt")
    assert snapshot(out) == before


def test_exports_written_before_the_record_are_still_replaced(tmp_path, run, capsys):
    with tarfile.open(FIXTURES / "exports" / "v0.1-exports.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    old = tmp_path / "v0.1-tiny-moe"  # config.json with our model_type, no record
    assert export_main([str(run), str(old)]) == 0, capsys.readouterr().err
    assert not (old / "reference.safetensors").exists() and (old / RECORD).is_file()
    card = tmp_path / "stock"  # a stock-class export: the model card names moe-dist
    assert export_main([str(run), str(card), "--format", "mixtral"]) == 0
    (card / RECORD).unlink()
    assert export_main([str(run), str(card), "--format", "mixtral"]) == 0, capsys.readouterr().err
    (card / RECORD).unlink()
    (card / "notes.txt").write_text("mine")  # but not with a file of the user's beside it
    assert export_main([str(run), str(card), "--format", "mixtral"]) == 2


def test_kill_9_during_an_export_over_an_export_leaves_the_old_one_whole_and_loadable(tmp_path, run):
    out = tmp_path / "hf"
    assert export_main([str(run), str(out), "--format", "mixtral"]) == 0
    before = snapshot(out)
    proc = subprocess.Popen([sys.executable, "-m", "moe_dist.export", str(run), str(out), "--format", "mixtral"],
                            cwd=ROOT, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    staging = tmp_path / f"hf.tmp-{proc.pid}"
    deadline = time.time() + 120
    # The weights are in the staging folder: the fresh-interpreter logits check is running now.
    while not (staging / "model.safetensors").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the export ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert snapshot(out) == before
    check(python("-c", ["import sys, torch; from transformers import MixtralForCausalLM; "
                        "MixtralForCausalLM.from_pretrained(sys.argv[1]); print('ok')", str(out)]))


# ---- training -----------------------------------------------------------------------------------


def test_training_beside_unrelated_files_keeps_them(tmp_path):
    out = tmp_path / "run"
    before = user_folder(out, {"notes.txt": "mine", "data/train.txt": "my corpus"})
    args = [*ACCEL_ARGS, "--max_steps", "2", "--eval_every", "2", "--output_dir", str(out)]
    check(python(TRAIN, args))
    assert (out / "summary.json").is_file() and (out / "hf" / "model.safetensors").is_file()
    assert {k: v for k, v in snapshot(out).items() if k in before} == before
    proc = check(python(TRAIN, [*args[:-2], "--max_steps", "3", "--output_dir", str(out)]))  # (c): resumes
    assert "resumed from" in proc.stderr
    assert {k: v for k, v in snapshot(out).items() if k in before} == before


@pytest.mark.parametrize("taken", ["summary.json", "tokenizer/tokenizer.json", "hf/config.json", "checkpoints/x"])
def test_training_refuses_a_folder_where_a_name_it_writes_is_taken(tmp_path, capsys, taken):
    out = tmp_path / "run"
    before = user_folder(out, {taken: "mine"})
    assert train_main([*DATA_ARGS, "--model", "tiny-moe", "--output_dir", str(out)]) == 2
    one_error_line(capsys.readouterr().err, "--output_dir", taken.split("/")[0])
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted({taken.split("/")[0]})


# ---- sweep, report and the tools ------------------------------------------------------------------


def sweep(runs_dir: Path) -> subprocess.CompletedProcess:
    return python(ROOT / "launch" / "sweep.py", ["--grid", "experts", "--runs_dir", str(runs_dir), "--only", "dense",
                                                 "--dry_run"])


def test_sweep_refuses_a_grid_folder_it_did_not_write(tmp_path):
    before = user_folder(tmp_path / "runs", {"notes.txt": "mine"})
    assert sweep(tmp_path / "runs").returncode == 0  # (d): the grid folder goes beside the notes
    user_folder(tmp_path / "runs", {"experts/dense/summary.json": "{}"})
    before = snapshot(tmp_path / "runs")
    proc = sweep(tmp_path / "runs")
    assert proc.returncode == 2 and "experts" in one_error_line(proc.stderr, "--runs_dir")
    assert snapshot(tmp_path / "runs") == before


def tool(name: str, *args) -> subprocess.CompletedProcess:
    return python(ROOT / "tools" / name, [str(a) for a in args])


def test_report_adds_its_files_beside_others_and_refuses_a_taken_name(tmp_path, accel_run):
    out = tmp_path / "report"
    before = user_folder(out, {"notes.txt": "mine"})
    for _ in range(2):  # (d), then (c) over its own report
        check(tool("report.py", accel_run, "--out", out))
    assert (out / "report.md").is_file() and snapshot(out)["notes.txt"] == before["notes.txt"]
    taken = tmp_path / "taken"
    before = user_folder(taken, {"report.md": "# my report"})
    proc = tool("report.py", accel_run, "--out", taken)
    assert proc.returncode == 2 and "report.md" in one_error_line(proc.stderr, "--out")
    assert snapshot(taken) == before


@pytest.mark.parametrize("command, taken", [
    (lambda out: ("profile_memory.py", "--preset", "tiny-moe", "--output_dir", out), "memory.json"),
    (lambda out: ("gpu_check.py", "--dry-run", "--out", out), "cpu-dry-run.json"),
    (lambda out: ("bench_moe.py", "--d_model", 32, "--ffn", 64, "--tokens", 64, "--experts", 4, "--repeats", 1,
                  "--iters", 1, "--warmup", 0, "--no_deepspeed", "--json", out / "bench.json"), "bench.json"),
    (lambda out: ("benchmark.py", "--preset", "tiny-dense", "--json", out / "bench.json"), "bench.json"),
    (lambda out: ("bench_train.py", "--json", out / "bench.json"), "bench.json"),
], ids=["profile_memory", "gpu_check", "bench_moe", "benchmark", "bench_train"])
def test_tools_refuse_a_name_they_write_that_is_taken(tmp_path, command, taken):
    before = user_folder(tmp_path, {taken: '{"mine": 1}', "notes.txt": "mine"})
    proc = tool(*command(tmp_path))
    assert proc.returncode == 2 and taken in one_error_line(proc.stderr)
    assert snapshot(tmp_path) == before


def test_profile_memory_fills_new_empty_and_its_own_folders(tmp_path):
    user_folder(tmp_path / "d", {"notes.txt": "mine"})
    (tmp_path / "empty").mkdir()
    for out in ("new", "empty", "new", "d"):
        check(tool("profile_memory.py", "--preset", "tiny-moe", "--output_dir", tmp_path / out))
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine" and (tmp_path / "d" / "memory.json").is_file()


def test_generate_refuses_a_json_path_it_did_not_write(tmp_path, accel_run):
    before = user_folder(tmp_path, {"samples.json": '{"mine": 1}'})
    proc = python(ROOT / "launch" / "generate.py", ["--model_path", str(accel_run), "--max_new_tokens", "2",
                                                    "--json", str(tmp_path / "samples.json")])
    assert proc.returncode == 2 and "samples.json" in one_error_line(proc.stderr, "--json")
    assert snapshot(tmp_path) == before
