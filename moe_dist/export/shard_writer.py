"""Safetensors shards written a tensor at a time, laid out as `save_pretrained` lays them out.

`safetensors.torch.save_file` needs every tensor of a file in memory at once, and with the default shard size
(50 GB) a file is the whole model. A safetensors file is an 8-byte header length, a JSON header naming each
tensor's dtype, shape and byte range, then the bytes: with the shapes known beforehand (the model on the meta
device) the header is written first and each tensor's bytes are appended as it is read, so the writer holds
one tensor. Shards are split as huggingface_hub's `split_torch_state_dict_into_shards` splits them (in order; a
new shard when the next tensor would pass the limit; a tensor above it alone), named `model.safetensors` or
`model-0000i-of-0000n.safetensors`, with `model.safetensors.index.json` when there are several.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class Planned:
    """A tensor to write: its name in the folder, dtype and shape (known before its bytes are read)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def split_shards(tensors: list[Planned], max_shard_size: int) -> list[list[Planned]]:
    shards, current, size = [], [], 0
    for tensor in tensors:
        if tensor.nbytes > max_shard_size:
            shards.append([tensor])
            continue
        if current and size + tensor.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(tensor)
        size += tensor.nbytes
    return [*shards, current] if current else shards


def write_shards(
    tensors: list[Planned], folder: Path, max_shard_size: int, read: Callable[[Planned], torch.Tensor]
) -> None:
    """Write `tensors` into `folder`, each read by `read` just before its bytes are written and dropped after."""
    shards = split_shards(tensors, max_shard_size)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for filename, shard in zip(names, shards, strict=True):
        _write_file(folder / filename, shard, read)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: filename for filename, shard in zip(names, shards) for t in shard},
        }
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_file(path: Path, shard: list[Planned], read: Callable[[Planned], torch.Tensor]) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in shard:
        header[t.name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in shard:
            tensor = read(t)
            if tensor.dtype != t.dtype or tuple(tensor.shape) != t.shape:
                raise ValueError(
                    f"{t.name}: {tensor.dtype} {tuple(tensor.shape)} where {t.dtype} {t.shape} was planned"
                )
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # no copy of the bytes
