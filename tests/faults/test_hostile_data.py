"""Hostile data is either training data (odd bytes, empty stories, a huge story) or one clear line."""

import json

import pytest
from launcher import FIXTURES, TRAIN, check, python
from test_data import hostile_corpus

from moe_dist.train.cli import main

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("num_proc", ["1", "2"])
def test_odd_bytes_empty_stories_crlf_and_a_huge_story_are_handled_as_data(tmp_path, num_proc):
    train = hostile_corpus(tmp_path / "train.txt")  # CRLF, empty stories, bad bytes, a huge story
    run = tmp_path / "run"
    proc = check(
        python(
            TRAIN,
            [
                "--model",
                "tiny-moe",
                "--train_file",
                str(train),
                "--num_proc",
                num_proc,
                "--valid_file",
                str(FIXTURES / "stories_valid.txt"),
                "--tokenizer",
                "train:512",
                "--max_steps",
                "3",
                "--eval_every",
                "3",
                "--output_dir",
                str(run),
            ],
        )
    )
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert "3 bytes" in proc.stderr and "not valid UTF-8" in proc.stderr, proc.stderr[-2000:]
    assert f"on {num_proc} process(es)" in proc.stderr  # the tokenize phase's log line


@pytest.mark.parametrize("flag", ["--train_file", "--valid_file"])
def test_a_directory_instead_of_a_file_is_one_line_and_no_run_folder(capsys, tmp_path, flag):
    files = {
        "--train_file": str(FIXTURES / "stories.txt"),
        "--valid_file": str(FIXTURES / "stories_valid.txt"),
        flag: str(tmp_path),
    }
    code = main([x for kv in files.items() for x in kv] + ["--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {flag} {tmp_path} is a directory; pass a .txt, .json or .jsonl file"]
    assert not (tmp_path / "run").exists()
