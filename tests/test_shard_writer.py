"""export/shard_writer.py: safetensors written a tensor at a time read back exactly, split as save_pretrained splits."""

import json

import torch
from safetensors.torch import load_file

from moe_dist.export.shard_writer import INDEX, Planned, write_shards


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g),
        "b.weight": torch.randn(16, 8, generator=g).bfloat16(),
        "c.scale": torch.tensor(3.5),  # 0-dim
        "d.ids": torch.arange(7),
        "e.mask": torch.tensor([True, False, True]),
    }


def _write(folder, tensors, max_shard_size):
    read = []
    planned = [Planned(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    write_shards(planned, folder, max_shard_size, lambda t: read.append(t.name) or tensors[t.name])
    return read


def test_one_file_reads_back_exactly(tmp_path):
    tensors = _tensors()
    assert _write(tmp_path, tensors, 10**9) == list(tensors)  # each read once, in order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    back = load_file(tmp_path / "model.safetensors")
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())


def test_shards_and_index_as_the_hub_splits(tmp_path):
    tensors = _tensors()
    _write(tmp_path, tensors, 1000)  # a.weight (8 KB) is above the limit: a shard of its own
    index = json.loads((tmp_path / INDEX).read_text())
    files = sorted({*index["weight_map"].values()})
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["weight_map"]["a.weight"] == files[0]
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    back = {k: v for f in files for k, v in load_file(tmp_path / f).items()}
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
