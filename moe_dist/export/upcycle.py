"""Sparse upcycling: a dense checkpoint read as an MoE's starting weights (`--upcycle_experts E`).

Komatsuzaki et al. 2022 (arXiv:2212.05055): every routed FFN becomes E copies of the dense FFN and gets a new
router; attention, norms, embeddings and the head are copied as they are. With the gate weights renormalised
over the chosen experts (`norm_topk_prob`) the copies compute exactly the dense FFN whatever the router picks,
so the step-0 model is the dense one. Two published ways to break the copies' symmetry, both seeded per
(layer, expert) so every rank and every resume draws the same:

- `noise`: multiplicative noise on each copy's weights, w * (1 + noise * N(0, 1));
- `reinit`: Drop-Upcycling (Nakamura et al. 2025, arXiv:2502.19261): a fraction of each copy's intermediate
  channels (the same rows of up/gate and columns of down) is drawn again from a normal with the dense
  matrix's own mean and std.

`UpcycleSource` is a weight source (`read(name)`, `has(name)`, see `sources`): the trainer fills a
meta-device model from it after sharding, so each rank copies only its own experts.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..model.configuration import MoEConfig

_EXPERT = re.compile(r"^(?P<prefix>model\.layers\.(?P<layer>\d+)\.mlp)\.experts\.(?P<expert>\d+)\.(?P<rest>.+)$")
_SHARED = re.compile(r"^(?P<prefix>model\.layers\.\d+\.mlp)\.shared_mlp\.(?P<rest>.+)$")
_ROUTER = re.compile(r"^model\.layers\.(?P<layer>\d+)\.mlp\.router\.weight$")


def _salt(name: str) -> int:
    """A stable number per tensor name (str hashes differ between processes)."""
    return zlib.crc32(name.encode()) % 997 + 1


@dataclass(frozen=True)
class Upcycling:
    """How the dense FFNs become experts; recorded in run.json and summary.json."""

    experts: int
    noise: float = 0.0
    reinit: float = 0.0
    seed: int = 0

    def record(self) -> dict:
        return asdict(self)


def source_record(folder: Path) -> dict:
    """The dense source as summary.json and the model card cite it: its path, and the steps and validation
    perplexity of the run it came from when its summary.json is there (in it, or above an `hf/`)."""
    record = {"path": str(Path(folder).resolve())}
    for summary in (Path(folder) / "summary.json", Path(folder).parent / "summary.json"):
        if summary.is_file():
            data = json.loads(summary.read_text())
            record.update({k: data.get(k) for k in ("steps", "final_val_ppl", "final_val_loss", "model")})
            break
    return record


def step0_description(config: MoEConfig, upcycling: Upcycling) -> str:
    """What the upcycled model computes before its first step, in words for the log."""
    parts = []
    if config.norm_topk_prob:
        parts.append("the dense FFN exactly: renormalised gates over identical copies")
    else:
        parts.append(f"each token's dense FFN output times its gate weight (softmax probabilities of the "
                     f"{config.num_experts_per_tok} chosen of {config.num_local_experts} experts, not renormalised: "
                     f"about {config.num_experts_per_tok / config.num_local_experts:.2g} at a fresh router); "
                     f"--norm_topk_prob true keeps the dense function")
    if upcycling.noise or upcycling.reinit:
        parts.append(f"copies perturbed as asked (noise std {upcycling.noise:g}, {upcycling.reinit:.0%} of "
                     f"channels re-initialised)")
    if config.num_shared_experts:
        parts.append(f"plus {config.num_shared_experts} shared expert(s) holding the dense FFN: it is counted twice")
    if config.capacity_factor is not None:
        parts.append(f"routes past capacity (factor {config.capacity_factor:g}) are dropped: --dropless keeps them")
    return "; ".join(parts)


def moe_fields(dense: dict, upcycling: Upcycling) -> dict:
    """Our config fields for the MoE a dense config becomes: experts as wide as the dense FFN, with its biases."""
    return {**dense, "num_local_experts": upcycling.experts, "moe_intermediate_size": dense["intermediate_size"],
            "expert_bias": dense.get("bias", False)}


class UpcycleSource:
    """`dense` (a weight source under our names, for the dense model) read as the upcycled MoE's weights."""

    def __init__(self, dense, config: MoEConfig, upcycling: Upcycling):
        self.dense, self.config, self.upcycling = dense, config, upcycling

    def has(self, name: str) -> bool:
        return not name.endswith(".router.score_bias") and self.dense.has(self._dense_name(name))

    def read(self, name: str) -> torch.Tensor:
        if m := _ROUTER.match(name):
            # A fresh router: with identical experts and renormalised gates its choice does not change the
            # output, and its first choices are what break the copies' tie (Komatsuzaki et al. §3.1).
            gen = self._generator(int(m["layer"]), -1, 0)
            return torch.randn(self.config.num_local_experts, self.config.hidden_size, generator=gen) * \
                self.config.initializer_range
        if m := _EXPERT.match(name):
            return self._copy(self.dense.read(f"{m['prefix']}.{m['rest']}").float(), int(m["layer"]),
                              int(m["expert"]), m["rest"])
        if m := _SHARED.match(name):
            return self._shared(self.dense.read(f"{m['prefix']}.{m['rest']}").float(), m["rest"])
        return self.dense.read(name)

    @staticmethod
    def _dense_name(name: str) -> str:
        for pattern in (_EXPERT, _SHARED):
            if m := pattern.match(name):
                return f"{m['prefix']}.{m['rest']}"
        return name

    def _generator(self, layer: int, expert: int, salt: int) -> torch.Generator:
        seed = (self.upcycling.seed * 1_000_003 + layer * 10_007 + (expert + 1) * 101 + salt) % 2**63
        return torch.Generator().manual_seed(seed)

    def _copy(self, tensor: torch.Tensor, layer: int, expert: int, rest: str) -> torch.Tensor:
        """Expert `expert`'s copy of a dense FFN tensor, with the asked-for noise and re-initialisation."""
        u = self.upcycling
        if u.reinit > 0:
            tensor = self._reinit(tensor, layer, expert, rest)
        if u.noise > 0 and rest.endswith(".weight"):
            noise = torch.randn(tensor.shape, generator=self._generator(layer, expert, _salt(rest)))
            tensor = tensor * (1 + u.noise * noise)
        return tensor

    def _reinit(self, tensor: torch.Tensor, layer: int, expert: int, rest: str) -> torch.Tensor:
        width = self.config.moe_intermediate_size
        count = round(self.upcycling.reinit * width)
        if count == 0 or rest.startswith("down_proj.bias"):
            return tensor  # the down bias is not per channel
        channels = torch.randperm(width, generator=self._generator(layer, expert, 0))[:count]  # same for every tensor
        gen = self._generator(layer, expert, _salt(rest) + 1000)
        out = tensor.clone()
        down = rest.startswith("down_proj")  # down: [D, I], the channels are columns; up/gate: [I, D] rows, [I]
        picked = out[:, channels] if down else out[channels]
        fresh = torch.randn(picked.shape, generator=gen) * tensor.std() + tensor.mean()
        if down:
            out[:, channels] = fresh
        else:
            out[channels] = fresh
        return out

    def _shared(self, tensor: torch.Tensor, rest: str) -> torch.Tensor:
        """n shared experts (one MLP of n x the dense width): n copies side by side, each down-projection
        scaled by 1/n, so the shared MLP alone computes the dense FFN."""
        n = self.config.num_shared_experts
        if rest.startswith("down_proj.weight"):
            return torch.cat([tensor / n] * n, dim=1)
        if rest.startswith("down_proj.bias"):
            return tensor
        return torch.cat([tensor] * n, dim=0)
