"""Hostile data is either training data (odd bytes, empty stories, a huge story) or one clear line."""

import json

import pytest
from launcher import FIXTURES, TRAIN, check, python

from moe_dist.train.cli import main

pytestmark = pytest.mark.faults


def test_odd_bytes_empty_stories_crlf_and_a_huge_story_are_handled_as_data(tmp_path):
    stories = (FIXTURES / "stories.txt").read_text().split("<|endoftext|>\n")
    huge = " ".join(stories[:60]).replace("\n", " ")  # one story many blocks long
    corpus = "<|endoftext|>\n".join(stories[60:200] + ["", "   ", huge])
    raw = corpus.replace("\n", "\r\n").encode() + b"\n<|endoftext|>\nA caf\xe9 in \xff\xfe town.\n"
    (tmp_path / "train.txt").write_bytes(raw)
    run = tmp_path / "run"
    proc = check(python(TRAIN, ["--model", "tiny-moe", "--train_file", str(tmp_path / "train.txt"),
                                "--valid_file", str(FIXTURES / "stories_valid.txt"), "--tokenizer", "train:512",
                                "--max_steps", "3", "--eval_every", "3", "--output_dir", str(run)]))
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert "3 bytes" in proc.stderr and "not valid UTF-8" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("flag", ["--train_file", "--valid_file"])
def test_a_directory_instead_of_a_file_is_one_line_and_no_run_folder(capsys, tmp_path, flag):
    files = {"--train_file": str(FIXTURES / "stories.txt"), "--valid_file": str(FIXTURES / "stories_valid.txt"),
             flag: str(tmp_path)}
    code = main([x for kv in files.items() for x in kv] + ["--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {flag} {tmp_path} is a directory; pass a .txt, .json or .jsonl file"]
    assert not (tmp_path / "run").exists()
