"""No command removes or replaces a file or folder it did not write.

Each command that writes a folder (or a JSON file) is pointed at (a) a missing folder, (b) an empty one,
(c) its own previous output, (d) a folder holding an unrelated file, (e) a folder where an unrelated file
has a name the command writes. (a)-(c) work; (d) works without touching the file or ends with one line
and exit 2; (e) ends with one line and exit 2. Every unrelated file keeps its bytes and its mtime.

An export replaces a folder only when it can prove every file in it is its own: listed by the
folder's record with an unchanged size and sha256, or, with no record, a file of an untouched export from
before records, checked file for file (moe_dist/export/old_exports.py). A folder that cannot be written
ends with one line and exit 2 as well. Each refusal prints how long it took.
"""

import hashlib
import json
import os
import shutil
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
from moe_dist.output_guard import RECORD, OutputRefused, check_replace, claim, fingerprints, owned
from moe_dist.train.cli import main as train_main


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below `folder`: its bytes and mtime (ns)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def user_folder(path: Path, files: dict[str, str]) -> dict:
    """A folder of the user's holding `files`; returns its snapshot."""
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    os.utime(path / next(iter(files)), ns=(10**18, 10**18))  # an mtime no rewrite could keep by chance
    return snapshot(path)


def refused(command, argv: list[str], capsys) -> str:
    """`command(argv)` exits 2; returns its stderr, and prints past the capture how long it took to refuse."""
    start = time.perf_counter()
    assert command(argv) == 2
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\nrefused in {seconds:.3f} s: {os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}")
    return err


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
@pytest.mark.parametrize(
    "files",
    [{"keep.txt": "notes"}, {"config.json": '{"model_type": "llama"}'}, {"sub/model.safetensors": "user weights"}],
    ids=["unrelated", "taken", "nested"],
)
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


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory) -> Path:
    """Our native and mixtral exports of `run` (with their records), to copy into each test."""
    root = tmp_path_factory.mktemp("exports")
    for fmt in ("native", "mixtral"):
        assert export_main([str(run), str(root / fmt), "--format", fmt]) == 0
    return root


def copy_export(exports: Path, fmt: str, dst: Path, *, record: bool = True) -> Path:
    """A copy of our `fmt` export at `dst`; without `record`, as `cp hf/* dst/` makes it (the dot file stays behind)."""
    shutil.copytree(exports / fmt, dst)
    if not record:
        (dst / RECORD).unlink()
    return dst


@pytest.mark.parametrize("case", ["copy_of_hf_with_serve_py", "only_a_readme_naming_moe_dist"])
def test_issue_28_data_loss_cases_are_refused_and_keep_every_byte(tmp_path, run, exports, capsys, case):
    out = tmp_path / "serve"
    if case == "copy_of_hf_with_serve_py":  # mkdir serve && cp runs/moe/hf/* serve/ && echo 'print(1)' > serve/serve.py
        copy_export(exports, "native", out, record=False)
        before, name = user_folder(out, {"serve.py": "print(1)\n"}), "serve.py"
    else:
        before, name = user_folder(out, {"README.md": "# My notes\nTrained with moe-dist.\n"}), "README.md"
    err = refused(export_main, [str(run), str(out)], capsys)
    one_error_line(err, str(out), name, "cannot prove it wrote", f"mv {out} {out}.old")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serve"]


@pytest.mark.parametrize("record", [True, False], ids=["with_record", "without_record"])
@pytest.mark.parametrize(
    "name",
    [
        "serve.py",
        "extra.safetensors",
        "tokenizer.model",
        "README.md",
        "vocab.json",
        "model.safetensors.index.json",
        "sub/config.json",
    ],
)
def test_one_file_that_is_not_ours_keeps_our_export_from_being_replaced(tmp_path, run, exports, capsys, record, name):
    out = copy_export(exports, "native", tmp_path / "hf", record=record)
    before = user_folder(out, {name: '{"mine": 1}'})
    one_error_line(refused(export_main, [str(run), str(out)], capsys), str(out), name.split("/")[0])
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "fmt, name, edit",
    [
        ("native", "modeling.py", "same_size"),
        ("native", "config.json", "append"),
        ("native", "model.safetensors", "same_size"),
        ("mixtral", "README.md", "same_size"),
        ("mixtral", "tokenizer.json", "append"),
    ],
)
def test_a_file_of_our_export_edited_since_is_refused(tmp_path, run, exports, capsys, fmt, name, edit):
    out = copy_export(exports, fmt, tmp_path / "hf")
    data = bytearray((out / name).read_bytes())
    if edit == "same_size":  # the record's size still matches: only the sha256 tells
        data[-2] ^= 0x01
    else:
        data += b"\n"
    (out / name).write_bytes(bytes(data))
    before = snapshot(out)
    err = refused(export_main, [str(run), str(out), "--format", fmt], capsys)
    one_error_line(err, name, "changed since moe-dist wrote it", f"mv {out} {out}.old")
    assert snapshot(out) == before


def test_new_exports_record_each_file_size_and_sha256(exports):
    for fmt in ("native", "mixtral"):
        files = {p.name: p for p in (exports / fmt).iterdir() if p.name != RECORD}
        assert fingerprints(exports / fmt) == {
            n: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            for n, p in files.items()
        }


def test_a_record_without_hashes_still_proves_ownership_by_name(tmp_path, run, exports, capsys):
    out = copy_export(exports, "native", tmp_path / "hf")
    data = json.loads((out / RECORD).read_text())
    del data["files"]  # a record written before sizes and hashes were
    (out / RECORD).write_text(json.dumps(data))
    (out / "modeling.py").write_text("# edited, but the record cannot tell\n")
    assert export_main([str(run), str(out)]) == 0, capsys.readouterr().err
    assert set(fingerprints(out)) == set(owned(out))


def old_export(tmp_path: Path) -> Path:
    """v0.1-tiny-moe (tests/fixtures/exports) as its exporter wrote it: reference.safetensors is the fixture
    script's addition, not the exporter's."""
    with tarfile.open(FIXTURES / "exports" / "v0.1-exports.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    (tmp_path / "v0.1-tiny-moe" / "reference.safetensors").unlink()
    return tmp_path / "v0.1-tiny-moe"


def test_an_untouched_export_from_before_the_record_is_replaced(tmp_path, run, exports, capsys):
    old = old_export(tmp_path)  # config.json with our model_type, no record
    assert export_main([str(run), str(old)]) == 0, capsys.readouterr().err
    assert (old / RECORD).is_file() and (old / "tokenizer.json").is_file()
    card = copy_export(exports, "mixtral", tmp_path / "stock", record=False)  # a stock class: our model card
    assert export_main([str(run), str(card), "--format", "mixtral"]) == 0, capsys.readouterr().err
    assert (card / RECORD).is_file()


def _extend_weights(folder: Path) -> None:
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"\0" * 8)


def _shrink_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda d: (d / "reference.safetensors").write_bytes(b"x"), "reference.safetensors"),
        (lambda d: (d / "README.md").write_text("# moe-dist export\n"), "README.md"),
        (lambda d: (d / "serve.py").write_text("from .modeling import MoEForCausalLM\n"), "serve.py"),
        (_extend_weights, "model.safetensors"),
        (_shrink_config, "model.safetensors"),  # the weights no longer match what config.json describes
        (lambda d: (d / "generation_config.json").write_text("not json"), "generation_config.json"),
        (lambda d: (d / "tokenizer.json").symlink_to(d / "config.json"), "tokenizer.json"),
        (lambda d: (d / "model.safetensors").unlink(), "config.json"),  # an export always wrote its weights
    ],
    ids=["fixture_file", "readme", "module", "weights_extended", "config_changed", "broken_json", "link", "no_weights"],
)
def test_an_export_from_before_the_record_with_anything_changed_is_refused(tmp_path, run, capsys, change, name):
    old = old_export(tmp_path)
    change(old)
    before = snapshot(old)
    err = refused(export_main, [str(run), str(old)], capsys)
    one_error_line(err, name, "cannot prove it wrote", f"mv {old} {old}.old")
    assert snapshot(old) == before


def test_a_users_readme_in_place_of_our_model_card_is_refused(tmp_path, run, exports, capsys):
    card = copy_export(exports, "mixtral", tmp_path / "stock", record=False)
    (card / "README.md").write_text("# Notes\nThis model was exported with moe-dist.\n")
    before = snapshot(card)
    one_error_line(refused(export_main, [str(run), str(card), "--format", "mixtral"], capsys), "README.md")
    assert snapshot(card) == before


def test_kill_9_during_an_export_over_an_export_leaves_the_old_one_whole_and_loadable(tmp_path, run):
    out = tmp_path / "hf"
    assert export_main([str(run), str(out), "--format", "mixtral"]) == 0
    before = snapshot(out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_dist.export", str(run), str(out), "--format", "mixtral"],
        cwd=ROOT,
        env=_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    staging = tmp_path / f"hf.tmp-{proc.pid}"
    deadline = time.time() + 120
    # The weights are in the staging folder: the fresh-interpreter logits check is running now.
    while not (staging / "model.safetensors").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the export ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert snapshot(out) == before
    check(
        python(
            "-c",
            [
                "import sys, torch; from transformers import MixtralForCausalLM; "
                "MixtralForCausalLM.from_pretrained(sys.argv[1]); print('ok')",
                str(out),
            ],
        )
    )


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


def unwritable(tmp_path: Path, where: str, request) -> Path:
    """An output path this process cannot write: under a regular file, inside a locked folder, or that folder."""
    if where == "under_a_file":
        (tmp_path / "file").write_text("mine")
        return tmp_path / "file" / "out"
    locked = request.getfixturevalue("locked_folder")
    return locked / "out" if where == "in_a_locked_folder" else locked


@pytest.fixture
def locked_folder(tmp_path):
    """An empty folder nobody here can write into: immutable for root (whom mode bits do not stop), mode 555
    for anyone else."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("running as root on a file system without the immutable flag: no folder can be locked")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("where", ["under_a_file", "in_a_locked_folder", "the_locked_folder"])
@pytest.mark.parametrize("command", ["train", "export"])
def test_an_output_folder_that_cannot_be_written_is_one_line_and_exit_2(tmp_path, run, capsys, request, where, command):
    out = unwritable(tmp_path, where, request)
    before = snapshot(tmp_path), sorted(tmp_path.rglob("*"))
    if command == "train":
        err = refused(train_main, [*DATA_ARGS, "--model", "tiny-moe", "--output_dir", str(out)], capsys)
    else:
        err = refused(export_main, [str(run), str(out)], capsys)
    one_error_line(err, str(out), "cannot be written")
    assert (snapshot(tmp_path), sorted(tmp_path.rglob("*"))) == before  # nothing written, not even a folder


# ---- sweep, report and the tools ------------------------------------------------------------------


def sweep(runs_dir: Path) -> subprocess.CompletedProcess:
    return python(
        ROOT / "launch" / "sweep.py", ["--grid", "experts", "--runs_dir", str(runs_dir), "--only", "dense", "--dry_run"]
    )


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


@pytest.mark.parametrize(
    "command, taken",
    [
        (lambda out: ("profile_memory.py", "--preset", "tiny-moe", "--output_dir", out), "memory.json"),
        (lambda out: ("gpu_check.py", "--dry-run", "--out", out), "cpu-dry-run.json"),
        (
            lambda out: (
                "bench_moe.py",
                "--d_model",
                32,
                "--ffn",
                64,
                "--tokens",
                64,
                "--experts",
                4,
                "--repeats",
                1,
                "--iters",
                1,
                "--warmup",
                0,
                "--no_deepspeed",
                "--json",
                out / "bench.json",
            ),
            "bench.json",
        ),
        (lambda out: ("benchmark.py", "--preset", "tiny-dense", "--json", out / "bench.json"), "bench.json"),
        (lambda out: ("bench_train.py", "--json", out / "bench.json"), "bench.json"),
    ],
    ids=["profile_memory", "gpu_check", "bench_moe", "benchmark", "bench_train"],
)
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
    proc = python(
        ROOT / "launch" / "generate.py",
        ["--model_path", str(accel_run), "--max_new_tokens", "2", "--json", str(tmp_path / "samples.json")],
    )
    assert proc.returncode == 2 and "samples.json" in one_error_line(proc.stderr, "--json")
    assert snapshot(tmp_path) == before
