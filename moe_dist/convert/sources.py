"""Where a model's starting weights come from, read one tensor at a time under our names.

`--init_from` builds the model on the meta device and asks a source for exactly the tensors this rank holds
(`parallel.sharded_load`): under expert parallelism a rank reads only its own experts, and safetensors maps
each tensor from disk on demand, so no rank ever holds the whole checkpoint. Sources:

- `SafetensorsFiles`: one folder's `model.safetensors`, or the shards its `model.safetensors.index.json` lists;
- `NativeSource`: our own export (`hf/`), whose names are ours;
- `StockSource`: a stock transformers folder, through `standard_keys.key_pairs` (the exporter's table, read
  the other way);
- `AdaptedSource`: any of these for a LoRA model, each adapter factor at its starting value.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..checkpoint.formats import ExportError
from ..model.configuration import MoEConfig
from ..model.lora import initial_factor
from .standard_keys import Pair, disk_names, key_pairs

INDEX = "model.safetensors.index.json"


def has_safetensors(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / INDEX).is_file()


def read_weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> the file in `folder` that holds it: from the index when there is one, else the one file's
    header. `ExportError` naming the file when it cannot be read."""
    index = folder / INDEX
    if not index.is_file():
        return dict.fromkeys(_header_keys(folder / "model.safetensors"), "model.safetensors")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable, not JSON, no weight_map, not an object
        raise ExportError(
            f"{index}: not a safetensors index ({type(e).__name__}: {e}); it needs a "
            f'"weight_map" object of tensor name -> file'
        ) from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ExportError(f'{index}: "weight_map" must map each tensor name to a file name')
    return weight_map


def check_safetensors(folder: Path) -> None:
    """Every safetensors file the folder's weights come from opens, and holds what the index says it holds.

    Reads headers only (safetensors checks there that the tensors cover the file exactly, so a truncated file is
    found), before a run writes anything; a tensor's bytes are read when training loads it.
    """
    weight_map = read_weight_map(folder)
    for file in sorted(set(weight_map.values())):
        path = folder / file
        if not path.is_file():
            raise ExportError(f"{folder / INDEX}: names shard {file}, which is not in {folder}")
        held = _header_keys(path)
        missing = [k for k, f in weight_map.items() if f == file and k not in held]
        if missing:
            raise ExportError(
                f"{folder / INDEX}: names {len(missing)} tensor(s) in {file} that it does not hold "
                f"(first: {missing[0]!r})"
            )


def _header_keys(path: Path) -> set[str]:
    try:
        with safe_open(path, "pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError) as e:
        raise ExportError(
            f"{path}: not a readable safetensors file ({e}); was it truncated or copied incompletely?"
        ) from None


class SafetensorsFiles:
    """Lazy access to a folder's safetensors: a tensor is read from disk when asked for, not before."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not has_safetensors(self.folder):
            raise ExportError(f"{self.folder}: no model.safetensors or {INDEX} (only safetensors checkpoints are read)")
        self.weight_map = read_weight_map(self.folder)
        self._open: dict[str, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def read(self, key: str) -> torch.Tensor:
        return self._file(key).get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape from its file's header, without reading it."""
        return tuple(self._file(key).get_slice(key).get_shape())

    def close(self) -> None:
        """Unmap the files read so far (reopened when read again): each page of a mapped file that was read
        counts in the process's RSS while it stays mapped, so a reader of one layer at a time closes between."""
        self._open.clear()

    def _file(self, key: str):
        if key not in self.weight_map:
            raise ExportError(f"{self.folder}: the checkpoint has no tensor {key!r}")
        file = self.weight_map[key]
        if file not in self._open:
            self._open[file] = safe_open(self.folder / file, "pt")
        return self._open[file]


class NativeSource:
    """Our own export: its tensor names are ours."""

    def __init__(self, folder: Path):
        self.files = SafetensorsFiles(folder)

    def has(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> torch.Tensor:
        return self.files.read(name)

    def close(self) -> None:
        self.files.close()


class StockSource:
    """A stock class's folder (`fmt`), read through the key table for our `config`."""

    def __init__(self, folder: Path, fmt: str, config: MoEConfig):
        self.files = SafetensorsFiles(folder)
        self.fmt = fmt
        self.pairs: dict[str, tuple[Pair, int]] = {
            name: (pair, i) for pair in key_pairs(config, fmt) for i, name in enumerate(pair.ours)
        }

    def has(self, name: str) -> bool:
        return name in self.pairs

    def read(self, name: str) -> torch.Tensor:
        # A fused disk tensor (GPT-2's c_attn) is read once per part it holds: three small reads at import
        # time, not worth a cache that would keep the tensors alive.
        pair, i = self.pairs[name]
        # Extra tensors (GPT-2's `h.N.attn.bias` causal masks, buffers the stock class rebuilds) are never asked for.
        names = disk_names(pair.disk, self.fmt)
        disk = next((n for n in names if n in self.files), pair.disk)  # a missing one is named as the LM saves it
        return pair.to_ours(self.files.read(disk))[i]

    def close(self) -> None:
        self.files.close()


class AdaptedSource:
    """`base`'s tensors for a model with LoRA adapters (`model.lora`): each factor in `shapes` (checkpoint key ->
    whole shape) starts at `initial_factor(key, shape, seed)`, the value the same model built in memory gets."""

    def __init__(self, base, shapes: dict[str, torch.Size], seed: int):
        self.base, self.shapes, self.seed = base, shapes, seed

    def has(self, name: str) -> bool:
        return name in self.shapes or self.base.has(name)

    def read(self, name: str) -> torch.Tensor:
        if name in self.shapes:
            return initial_factor(name, self.shapes[name], self.seed)
        return self.base.read(name)
