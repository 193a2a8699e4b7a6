"""Our tensor names against the names a stock class's checkpoint holds on disk, with the transform each way.

The disk names are what `save_pretrained` of transformers 5.25 writes and what hub checkpoints hold (experts
one tensor each: `mlp.experts.{e}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{e}.w1.weight`);
`from_pretrained` merges them into its fused in-memory experts itself. One list of `Pair`s per (config,
format) serves both directions: the exporter writes `to_disk` of our tensors, `--init_from` reads each disk
tensor lazily and splits it with `to_ours`, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model.configuration import MoEConfig
from ..model.modeling import MoEForCausalLM


def _one(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def _single(tensor: torch.Tensor) -> list[torch.Tensor]:
    return [tensor]


@dataclass(frozen=True)
class Pair:
    """Our tensors `ours` (usually one) stored as the one disk tensor `disk`."""

    ours: tuple[str, ...]
    disk: str
    to_disk: Callable[[list[torch.Tensor]], torch.Tensor] = _one
    to_ours: Callable[[torch.Tensor], list[torch.Tensor]] = _single


# The prefix of the base model inside each class's LM (`base_model_prefix`). A folder saved from the base model
# alone, as the released `gpt2` is (`wte.weight`, `h.0.attn.c_attn.weight`), holds its tensors without it, and
# every stock class's loader accepts both layouts.
BASE_PREFIX = {"gpt2": "transformer."}


def disk_names(disk: str, fmt: str) -> tuple[str, ...]:
    """The names a disk tensor may be stored under: as the LM saves it, then without the base model's prefix."""
    prefix = BASE_PREFIX.get(fmt, "model.")
    return (disk, disk[len(prefix) :]) if disk.startswith(prefix) else (disk,)


def our_tensor_names(config: MoEConfig) -> list[str]:
    """Every tensor our model saves for `config`: parameters (a tied head counted once, as the embedding) and
    persistent buffers (the routers' selection bias)."""
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    names = [n for n, _ in model.named_parameters()]
    return names + [n for n in model.state_dict() if n.endswith(".score_bias")]


def key_pairs(config: MoEConfig, fmt: str) -> list[Pair]:
    """The pairs of `fmt` for a model of `config`; our tensors without a disk counterpart (a Mixtral
    router's selection bias, which the exporter checks is zero) are left out."""
    if fmt == "gpt2":
        return _gpt2_pairs(config)
    pairs = [_modern_pair(name, config, fmt) for name in our_tensor_names(config)]
    if fmt == "ernie4_5_moe" and config.bias:  # Ernie's `use_bias` includes the LM head; ours has none
        pairs.append(Pair((), "lm_head.bias", lambda _: torch.zeros(config.vocab_size)))
    return [p for p in pairs if p is not None]


_MIXTRAL_EXPERT = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.")


def _modern_pair(name: str, config: MoEConfig, fmt: str) -> Pair | None:
    disk = name.replace(".input_norm.", ".input_layernorm.").replace(
        ".post_attention_norm.", ".post_attention_layernorm."
    )
    if name.endswith(".mlp.router.score_bias"):
        if fmt != "ernie4_5_moe":
            return None
        return Pair(
            (name,),
            disk.replace(".router.score_bias", ".moe_statics.e_score_correction_bias"),
            lambda t: t[0].float().unsqueeze(0),
            lambda t: [t.squeeze(0)],
        )  # [1, E]: one expert group
    if fmt == "mixtral":
        disk = disk.replace(".mlp.router.", ".block_sparse_moe.gate.")
        disk = _EXPERT.sub(lambda m: f".block_sparse_moe.experts.{m[1]}.{_MIXTRAL_EXPERT[m[2]]}.", disk)
    else:
        disk = disk.replace(".mlp.router.", ".mlp.gate.").replace(".mlp.shared_mlp.", ".mlp.shared_experts.")
    if fmt == "ernie4_5_moe" and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
        perm = _interleave(config.head_dim)
        return Pair((name,), disk, lambda t: _permute_rows(t[0], perm), lambda t: [_permute_rows(t, perm.argsort())])
    return Pair((name,), disk)


def _interleave(head_dim: int) -> torch.Tensor:
    """Ernie rotates (2j, 2j + 1) at frequency j, ours (j, j + hd/2): row j goes to 2j and row j + hd/2 to
    2j + 1 in every head. q.k is unchanged because q and k are permuted alike."""
    return torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)  # 0, hd/2, 1, hd/2 + 1, ...


def _permute_rows(weight: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Rows of a q/k projection (weight [H*hd, D] or bias [H*hd]) permuted within every head."""
    heads = weight.reshape(-1, len(perm), *weight.shape[1:])
    return heads.index_select(1, perm).reshape(weight.shape)


def _gpt2_pairs(config: MoEConfig) -> list[Pair]:
    """GPT-2's Conv1D layers store [in, out] and always carry biases (zeros when ours have none); its
    attention keeps q, k and v in one `c_attn`."""
    D, F = config.hidden_size, config.intermediate_size
    t = (lambda x: x[0].t().contiguous(), lambda x: [x.t().contiguous()])

    def linear(ours: str, disk: str, out: int) -> list[Pair]:
        weight = Pair((f"{ours}.weight",), f"{disk}.weight", *t)
        return [weight, _bias(config, f"{ours}.bias", f"{disk}.bias", out)]

    def norm(ours: str, disk: str) -> list[Pair]:
        return [Pair((f"{ours}.weight",), f"{disk}.weight"), _bias(config, f"{ours}.bias", f"{disk}.bias", D)]

    pairs = [
        Pair(("model.embed_tokens.weight",), "transformer.wte.weight"),
        Pair(("model.embed_positions.weight",), "transformer.wpe.weight"),
        *norm("model.norm", "transformer.ln_f"),
    ]
    if not config.tie_word_embeddings:
        pairs.append(Pair(("lm_head.weight",), "lm_head.weight"))
    for i in range(config.num_hidden_layers):
        ours, theirs = f"model.layers.{i}", f"transformer.h.{i}"
        qkv = tuple(f"{ours}.self_attn.{p}_proj" for p in "qkv")
        pairs += [
            *norm(f"{ours}.input_norm", f"{theirs}.ln_1"),
            *norm(f"{ours}.post_attention_norm", f"{theirs}.ln_2"),
            Pair(
                tuple(f"{k}.weight" for k in qkv),
                f"{theirs}.attn.c_attn.weight",
                lambda x: torch.cat(x).t().contiguous(),
                lambda x: list(x.t().split(D)),
            ),
            *linear(f"{ours}.self_attn.o_proj", f"{theirs}.attn.c_proj", D),
            *linear(f"{ours}.mlp.up_proj", f"{theirs}.mlp.c_fc", F),
            *linear(f"{ours}.mlp.down_proj", f"{theirs}.mlp.c_proj", D),
        ]
        if config.bias:
            pairs.append(
                Pair(
                    tuple(f"{k}.bias" for k in qkv), f"{theirs}.attn.c_attn.bias", torch.cat, lambda x: list(x.split(D))
                )
            )
        else:
            pairs.append(Pair((), f"{theirs}.attn.c_attn.bias", lambda _: torch.zeros(3 * D)))
    return pairs


def _bias(config: MoEConfig, ours: str, disk: str, rows: int) -> Pair:
    # GPT-2 always has biases; a model trained without them gets zeros, which add nothing.
    return Pair((ours,), disk) if config.bias else Pair((), disk, lambda _: torch.zeros(rows))
