"""Checkpoint formats and atomic writes, without training: key maps, the export package's imports,
and files that are replaced whole or not at all."""

import subprocess
import sys

import pytest
import torch
from launcher import ROOT

from moe_dist.atomic_io import write_atomic, write_dir_atomic
from moe_dist.checkpoint.formats import ds_to_hf_key, local_to_hf_key
from moe_dist.export import ExportError, load_hf_state_dict

DS_KEY = "model.layers.1.mlp.experts.deepspeed_moe.experts.deepspeed_experts.{}.w1.weight"
HF_KEY = "model.layers.1.mlp.experts.{}.w1.weight"


def test_deepspeed_expert_keys_map_to_hf_keys_with_the_same_global_id():
    assert ds_to_hf_key(DS_KEY.format(5)) == HF_KEY.format(5)
    assert ds_to_hf_key("model.embed_tokens.weight") == "model.embed_tokens.weight"


def test_local_expert_ids_become_global_by_expert_parallel_rank():
    # 8 experts over EP=4: rank 2 holds global experts 4 and 5 as local 0 and 1.
    assert local_to_hf_key(DS_KEY.format(1), ep_rank=2, local_experts=2) == HF_KEY.format(5)
    assert local_to_hf_key("model.norm.weight", ep_rank=2, local_experts=2) == "model.norm.weight"


def test_importing_the_exporter_imports_neither_deepspeed_nor_the_parallel_stack():
    code = (
        "import sys, moe_dist.export; "
        "print(sorted(m for m in sys.modules if m == 'deepspeed' or m.startswith('moe_dist.parallel')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_folder_without_weights_is_named_in_the_error(tmp_path):
    with pytest.raises(ExportError, match="no accelerate/model.safetensors and no mp_rank_"):
        load_hf_state_dict(tmp_path)


def test_deepspeed_files_are_assembled_under_hf_names(tmp_path):
    dense, expert = torch.ones(2), torch.zeros(3)
    torch.save({"module": {"model.norm.weight": dense}}, tmp_path / "mp_rank_00_model_states.pt")
    torch.save({DS_KEY.format(3): expert}, tmp_path / "layer_1_expert_3_mp_rank_00_model_states.pt")
    state = load_hf_state_dict(tmp_path)
    assert set(state) == {"model.norm.weight", HF_KEY.format(3)}
    assert torch.equal(state[HF_KEY.format(3)], expert)


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "latest"
    write_atomic(path, lambda f: f.write(b"step00000008"))
    write_atomic(path, lambda f: f.write(b"step00000012"))
    assert path.read_bytes() == b"step00000012"
    assert [p.name for p in path.parent.iterdir()] == ["latest"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    write_atomic(path, lambda f: f.write(b"old"))

    def killed_midway(f):
        f.write(b"half of the n")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, killed_midway)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_write_dir_atomic_swaps_in_a_whole_folder_or_keeps_the_old_one(tmp_path):
    target = tmp_path / "tokenizer"
    write_dir_atomic(target, lambda d: (d.mkdir(), (d / "a.json").write_text("1")))
    write_dir_atomic(target, lambda d: (d.mkdir(), (d / "b.json").write_text("2")))
    assert [p.name for p in target.iterdir()] == ["b.json"]

    def fails(d):
        d.mkdir()
        (d / "c.json").write_text("3")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_dir_atomic(target, fails)
    assert [p.name for p in target.iterdir()] == ["b.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]
