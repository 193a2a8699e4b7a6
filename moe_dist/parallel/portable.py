"""Engine-neutral training state: resume at another EP size, ETP size, world size or engine.

Every parameter under its HF name (global expert ids) with its fp32 value and AdamW
moments, plus the optimizer step. It is read from either engine's checkpoint files and
written into either engine after setup, so experts and their moments move to whichever
rank owns them now. DeepSpeed's own converters (`ds_to_universal`, `zero_to_fp32`) fail
on native-MoE checkpoints; ZeRO-1/2 shards record where each parameter lies in them
(`param_slice_mappings`), which is all this needs. The files and their names are
`moe_dist.checkpoint.formats`'s business; this module only reassembles what they hold. Expert
slices (ETP) are joined into whole experts on reading and cut again for a sliced
target (`slice_state`), so every layout change takes the same path.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.formats import (
    load_accelerate_optimizer,
    load_hf_state_dict,
    load_zero_shard,
    local_to_hf_key,
    merge_expert_slices,
    read_expert_slices,
    slice_dim,
    split_slice_key,
    zero_shards,
)
from .expert_tensor_parallel import slice_tensor
from .optim import named_param_groups


@dataclass
class PortableState:
    weights: dict[str, torch.Tensor]  # fp32, HF names
    exp_avg: dict[str, torch.Tensor] | None  # None: the source's optimizer state cannot be read
    exp_avg_sq: dict[str, torch.Tensor] | None
    step: int | None
    why_no_moments: str = ""


def read_state(
    ckpt: Path, *, engine: str, ep_size: int, num_experts: int, shapes: dict[str, torch.Size]
) -> PortableState:
    weights = {k: v.float() for k, v in load_hf_state_dict(ckpt).items()}
    if engine == "accelerate":
        return _read_accelerate(ckpt, weights, shapes)
    shards = zero_shards(ckpt)
    if not shards:
        return PortableState(
            weights,
            None,
            None,
            None,
            "it was saved with ZeRO stage 0, whose optimizer state is not sharded by parameter name",
        )
    slices = read_expert_slices(ckpt)
    if slices is None:
        return _read_zero_shards(shards, weights, ep_size, max(num_experts, 1) // ep_size, shapes.__getitem__)
    # Expert tensor parallelism: rank j of each block of P*T consecutive ranks names its slices as an
    # EP rank of ep_size P*T with E/P experts would (see `formats`); join them once read.
    sliced = _read_zero_shards(
        shards,
        {},
        slices["ep_size"] * slices["etp_size"],
        slices["experts_per_ep_rank"],
        lambda name: _slice_shape(name, shapes, slices),
    )
    return PortableState(
        {**weights, **merge_expert_slices(sliced.weights, slices)},
        merge_expert_slices(sliced.exp_avg, slices),
        merge_expert_slices(sliced.exp_avg_sq, slices),
        sliced.step,
    )


def _slice_shape(name: str, shapes: dict[str, torch.Size], slices: dict) -> torch.Size:
    """The shape of `name` in a sliced save: an expert tensor narrowed T ways along its slice dim."""
    split = split_slice_key(name, slices)
    if split is None:
        return shapes[name]
    shape, dim = list(shapes[split[0]]), slice_dim(split[0])
    if dim is not None:
        shape[dim] //= slices["etp_size"]
    return torch.Size(shape)


def _read_accelerate(ckpt: Path, weights: dict, shapes: dict) -> PortableState:
    saved = load_accelerate_optimizer(ckpt)
    # torch numbers optimizer state by position in the parameter groups, which
    # named_param_groups reproduces for the same model.
    names = [n for group in named_param_groups(shapes) for n in group]
    state = {names[i]: s for i, s in saved["state"].items()}
    step = int(next(iter(state.values()))["step"]) if state else 0
    return PortableState(
        weights,
        {n: s["exp_avg"].float() for n, s in state.items()},
        {n: s["exp_avg_sq"].float() for n, s in state.items()},
        step,
    )


def _read_zero_shards(
    shards: list[Path], weights: dict, ep_size: int, local_experts: int, shape_of: Callable[[str], torch.Size]
) -> PortableState:
    pieces: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    step = 0
    for rank, shard in enumerate(shards):
        osd = load_zero_shard(shard)
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            state = osd["base_optimizer_state"]["state"][g]
            step = int(state["step"])
            flat = {
                "fp32": osd["single_partition_of_fp32_groups"][g],
                "exp_avg": state["exp_avg"],
                "exp_avg_sq": state["exp_avg_sq"],
            }
            for local, frag in mapping.items():
                # Shards are read in rank order, so a parameter split across partitions
                # is reassembled by concatenating its fragments.
                # EP groups are consecutive ranks (DeepSpeed's default), so rank r is EP rank r % ep_size.
                name = local_to_hf_key(local, rank % ep_size, local_experts)
                for key, tensor in flat.items():
                    pieces[name][key].append(tensor.narrow(0, frag.start, frag.numel))
    full = {
        key: {n: torch.cat(p[key]).view(shape_of(n)) for n, p in pieces.items()}
        for key in ("fp32", "exp_avg", "exp_avg_sq")
    }
    weights.update(full["fp32"])  # the fp32 masters, exact even when the module ran in bf16
    return PortableState(weights, full["exp_avg"], full["exp_avg_sq"], step)


# ---- writing into a live engine --------------------------------------------------------------


def slice_state(state: PortableState, names: Iterable[str], slices: dict) -> PortableState:
    """`state` as one rank of a sliced (ETP) model holds it, under that model's `names`.

    A live sliced model names its expert slices as its checkpoint files do (`formats.split_slice_key`,
    `slices` as in expert_slices.json), so each name maps to (full expert key, slice t); the weight and
    both Adam moments are cut alike (AdamW is elementwise, so a slice's moments are the slice of the
    whole expert's). Every other tensor passes through.
    """
    where = {name: split_slice_key(name, slices) for name in names}

    def cut(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        if tensors is None:
            return None
        return {
            name: tensors[name]
            if split is None
            else slice_tensor(tensors[split[0]], split[0], split[1], slices["etp_size"])
            for name, split in where.items()
            if (name if split is None else split[0]) in tensors
        }

    return PortableState(
        cut(state.weights), cut(state.exp_avg), cut(state.exp_avg_sq), state.step, state.why_no_moments
    )


@torch.no_grad()
def apply_plain(named_params, optimizer, state: PortableState) -> None:
    """A torch optimizer over whole module parameters (accelerate, or DeepSpeed with ZeRO-0).
    `named_params` yields (HF name, parameter)."""
    fused = any(group.get("fused") for group in optimizer.param_groups)
    for name, param in named_params:
        param.copy_(state.weights[name])
        if state.exp_avg is not None and param.requires_grad:
            optimizer.state[param] = {
                "step": _step_tensor(state.step, param, fused),
                "exp_avg": state.exp_avg[name].to(param),
                "exp_avg_sq": state.exp_avg_sq[name].to(param),
            }


def _step_tensor(step: int, param: torch.Tensor, fused: bool) -> torch.Tensor:
    # torch's AdamW wants the step on the parameter's device when fused, on the CPU otherwise.
    return torch.tensor(float(step), device=param.device if fused else "cpu")


@torch.no_grad()
def apply_zero(ds_engine, state: PortableState, named_params) -> None:
    """DeepSpeed ZeRO-1/2 (or its bf16 optimizer): each rank writes its own fragments of the
    flat fp32 partitions. `named_params` yields (HF name, module parameter)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = ds_engine.optimizer
    if state.exp_avg is not None:
        base = zero.optimizer  # Adam states are created lazily at the first step: create them now
        for group in base.param_groups:
            for flat in group["params"]:
                base.state[flat] = {
                    "step": _step_tensor(state.step, flat, bool(group.get("fused"))),
                    "exp_avg": torch.zeros_like(flat),
                    "exp_avg_sq": torch.zeros_like(flat),
                }
        zero._lazy_init_hp_params_optimizer_state()
    for name, param in named_params:
        param.copy_(state.weights[name])
        safe_set_full_fp32_param(param, state.weights[name])
        if state.exp_avg is not None and param.requires_grad:  # a frozen weight (LoRA's base) has no moments
            safe_set_full_optimizer_state(param, state.exp_avg[name], "exp_avg")
            safe_set_full_optimizer_state(param, state.exp_avg_sq[name], "exp_avg_sq")
