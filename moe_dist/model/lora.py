"""LoRA (Hu et al. 2021, arXiv:2106.09685) on the attention projections, every routed expert, the shared
experts and the dense FFNs, with the base weights frozen.

A targeted `nn.Linear` becomes a `LoRALinear` that keeps the same `weight` and `bias` parameters and
adds its own `lora_A` [r, in] and `lora_B` [out, r]:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T

The adapters are parameters of the projection itself, so their checkpoint keys are the projection's
plus `.lora_A` / `.lora_B` (`model.layers.1.mlp.experts.3.gate_proj.lora_A`), the base keys do not
change, and the adapters go wherever the projection goes: into DeepSpeed's expert container under EP
and, cut like their projection, into an ETP slice (`checkpoint.formats.slice_dim`). Each routed expert
has its own A and B for gate, up and down. The experts' stacked paths (grouped GEMM, EP's capacity
buffer) run every expert's adapter term at once through `LoRALinear.stacked_delta`.

This file is not imported by `modeling.py`: an export ships merged weights (`merge_lora`), never
`LoRALinear`s.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .modeling import Attention, DecoderLayer
from .moe import FeedForward, MoEBlock

TARGETS = ("attention", "experts", "shared_experts", "mlp")
"""`attention`: q/k/v/o of every layer; `experts`: gate/up/down of every routed expert; `shared_experts`:
the shared experts' MLP; `mlp`: the dense FFN of the layers that have no MoE block."""

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# grouped_mm wants every non-unit stride a multiple of 16 bytes: a rank padded to 8 satisfies fp32 and bf16.
_RANK_ALIGN = 8


@dataclass(frozen=True)
class LoRAConfig:
    """rank r >= 1, alpha (the update is scaled by alpha / r), dropout on the adapter's input, and `targets`
    (a subset of `TARGETS`). Bad values raise one-line `ValueError`s naming the field, value and valid values."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora_rank={self.rank!r} is invalid: valid values are integers >= 1")
        if not self.alpha > 0:
            raise ValueError(f"lora_alpha={self.alpha!r} is invalid: valid values are numbers > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora_dropout={self.dropout!r} is invalid: valid values are in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(
                f"lora_targets={','.join(self.targets)!r} is invalid: "
                f"{'unknown ' + ', '.join(unknown) if unknown else 'empty'}; valid targets are {', '.join(TARGETS)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def record(self) -> dict:
        """As run.json and a checkpoint's lora.json keep it (`LoRAConfig(**record)` reads it back)."""
        return {
            "rank": self.rank,
            "alpha": float(self.alpha),
            "dropout": float(self.dropout),
            "targets": list(self.targets),
        }


class LoRALinear(nn.Linear):
    """An `nn.Linear` (the same `weight`/`bias` parameters, not copies) with a low-rank update.

    A starts Kaiming-uniform (a = sqrt(5), as `nn.Linear` and PEFT's LoRA init it) and B at zero, so
    the adapted model starts as the base model.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.scale = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, self.dropout, self.training)
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(h, self.lora_A), self.lora_B)

    @staticmethod
    def stacked_delta(projs: list[LoRALinear], h: torch.Tensor, matmul: Callable) -> torch.Tensor:
        """Every expert's adapter term at once, for `LocalExperts`' stacked paths: `matmul(h, w_EOI)` is the
        path's own per-expert product (grouped GEMM over sorted rows, or a batched matmul on [E, C, I]).

        The rank is zero-padded to a multiple of 8 for grouped_mm's stride rule; the padding adds exact zeros.
        """
        first = projs[0]
        pad = -first.rank % _RANK_ALIGN
        a_ErI = F.pad(torch.stack([p.lora_A for p in projs]).to(h.dtype), (0, 0, 0, pad))
        b_EOr = F.pad(torch.stack([p.lora_B for p in projs]).to(h.dtype), (0, pad))
        h = F.dropout(h, first.dropout, first.training)
        return first.scale * matmul(matmul(h, a_ErI), b_EOr)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}"


def _projections(model: nn.Module, targets: tuple[str, ...]) -> Iterator[tuple[nn.Module, str]]:
    """(owner, attribute) of every `nn.Linear` that `targets` names."""
    for module in model.modules():
        owners: list[nn.Module] = []
        if isinstance(module, Attention) and "attention" in targets:
            yield from ((module, name) for name in ATTENTION_PROJECTIONS)
        elif isinstance(module, DecoderLayer) and isinstance(module.mlp, FeedForward) and "mlp" in targets:
            owners = [module.mlp]
        elif isinstance(module, MoEBlock):
            if "shared_experts" in targets and module.shared_mlp is not None:
                owners.append(module.shared_mlp)
            if "experts" in targets:  # any container: LocalExperts, or DeepSpeed's under EP
                owners += [m for m in module.experts.modules() if isinstance(m, FeedForward)]
        for owner in owners:
            yield from ((owner, name) for name in FFN_PROJECTIONS if getattr(owner, name) is not None)


def adapters(model: nn.Module) -> Iterator[tuple[nn.Module, str, LoRALinear]]:
    """(owner, attribute, projection) of every `LoRALinear` in `model`."""
    for owner in model.modules():
        for name, child in owner.named_children():
            if isinstance(child, LoRALinear):
                yield owner, name, child


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freeze every parameter of `model` and give each projection `cfg.targets` names its own adapter.

    Apply it to the whole model before EP or ETP shards the experts, as every rank builds the whole
    model alike: the sharding then tags and slices the adapters with their experts. A draws from torch's
    global generator in module order, so the same seed gives the same adapters on every rank; the trainer
    then sets them by key (`initial_factor`), which also holds for a model filled after sharding.
    """
    if next(adapters(model), None) is not None:
        raise ValueError("apply_lora: the model already has LoRA adapters")
    for param in model.parameters():
        param.requires_grad_(False)
    for owner, name in list(_projections(model, cfg.targets)):
        setattr(owner, name, LoRALinear(getattr(owner, name), cfg.rank, cfg.alpha, cfg.dropout))
    return model


def initial_factor(name: str, shape: torch.Size, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The starting value of the adapter factor under checkpoint key `name`: B zeros; A Kaiming-uniform
    (a = sqrt(5)) from a generator seeded by (seed, key).

    The key names the layer, the global expert id and the projection, so A does not depend on the order
    modules are built in, on how many experts a rank holds, or on whether the model was built on the meta
    device and filled later (`--init_from`): every layout starts from the same adapters, as `_init_experts`
    in `modeling.py` seeds the experts themselves.
    """
    if name.endswith(".lora_B"):
        return torch.zeros(shape, dtype=dtype)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=gen).to(dtype)


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """Set every adapter factor of `model` (whole, before sharding) to its `initial_factor`."""
    for name, param in adapter_parameters(model):
        param.copy_(initial_factor(name, param.shape, seed, param.dtype))


def adapt_like(module: nn.Module, like: nn.Module) -> nn.Module:
    """Give `module`'s direct projections the adapters (rank, alpha, dropout) that `like`'s have: for a module
    rebuilt at another shape, such as an ETP slice of an expert. The values are the caller's to copy."""
    for name, child in like.named_children():
        if isinstance(child, LoRALinear):
            setattr(module, name, LoRALinear(getattr(module, name), child.rank, child.alpha, child.dropout))
    return module


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold scale * B @ A into every adapted weight (in fp32, rounded once to the weight's dtype) and put the
    plain `nn.Linear` back, with the same parameter objects. `requires_grad` is left as it is."""
    for owner, name, lora in list(adapters(model)):
        weight = lora.weight
        weight.copy_(merged_weight(weight, lora.lora_A, lora.lora_B, lora.scale))
        plain = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None, device="meta")
        plain.weight = weight
        plain.bias = lora.bias
        setattr(owner, name, plain)
    return model


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A, computed in fp32 and rounded once to W's dtype."""
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


def fold_adapters(tensors: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """`tensors` (checkpoint key -> tensor) with each `<proj>.lora_A` / `.lora_B` pair folded into `<proj>.weight`
    (`merged_weight`) and dropped: what `merge_lora` does to a model, done to a state dict (one layer of it)."""
    out = {k: v for k, v in tensors.items() if not k.endswith((".lora_A", ".lora_B"))}
    for key, a in tensors.items():
        if key.endswith(".lora_A"):
            proj = key.removesuffix(".lora_A")
            out[f"{proj}.weight"] = merged_weight(tensors[f"{proj}.weight"], a, tensors[f"{proj}.lora_B"], scale)
    return out


def adapter_parameters(model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    """(name, parameter) of every adapter factor, under its checkpoint key."""
    return ((n, p) for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B")))
