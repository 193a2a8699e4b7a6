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

Fine-grained upcycling (`granularity` G; He et al. 2024, arXiv:2410.07524): each copy is split along its
intermediate channels into G experts of 1/G the dense width, so a layer has E x G experts and routes each token
to k x G. The G slices of a copy share one router row: their logits tie, so the top k x G are whole copies, and
each slice gets 1/G of its copy's gate. Scaling the slices' down-projections by G (the output bias is per copy,
kept) makes every chosen copy compute its dense FFN times its gate again: the step-0 model is the coarse one's.

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

    experts: int  # copies of the dense FFN
    noise: float = 0.0
    reinit: float = 0.0
    seed: int = 0
    granularity: int = 1  # experts per copy, each 1/granularity of the dense width

    @property
    def total_experts(self) -> int:
        return self.experts * self.granularity

    def record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> Upcycling:
        """Read back from run.json; a record from before `granularity` existed was written by coarse upcycling."""
        return cls(**record)

    def describe(self) -> str:
        """The layer it makes, in words: "4 experts", or "4 copies split into 2 (8 experts of 1/2 the dense width)"."""
        if self.granularity == 1:
            return f"{self.experts} experts"
        return (
            f"{self.experts} copies split into {self.granularity} ({self.total_experts} experts of "
            f"1/{self.granularity} the dense width)"
        )


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
    if config.router_type == "random":
        parts.append("the dense FFN exactly: equal gates over the chosen identical copies")
    elif config.norm_topk_prob:
        parts.append("the dense FFN exactly: renormalised gates over identical copies")
    else:
        parts.append(
            f"each token's dense FFN output times its gate weight (softmax probabilities of the "
            f"{config.num_experts_per_tok} chosen of {config.num_local_experts} experts, not renormalised: "
            f"about {config.num_experts_per_tok / config.num_local_experts:.2g} at a fresh router"
            f"{', summed over a copy' if upcycling.granularity > 1 else ''}); "
            f"--norm_topk_prob true keeps the dense function"
        )
    if upcycling.noise or upcycling.reinit:
        parts.append(
            f"copies perturbed as asked (noise std {upcycling.noise:g}, {upcycling.reinit:.0%} of "
            f"channels re-initialised)"
        )
    if config.num_shared_experts:
        parts.append(f"plus {config.num_shared_experts} shared expert(s) holding the dense FFN: it is counted twice")
    if config.capacity_factor is not None:
        parts.append(f"routes past capacity (factor {config.capacity_factor:g}) are dropped: --dropless keeps them")
    return "; ".join(parts)


def moe_fields(dense: dict, upcycling: Upcycling, top_k: int) -> dict:
    """Our config fields for the MoE a dense config becomes with `top_k` copies per token: experts as wide as the
    dense FFN (1/granularity of it when fine-grained, top_k scaled to match), with its biases."""
    G = upcycling.granularity
    return {
        **dense,
        "num_local_experts": upcycling.total_experts,
        "num_experts_per_tok": top_k * G,
        "moe_intermediate_size": dense["intermediate_size"] // G,
        "expert_bias": dense.get("bias", False),
    }


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
            # A copy's slices share its row (see the module's note on granularity).
            gen = self._generator(int(m["layer"]), -1, 0)
            rows = torch.randn(self.upcycling.experts, self.config.hidden_size, generator=gen)
            return rows.repeat_interleave(self.upcycling.granularity, dim=0) * self.config.initializer_range
        if m := _EXPERT.match(name):
            expert = int(m["expert"])
            tensor = self._slice(self.dense.read(f"{m['prefix']}.{m['rest']}").float(), expert, m["rest"])
            return self._copy(tensor, int(m["layer"]), expert, m["rest"])
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

    def _slice(self, tensor: torch.Tensor, expert: int, rest: str) -> torch.Tensor:
        """Expert `expert`'s slice of its copy: intermediate channels [s * I, (s + 1) * I) for slice s, its
        down-projection scaled by the granularity; the whole tensor when coarse."""
        G = self.upcycling.granularity
        if G == 1 or rest.startswith("down_proj.bias"):
            return tensor
        width, start = self.config.moe_intermediate_size, expert % G * self.config.moe_intermediate_size
        if rest.startswith("down_proj"):  # [D, I]: the channels are columns
            return tensor[:, start : start + width] * G
        return tensor[start : start + width]

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
        """n shared experts (one MLP of n experts' width, n / granularity dense widths): that many dense copies
        side by side, each down-projection scaled by their inverse count, so the shared MLP computes the dense FFN."""
        n = self.config.num_shared_experts // self.upcycling.granularity
        if rest.startswith("down_proj.weight"):
            return torch.cat([tensor / n] * n, dim=1)
        if rest.startswith("down_proj.bias"):
            return tensor
        return torch.cat([tensor] * n, dim=0)
