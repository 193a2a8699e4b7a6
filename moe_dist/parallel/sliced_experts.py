"""Generation with sliced experts: the inference use of the expert-tensor-parallel layout.

`deepspeed --num_gpus T launch/generate.py --etp_size T ...` runs T ranks. Every rank holds the
whole non-expert model and the same prompts, so every rank routes every token the same way. Each
rank t holds slice t of T of EVERY expert, cut by the rule training's ETP uses (`slice_dim`, as in
`expert_tensor_parallel.slice_expert`): W1/W3 (up/gate) by output columns with their biases, W2
(down) by input rows, the down bias on slice 0 only (a zero on the others). A rank runs its slices
on all tokens, and one all-reduce (sum) per MoE layer over the T ranks gives every rank the full
expert output. Shared experts are sliced the same way and summed in the same all-reduce.

Loading reads only this rank's slice of each expert tensor from the export's safetensors file(s)
(`safe_open(...).get_slice`) and builds the model at the narrow expert width, so a rank never
holds more than the non-expert weights plus 1/T of the experts (plus one expert tensor's slice in
flight). The logits differ from one process's only by the order of the sums: the greedy text is
the same (tests/test_generate_sliced.py).
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.formats import slice_dim
from ..model import MoEConfig, MoEForCausalLM
from ..model.moe import FeedForward, LocalExperts, MoEBlock
from ..model.routing import Routing
from .expert_parallel import divisors

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# A rank waits this long at one collective for its peers (torch's default for gloo).
TIMEOUT_S = 1800
# A routed or shared expert's tensor in an export (the dense FFN of a non-MoE layer is `mlp.up_proj...`).
_EXPERT_KEY = re.compile(r"\.mlp\.(?:experts\.\d+|shared_mlp)\.(?:up_proj|gate_proj|down_proj)\.(?:weight|bias)$")


class SlicedExpertsError(ValueError):
    """A bad `--etp_size` for this model or launch; the message is one line naming the flag and what is valid."""


def check_etp_size(model_dir: Path, etp_size: int, world_size: int) -> None:
    """Refuse an `--etp_size` that cannot slice this export over this launch (before any process group)."""
    from transformers import AutoConfig

    if etp_size < 1:
        raise SlicedExpertsError(f"--etp_size {etp_size}: must be >= 1 (1 = every rank holds whole experts)")
    if etp_size == 1:
        return
    config = AutoConfig.from_pretrained(model_dir)
    if not isinstance(config, MoEConfig):
        raise SlicedExpertsError(
            f"--etp_size {etp_size}: {model_dir} is a {config.model_type!r} model; slicing "
            f"reads moe_dist exports (model_type 'moe_dist'), valid value here: 1"
        )
    if not config.num_local_experts:
        raise SlicedExpertsError(
            f"--etp_size {etp_size}: {model_dir} is a dense model (num_local_experts=0), "
            f"it has no experts to slice; valid value: 1"
        )
    width = config.moe_intermediate_size
    if width % etp_size:
        raise SlicedExpertsError(
            f"--etp_size {etp_size} does not divide the expert width moe_intermediate_size="
            f"{width}: valid values are {divisors(width)}"
        )
    if world_size != etp_size:
        raise SlicedExpertsError(
            f"--etp_size {etp_size} needs one rank per slice, but this launch has "
            f"WORLD_SIZE={world_size}: valid here is --etp_size 1"
            + (f" or {world_size}" if world_size > 1 and width % world_size == 0 else "")
            + f"; slice over {etp_size} ranks with `deepspeed --num_gpus {etp_size} "
            f"launch/generate.py --etp_size {etp_size} ...`"
        )
    from safetensors import SafetensorError

    try:
        files = _weight_files(model_dir)
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # a broken safetensors header or index
        raise SlicedExpertsError(
            f"--model_path {model_dir}: cannot read the weights' index ({type(e).__name__}: "
            f"{(str(e).strip().splitlines() or [''])[0]})"
        ) from None
    if not files:
        raise SlicedExpertsError(
            f"--etp_size {etp_size} reads each rank's slices from safetensors, but "
            f"{model_dir} has neither {SAFETENSORS} nor {SAFETENSORS_INDEX}; valid value "
            f"for this folder: 1 (or re-save it with save_pretrained)"
        )


# ---- the layer --------------------------------------------------------------------------------


class SlicedExperts(nn.Module):
    """One MoE block's experts as this rank's slices: routed (a `LocalExperts` of narrow `FeedForward`s)
    and shared (one narrow `FeedForward`, or None). `forward` takes `LocalExperts`' call and returns
    the full output, summed over `group`; `partial` is this rank's share of it."""

    def __init__(self, experts: LocalExperts, shared: FeedForward | None, group=None):
        super().__init__()
        self.experts, self.shared, self.group = experts, shared, group

    def partial(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        y_TD = self.experts(x_TD, routing)
        return y_TD if self.shared is None else y_TD + self.shared(x_TD)

    def forward(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        y_TD = self.partial(x_TD, routing)
        dist.all_reduce(y_TD, group=self.group)  # inference only: no autograd through it
        return y_TD


def use_sliced_experts(model: nn.Module, group=None) -> int:
    """Put every MoE block's experts (already narrow) behind one all-reduce over `group`; returns how many blocks.

    The block's shared experts move into the same module, so its output still is experts + shared.
    """
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock) and isinstance(m.experts, LocalExperts)]
    for block in blocks:
        block.experts, block.shared_mlp = SlicedExperts(block.experts, block.shared_mlp, group), None
    return len(blocks)


# ---- loading one slice ------------------------------------------------------------------------


def _weight_files(model_dir: Path) -> dict[str, Path] | None:
    """{key: file} for a safetensors export, single-file or sharded; None when it has no safetensors."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    if (model_dir / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((model_dir / SAFETENSORS_INDEX).read_text())["weight_map"]
        return {key: model_dir / name for key, name in weight_map.items()}
    if (model_dir / SAFETENSORS).is_file():
        with safe_open(model_dir / SAFETENSORS, framework="pt") as f:
            return dict.fromkeys(f.keys(), model_dir / SAFETENSORS)
    return None


def read_slice(model_dir: Path, t: int, etp_size: int) -> dict[str, torch.Tensor]:
    """The export's state dict with every expert tensor cut to slice t of `etp_size`; the rest whole.

    Only the slice is read from disk. The down bias of slices t > 0 is a zero: added once per
    token, it belongs to slice 0 (`slice_dim` returns None for it).
    """
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for key, path in _weight_files(model_dir).items():
        by_file.setdefault(path, []).append(key)
    state = {}
    for path, keys in by_file.items():
        with safe_open(path, framework="pt") as f:
            for key in keys:
                if not _EXPERT_KEY.search(key):
                    state[key] = f.get_tensor(key)
                    continue
                dim = slice_dim(key)
                if dim is None:
                    bias = f.get_tensor(key)
                    state[key] = bias if t == 0 else torch.zeros_like(bias)
                    continue
                part = f.get_slice(key)
                n = part.get_shape()[dim] // etp_size
                state[key] = part[t * n : (t + 1) * n] if dim == 0 else part[:, t * n : (t + 1) * n]
    return state


def load_sliced_model(model_dir: Path, t: int, etp_size: int, device: torch.device, group=None):
    """The export with only slice t of every expert, its MoE blocks summing over `group`, on `device`, in eval mode.

    The model is built at expert width moe_intermediate_size / etp_size from `read_slice`'s state
    dict; its config then gets the export's width back, so it still describes the exported model.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    width = config.moe_intermediate_size
    config.moe_intermediate_size = width // etp_size
    model = MoEForCausalLM.from_pretrained(None, config=config, state_dict=read_slice(model_dir, t, etp_size))
    model.config.moe_intermediate_size = width
    use_sliced_experts(model, group)
    return model.to(device).eval()


def start_process_group(device: torch.device) -> bool:
    """torch.distributed from the launcher's environment (gloo on CPU, nccl on CUDA), unless one is already
    up; True when this call started it (and so should end it with `shutdown_distributed`).

    Plain torch, not `deepspeed.init_distributed`: generation needs no DeepSpeed, whose backend follows
    its accelerator rather than the device asked for, and whose CPU backend maps a shared-memory
    segment per rank."""
    if dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=timedelta(seconds=TIMEOUT_S),
        device_id=device if device.type == "cuda" else None,
    )
    return True
