"""A checkpoint's weights under their HF names, one decoder layer in memory at a time: what the exporter reads.

Either engine's files (`checkpoint.formats`): accelerate's safetensors, or DeepSpeed's module file and its
per-expert files and, from a ZeRO-1/2 run, the fp32 masters in its optimizer shards (`parallel.portable` reads
those whole to resume; here only the fragments of the layer asked for are copied out). Expert slices (ETP) are
joined into whole experts as they are read. A file is mapped (`torch.load(mmap=True)`, `safe_open`) only while a
layer is read and unmapped after: a mapped page that was read counts in the process's RSS while it stays mapped.
So the reader holds one layer (or the embeddings, final norm and head), whatever the depth. A LoRA run's
adapters (its `lora.json`) are folded into their weights as each layer is read: W + (alpha / r) * B @ A.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint.formats import (
    ACCELERATE_WEIGHTS,
    DS_DENSE,
    DS_EXPERTS,
    ExportError,
    ds_to_hf_key,
    load_checkpoint_file,
    load_zero_shard,
    local_to_hf_key,
    merge_expert_slices,
    read_expert_slices,
    read_lora,
    slice_dim,
    split_slice_key,
    zero_shards,
)
from ..model.configuration import MoEConfig
from ..model.lora import LoRAConfig, apply_lora, fold_adapters
from ..model.modeling import MoEForCausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer an HF name belongs to; None for the embeddings, final norm and head."""
    match = _LAYER.match(name)
    return int(match[1]) if match else None


@dataclass(frozen=True)
class _Piece:
    """Where a stored tensor, or one fragment of it, lies: a state-dict key of a file (`module` of DeepSpeed's
    dense file), or the fp32 partition of group `key` in a ZeRO shard, from `start` for `numel` elements."""

    file: Path
    key: str | int
    start: int = 0
    numel: int = -1


class CheckpointReader:
    """`read(name)`, `has(name)` and `close()` over a checkpoint folder, as a weight source (`convert.sources`).

    Tensors come as stored (fp32 masters where the run kept them), or with `dtype` as the model cast to it holds
    them: the exported weights, which the export's fp32 reference also runs on.
    """

    def __init__(self, ckpt: Path, config: MoEConfig, dtype: torch.dtype | None = None):
        self.ckpt, self.dtype = Path(ckpt), dtype
        lora = read_lora(self.ckpt)
        self.lora = LoRAConfig(**lora) if lora else None
        with torch.device("meta"):
            model = MoEForCausalLM(config)
            if self.lora is not None:  # the adapters are stored beside their weights
                apply_lora(model, self.lora)
        # Each tensor's dtype as `model.to(dtype)` leaves it: the routers' selection bias stays fp32.
        state = (model.to(dtype) if dtype is not None else model).state_dict()
        self.shapes, self.dtypes = {k: v.shape for k, v in state.items()}, {k: v.dtype for k, v in state.items()}
        self.slices = read_expert_slices(self.ckpt)
        self.pieces = _index(self.ckpt, config, self.slices, self._stored_shape)
        self.stored: dict[int | None, list[str]] = defaultdict(list)  # stored names by the layer they fill
        for stored in self.pieces:
            self.stored[layer_of(self._full_name(stored))].append(stored)
        self.names = {self._full_name(s) for s in self.pieces}
        self._check_names(config)
        self.names -= {n for n in self.names if n.endswith((".lora_A", ".lora_B"))}  # read folded into weights
        self._layer, self._held = -1, {}

    def has(self, name: str) -> bool:
        return name in self.names

    def read(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise ExportError(f"{self.ckpt}: the checkpoint has no tensor {name!r}")
        layer = layer_of(name)
        if layer != self._layer or name not in self._held:  # a name read again re-reads its layer
            self.close()
            self._held, self._layer = self._read_layer(layer), layer
        # Let go of it once handed out: as the caller fills its own copy of the layer, the held one shrinks.
        return self._held.pop(name)

    def close(self) -> None:
        """Drop what is held of the layer read last."""
        self._layer, self._held = -1, {}

    def _full_name(self, stored: str) -> str:
        split = split_slice_key(stored, self.slices) if self.slices else None
        return stored if split is None else split[0]

    def _stored_shape(self, stored: str) -> torch.Size:
        """A stored tensor's shape by the config: an expert slice is the whole expert narrowed along its slice dim."""
        split = split_slice_key(stored, self.slices) if self.slices else None
        if split is None:
            return self.shapes[stored]
        shape, dim = list(self.shapes[split[0]]), slice_dim(split[0])
        if dim is not None:
            shape[dim] //= self.slices["etp_size"]
        return torch.Size(shape)

    def _check_names(self, config: MoEConfig) -> None:
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        missing = sorted(set(self.shapes) - self.names - tied)
        unexpected = sorted(self.names - set(self.shapes))
        if missing or unexpected:
            raise ExportError(
                f"{self.ckpt}: weights do not match its config.json "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )

    def _read_layer(self, layer: int | None) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[tuple[str, _Piece]]] = defaultdict(list)
        for stored in self.stored.get(layer, []):
            for piece in self.pieces[stored]:
                by_file[piece.file].append((stored, piece))
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        for file in sorted(by_file):  # ZeRO shards in rank order: a split parameter's fragments in order
            opened = _open(file)
            for stored, piece in by_file[file]:
                parts[stored].append(_cut(opened, piece))
            del opened  # unmapped here, before the next file is mapped
        held = {}
        for stored, got in parts.items():
            whole = got[0] if len(got) == 1 else torch.cat(got)
            # A ZeRO fragment is flat: the stored shape is the config's (checked once the slices are joined).
            held[stored] = whole.view(self._stored_shape(stored)) if self.pieces[stored][0].numel >= 0 else whole
        if self.slices:
            held = merge_expert_slices(held, self.slices)
        if self.lora is not None:  # in the stored precision (a run's fp32 masters), before any cast
            held = fold_adapters(held, self.lora.scale)
        for name, tensor in held.items():
            if tensor.shape != self.shapes[name]:
                raise ExportError(
                    f"{self.ckpt}: weights do not match its config.json ({name}: shape {tuple(tensor.shape)} "
                    f"in the checkpoint, {tuple(self.shapes[name])} by the config)"
                )
            if self.dtype is not None and tensor.is_floating_point():
                held[name] = tensor.to(self.dtypes[name])
        return held


def _open(file: Path):
    if file.suffix == ".safetensors":
        return safe_open(file, "pt")
    if file.name.startswith(("zero_pp_rank_", "bf16_zero_pp_rank_")):
        return load_zero_shard(file, mmap=True)["single_partition_of_fp32_groups"]
    loaded = load_checkpoint_file(file, mmap=True)
    return loaded["module"] if "module" in loaded else loaded


def _cut(opened, piece: _Piece) -> torch.Tensor:
    """The piece's tensor copied out of its mapped file, so that the file can be unmapped."""
    if isinstance(opened, list):  # a ZeRO shard's flat fp32 partitions, one per parameter group
        return opened[piece.key].narrow(0, piece.start, piece.numel).clone()
    if hasattr(opened, "get_tensor"):
        return opened.get_tensor(piece.key)
    return opened[piece.key].clone()


def _index(ckpt: Path, config: MoEConfig, slices: dict | None, shape_of) -> dict[str, list[_Piece]]:
    """Each stored name (HF names; expert slices under their slice ids) and the pieces it is read from."""
    accelerate = ckpt / ACCELERATE_WEIGHTS
    if accelerate.is_file():
        with safe_open(accelerate, "pt") as f:
            return {k: [_Piece(accelerate, k)] for k in f.keys()}
    dense = sorted(ckpt.glob(DS_DENSE))
    if not dense:
        raise ExportError(f"{ckpt} is not a moe-dist checkpoint: no {ACCELERATE_WEIGHTS} and no {DS_DENSE}")
    pieces = {k: [_Piece(dense[0], k)] for k in load_checkpoint_file(dense[0], mmap=True)["module"]}
    for file in sorted(ckpt.glob(DS_EXPERTS)):
        pieces.update({ds_to_hf_key(k): [_Piece(file, k)] for k in load_checkpoint_file(file, mmap=True)})
    state_file = ckpt / "trainer_state.json"
    saved = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if saved.get("engine") == "deepspeed" and zero_shards(ckpt):
        # The fp32 masters: in a bf16 run the module weights are those masters rounded to bf16.
        if slices is None:
            ep_size = saved["ep_size"]
            local = max(config.num_local_experts, 1) // ep_size
        else:  # rank j of a block of P*T ranks names its slices as an EP rank of ep_size P*T would (`formats`)
            ep_size, local = slices["ep_size"] * slices["etp_size"], slices["experts_per_ep_rank"]
        pieces.update(_zero_pieces(ckpt, ep_size, local, shape_of))
    return pieces


def _zero_pieces(ckpt: Path, ep_size: int, local_experts: int, shape_of) -> dict[str, list[_Piece]]:
    """Each parameter's fragments in the ZeRO shards, in rank order (`param_slice_mappings`: where each lies)."""
    pieces: dict[str, list[_Piece]] = defaultdict(list)
    for rank, shard in enumerate(zero_shards(ckpt)):
        mappings = load_zero_shard(shard, mmap=True)["param_slice_mappings"]
        for group, mapping in enumerate(mappings):
            for local, frag in mapping.items():
                # EP groups are consecutive ranks (DeepSpeed's default), so rank r is EP rank r % ep_size.
                name = local_to_hf_key(local, rank % ep_size, local_experts)
                pieces[name].append(_Piece(shard, group, frag.start, frag.numel))
    for name, parts in pieces.items():
        if sum(p.numel for p in parts) != shape_of(name).numel():
            raise ExportError(f"{ckpt}: the ZeRO shards hold {name} incompletely (shards missing?)")
    return dict(pieces)
