"""Checkpoint formats in one place: the files each engine writes, and how their parameter names
map to the model's (HF) names. Reading a checkpoint for export or for resharding goes through here.

One checkpoint folder (`checkpoints/stepNNNNNNNN/`) holds, from DeepSpeed with native MoE:

    mp_rank_00_model_states.pt                        "module": every non-expert weight
    layer_{L}_expert_{E}_mp_rank_00_model_states.pt   one expert of MoE layer L, keyed by its global id E
    zero_pp_rank_{R}_mp_rank_00_optim_states.pt       ZeRO-1/2: rank R's flat fp32 partition and Adam moments
                                                      (bf16_zero_pp_rank_... in a bf16 run)
    expert_slices.json                                only with expert tensor parallelism: the expert
                                                      files then hold slices, id = (p*T + t) * E/P + local expert
    lora.json                                         only with LoRA: rank, alpha, dropout and targets of the
                                                      adapters (`<proj>.lora_A` / `.lora_B`) the weights hold

(`zero_to_fp32` ignores the expert files, DeepSpeed #4497, so weights are assembled here), or from
accelerate:

    accelerate/model.safetensors                      every weight, under its HF name
    accelerate/optimizer.bin                          torch's optimizer state_dict

Every file is read with `torch.load(weights_only=True)`: no pickle code runs. DeepSpeed is imported
lazily, only to read its ZeRO shards or its expert groups, so importing this module stays light.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

DS_DENSE = "mp_rank_*_model_states.pt"
DS_EXPERTS = "layer_*_expert_*_model_states.pt"
DS_ZERO_SHARDS = "zero_pp_rank_*_mp_rank_00_optim_states.pt"
ACCELERATE_WEIGHTS = Path("accelerate") / "model.safetensors"
ACCELERATE_OPTIMIZER = Path("accelerate") / "optimizer.bin"

# An expert's key in DeepSpeed's checkpoint (and in an expert-parallel model) vs. in the model /
# HF export: only the container path differs, the one expert_parallel builds (ExpertParallelExperts
# -> deepspeed_moe: MOELayer -> experts: ExpertShard -> deepspeed_experts: LocalExperts). The id is
# global in a checkpoint's expert files, local (0 .. E/ep - 1) in a live sharded model and its ZeRO shards.
_DS_EXPERT_PATH = ".experts.deepspeed_moe.experts.deepspeed_experts."
_HF_EXPERT_PATH = ".experts."
_SHARD_RANK = re.compile(r"zero_pp_rank_(\d+)_")
_LOCAL_ID = re.compile(re.escape(_DS_EXPERT_PATH) + r"(\d+)\.")
EXPERT_SLICES = "expert_slices.json"
_SLICE_KEY = re.compile(r"^(.*\.experts\.)(\d+)\.(up_proj|gate_proj|down_proj)\.(weight|bias|lora_A|lora_B)$")
LORA_ADAPTERS = "lora.json"


class ExportError(RuntimeError):
    """A checkpoint folder that cannot be read as a model; the message names the file."""


# ---- parameter names ------------------------------------------------------------------------


def ds_to_hf_key(key: str) -> str:
    """A key of DeepSpeed's checkpoint files (global expert ids) under its HF name."""
    return key.replace(_DS_EXPERT_PATH, _HF_EXPERT_PATH)


def local_to_hf_key(key: str, ep_rank: int, local_experts: int) -> str:
    """A sharded model's key (local expert id) as the HF key (global id = ep_rank * local + local id)."""
    return _LOCAL_ID.sub(lambda m: f"{_HF_EXPERT_PATH}{ep_rank * local_experts + int(m.group(1))}.", key)


def hf_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(HF name, parameter) for a model whose experts may be sharded over expert-parallel ranks."""
    for name, param in model.named_parameters():
        if _DS_EXPERT_PATH not in name:
            yield name, param
            continue
        layer = model.get_submodule(name[: name.index(_DS_EXPERT_PATH)] + ".experts")
        yield local_to_hf_key(name, _ep_rank(layer.expert_group_name), layer.num_local_experts), param


def _ep_rank(group_name: str) -> int:
    from deepspeed.utils import groups

    return groups._get_expert_parallel_rank(group_name)


# ---- reading checkpoint files ---------------------------------------------------------------


def load_hf_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model's weights under their HF names, whichever engine wrote `ckpt`."""
    accelerate_weights = ckpt / ACCELERATE_WEIGHTS
    if accelerate_weights.is_file():
        return load_file(accelerate_weights)
    dense = sorted(ckpt.glob(DS_DENSE))
    if not dense:
        raise ExportError(f"{ckpt} is not a moe-dist checkpoint: no {ACCELERATE_WEIGHTS} and no {DS_DENSE}")
    state = dict(load_checkpoint_file(dense[0])["module"])
    for expert_file in sorted(ckpt.glob(DS_EXPERTS)):
        state.update(load_checkpoint_file(expert_file))
    state = {ds_to_hf_key(k): v for k, v in state.items()}
    slices = read_expert_slices(ckpt)
    return merge_expert_slices(state, slices) if slices else state


def load_checkpoint_file(path: Path, *, mmap: bool = False) -> dict:
    """One `.pt` file of a DeepSpeed checkpoint; `mmap`: its tensors stay on disk until read (the exporter
    copies out one layer at a time)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated or corrupted files raise many different types
        raise ExportError(f"cannot read checkpoint file {path} ({type(e).__name__}: {e})") from None


def load_accelerate_optimizer(ckpt: Path) -> dict:
    """accelerate's optimizer: torch's state_dict, its state numbered by position in the param groups."""
    return torch.load(ckpt / ACCELERATE_OPTIMIZER, map_location="cpu", weights_only=True)


def zero_shards(ckpt: Path) -> list[Path]:
    """DeepSpeed's ZeRO-1/2 optimizer shards in rank order; none under ZeRO stage 0.

    A bf16 run names them `bf16_zero_pp_rank_*` (the same contents: fp32 masters, moments, slices).
    """
    shards = [*ckpt.glob(DS_ZERO_SHARDS), *ckpt.glob("bf16_" + DS_ZERO_SHARDS)]
    return sorted(shards, key=lambda p: int(_SHARD_RANK.search(p.name).group(1)))


def load_zero_shard(shard: Path, *, mmap: bool = False) -> dict:
    """One rank's `optimizer_state_dict`: flat fp32 partitions, Adam moments, `param_slice_mappings`; `mmap`:
    its tensors stay on disk until read."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # The three DeepSpeed classes a shard pickles; weights_only refuses anything not allowlisted.
    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
        return torch.load(shard, map_location="cpu", weights_only=True, mmap=mmap)["optimizer_state_dict"]


# ---- expert tensor parallelism: experts saved as slices -------------------------------------------


def read_expert_slices(ckpt: Path) -> dict | None:
    """{"ep_size": P, "etp_size": T, "experts_per_ep_rank": E/P} of a sliced save; None if experts are whole."""
    path = ckpt / EXPERT_SLICES
    return json.loads(path.read_text()) if path.is_file() else None


def read_lora(ckpt: Path) -> dict | None:
    """A LoRA run's `lora.json` (`model.lora.LoRAConfig.record`); None: the weights hold no adapters."""
    path = ckpt / LORA_ADAPTERS
    return json.loads(path.read_text()) if path.is_file() else None


def slice_dim(key: str) -> int | None:
    """The dim ETP slices an expert tensor along: W2 by input rows, W1/W3 and their biases by output
    columns; None for the down bias, which slice 0 holds whole.

    A LoRA factor (`model/lora.py`) follows its projection's cut: B [out, r] is cut by rows where W is
    (W1/W3), A [r, in] by columns where W is (W2); the other factor is whole on every slice."""
    proj, _, leaf = key.rpartition(".")
    weight_dim = 1 if proj.endswith("down_proj") else 0
    if leaf == "lora_A":
        return 1 if weight_dim == 1 else None
    if leaf == "lora_B":
        return 0 if weight_dim == 0 else None
    return None if leaf == "bias" and weight_dim == 1 else weight_dim


def split_slice_key(key: str, slices: dict) -> tuple[str, int] | None:
    """A sliced save's expert key (id = (p*T + t) * E/P + local) as (the full expert's HF key, slice t)."""
    m = _SLICE_KEY.match(key)
    if m is None:
        return None
    per_rank = slices["experts_per_ep_rank"]
    j, local = divmod(int(m.group(2)), per_rank)
    p, t = divmod(j, slices["etp_size"])
    return f"{m.group(1)}{p * per_rank + local}.{m.group(3)}.{m.group(4)}", t


def merge_expert_slices(state: dict[str, torch.Tensor], slices: dict) -> dict[str, torch.Tensor]:
    """`state` with every expert's slices joined back into the whole expert, under today's keys."""
    parts: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    out = {}
    for key, tensor in state.items():
        split = split_slice_key(key, slices)
        if split is None:
            out[key] = tensor
        else:
            parts[split[0]][split[1]] = tensor
    for key, by_slice in parts.items():
        dim = slice_dim(key)
        out[key] = by_slice[0] if dim is None else torch.cat([by_slice[t] for t in sorted(by_slice)], dim=dim)
    return out
