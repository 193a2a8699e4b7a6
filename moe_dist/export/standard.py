"""Our config and weights -> a standard transformers class's config and weights, or the field it cannot represent.

Read against the installed transformers 5.24 (models/gpt2, mixtral, ernie4_5_moe), field by field:

    gpt2          dense GPT-2 block only: LayerNorm, learned positions, tanh-GELU (`gelu_new`), MHA. Its
                  Conv1D layers store weights as [in, out] and always carry biases (zeros when ours have none).
    mixtral       every FFN routed, RMSNorm, rotate-half RoPE, GQA, SwiGLU experts, no bias anywhere; softmax ->
                  top-k -> always renormalised; no shared experts, no selection bias, no capacity.
    ernie4_5_moe  as Mixtral, plus: a selection bias added to the probabilities for top-k only
                  (`moe_statics.e_score_correction_bias`, our `score_bias`), shared experts (one MLP of
                  n x moe_intermediate_size, like ours), dense layers placed by `moe_layer_start_index` /
                  `moe_layer_interval` / `moe_layer_end_index`, and one `use_bias` for attention, dense and
                  shared MLPs and the LM head. Its RoPE rotates interleaved pairs (0::2, 1::2), so the q/k
                  rows of every head are permuted; its renormalisation divides by max(sum, moe_norm_min).

Both MoE classes stack experts as `gate_up_proj` [E, 2I, D] (gate rows first: `.chunk(2)` gives gate, up)
and `down_proj` [E, D, I] in memory; `save_pretrained` writes them back in each family's hub layout
(Mixtral: `block_sparse_moe.experts.{e}.w1/w2/w3`), which is what other serving stacks read. Training-only fields (capacity_factor, jitter, loss coefficients) do not change
the forward at inference and need no counterpart.
"""

from __future__ import annotations

import torch
from transformers import (
    Ernie4_5_MoeConfig,
    Ernie4_5_MoeForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    MixtralConfig,
    MixtralForCausalLM,
)

from ..model.configuration import MoEConfig
from .formats import ExportError

STANDARD_FORMATS = ("gpt2", "mixtral", "ernie4_5_moe")  # `auto` tries them in this order
CLASSES = {"gpt2": GPT2LMHeadModel, "mixtral": MixtralForCausalLM, "ernie4_5_moe": Ernie4_5_MoeForCausalLM}


def _ernie_places_moe_layers(c: MoEConfig) -> bool:
    # Ernie: layer i is MoE iff (i + 1) % interval == 0 and i >= start; ours: i >= skip and
    # (i - skip) % every == 0. With interval = every and start = skip they agree iff skip = -1 mod every.
    return (c.skip_first_moe + 1) % c.moe_every == 0


# field -> {format: whether that format represents this config's value}. A format without an entry for a
# field either ignores it (gpt2 and the routing fields: it only takes dense models) or cannot be reached.
# Checked in this order, so a dense modern model is refused on `num_local_experts` first.
_RULES = {
    "num_local_experts": {"gpt2": lambda c: not c.is_moe, "mixtral": lambda c: c.is_moe,
                          "ernie4_5_moe": lambda c: c.is_moe},
    "norm_type": {"gpt2": lambda c: c.norm_type == "layernorm", "mixtral": lambda c: c.norm_type == "rmsnorm",
                  "ernie4_5_moe": lambda c: c.norm_type == "rmsnorm"},
    "position_embedding_type": {"gpt2": lambda c: c.position_embedding_type == "learned",
                                "mixtral": lambda c: c.position_embedding_type == "rope",
                                "ernie4_5_moe": lambda c: c.position_embedding_type == "rope"},
    "hidden_act": {"gpt2": lambda c: c.hidden_act == "gelu", "mixtral": lambda c: c.hidden_act == "swiglu",
                   "ernie4_5_moe": lambda c: c.hidden_act == "swiglu"},
    "num_key_value_heads": {"gpt2": lambda c: c.num_key_value_heads == c.num_attention_heads,
                            "mixtral": lambda c: True, "ernie4_5_moe": lambda c: True},
    # Ernie's one `use_bias` also gives the shared experts biases, which ours (expert_bias) lack.
    "bias": {"gpt2": lambda c: True, "mixtral": lambda c: not c.bias,
             "ernie4_5_moe": lambda c: not c.bias or not c.num_shared_experts},
    "expert_bias": {"mixtral": lambda c: not c.expert_bias, "ernie4_5_moe": lambda c: not c.expert_bias},
    "moe_every": {"mixtral": lambda c: c.moe_every == 1, "ernie4_5_moe": _ernie_places_moe_layers},
    "skip_first_moe": {"mixtral": lambda c: c.skip_first_moe == 0, "ernie4_5_moe": _ernie_places_moe_layers},
    "num_shared_experts": {"mixtral": lambda c: c.num_shared_experts == 0, "ernie4_5_moe": lambda c: True},
    "router_type": {"mixtral": lambda c: c.router_type == "softmax",
                    "ernie4_5_moe": lambda c: c.router_type == "softmax"},
    "norm_topk_prob": {"mixtral": lambda c: c.norm_topk_prob, "ernie4_5_moe": lambda c: c.norm_topk_prob},
    "router_bias_update_rate": {"mixtral": lambda c: c.router_bias_update_rate == 0,
                                "ernie4_5_moe": lambda c: True},
    # Capacity dropping at eval makes a token's output depend on its batch mates: no standard class drops.
    "eval_capacity_factor": {"mixtral": lambda c: c.eval_capacity_factor is None,
                             "ernie4_5_moe": lambda c: c.eval_capacity_factor is None},
}


def blocking_field(config: MoEConfig, fmt: str) -> tuple[str, object] | None:
    """The first field (name, value) whose value `fmt` cannot represent, or None if it represents the model."""
    for field, formats in _RULES.items():
        if fmt in formats and not formats[fmt](config):
            return field, getattr(config, field)
    return None


def unrepresentable(config: MoEConfig, fmt: str) -> str | None:
    """Why `fmt` cannot hold this model (field, value and the formats that can), or None if it can."""
    blocked = blocking_field(config, fmt)
    if blocked is None:
        return None
    field, value = blocked
    able = [f for f, ok in _RULES[field].items() if ok(config)] + ["native"]
    return f"{field}={value!r} cannot be exported as {fmt}; formats that represent it: {', '.join(able)}"


def fitting_formats(config: MoEConfig) -> list[str]:
    """The standard classes whose fields represent the model, in `--format auto`'s order of preference."""
    return [f for f in STANDARD_FORMATS if blocking_field(config, f) is None]


def standard_config(config: MoEConfig, fmt: str):
    """The standard class's config for our `config` (already checked by `unrepresentable`)."""
    c = config
    ids = dict(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
               tie_word_embeddings=c.tie_word_embeddings, vocab_size=c.vocab_size, use_cache=True,
               initializer_range=c.initializer_range)
    if fmt == "gpt2":
        # tanh-GELU is GPT-2's `gelu_new`; dropout off: the export is for inference.
        return GPT2Config(n_positions=c.max_position_embeddings, n_embd=c.hidden_size, n_layer=c.num_hidden_layers,
                          n_head=c.num_attention_heads, n_inner=c.intermediate_size, activation_function="gelu_new",
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=c.norm_eps, **ids)
    common = dict(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers, hidden_act="silu",
                  num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                  max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps,
                  rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                  router_aux_loss_coef=c.router_aux_loss_coef, **ids)
    if fmt == "mixtral":
        return MixtralConfig(intermediate_size=c.moe_intermediate_size, num_local_experts=c.num_local_experts,
                             num_experts_per_tok=c.num_experts_per_tok, router_jitter_noise=c.router_jitter_noise,
                             sliding_window=None, **common)
    # moe_norm_min 0: the clamp never binds, so the gates are divided by their plain sum, as ours are.
    return Ernie4_5_MoeConfig(intermediate_size=c.intermediate_size, use_bias=c.bias,
                              moe_intermediate_size=c.moe_intermediate_size, moe_k=c.num_experts_per_tok,
                              moe_num_experts=c.num_local_experts, moe_num_shared_experts=c.num_shared_experts,
                              moe_layer_start_index=c.skip_first_moe, moe_layer_end_index=c.num_hidden_layers - 1,
                              moe_layer_interval=c.moe_every, moe_norm_min=0.0, **common)


def standard_state_dict(config: MoEConfig, state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Our weights (HF names of `MoEForCausalLM`) under the standard class's names and layouts."""
    if fmt == "gpt2":
        return _gpt2_state(config, state)
    if fmt == "mixtral":
        nonzero = [k for k, v in state.items() if k.endswith(".router.score_bias") and bool(v.any())]
        if nonzero:
            raise ExportError(f"{nonzero[0]} is non-zero (an aux-loss-free selection bias) and cannot be exported "
                              f"as mixtral; formats that represent it: ernie4_5_moe, native")
    return _llama_like_state(config, state, interleave_rope=fmt == "ernie4_5_moe")


def _gpt2_state(config: MoEConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def bias_of(key: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        # GPT-2 always has biases; a model trained without them gets zeros, which add nothing.
        return state.get(key, like.new_zeros(rows))

    out = {"transformer.wte.weight": state["model.embed_tokens.weight"],
           "transformer.wpe.weight": state["model.embed_positions.weight"], "lm_head.weight": state["lm_head.weight"]}
    norms = [("model.norm", "transformer.ln_f")]
    for i in range(config.num_hidden_layers):
        ours, theirs = f"model.layers.{i}", f"transformer.h.{i}"
        norms += [(f"{ours}.input_norm", f"{theirs}.ln_1"), (f"{ours}.post_attention_norm", f"{theirs}.ln_2")]
        qkv = [f"{ours}.self_attn.{p}_proj" for p in "qkv"]
        weight = torch.cat([state[k + ".weight"] for k in qkv])
        out[f"{theirs}.attn.c_attn.weight"] = weight.t().contiguous()  # Conv1D: [in, out]
        out[f"{theirs}.attn.c_attn.bias"] = torch.cat([bias_of(k + ".bias", config.hidden_size, weight) for k in qkv])
        for src, dst in ((f"{ours}.self_attn.o_proj", f"{theirs}.attn.c_proj"),
                         (f"{ours}.mlp.up_proj", f"{theirs}.mlp.c_fc"), (f"{ours}.mlp.down_proj", f"{theirs}.mlp.c_proj")):
            weight = state[src + ".weight"]
            out[dst + ".weight"] = weight.t().contiguous()
            out[dst + ".bias"] = bias_of(src + ".bias", weight.shape[0], weight)
    for src, dst in norms:
        weight = state[src + ".weight"]
        out[dst + ".weight"], out[dst + ".bias"] = weight, bias_of(src + ".bias", weight.shape[0], weight)
    return out


def _rope_interleave(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection (weight [H*hd, D] or bias [H*hd]) from rotate-half to interleaved pairs.

    Ours rotates (j, j + hd/2) at frequency j; Ernie rotates (2j, 2j + 1) at frequency j. Putting row j at
    2j and row j + hd/2 at 2j + 1 in every head gives the same rotation, and q.k is unchanged because q and
    k are permuted alike.
    """
    perm = torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)  # 0, hd/2, 1, hd/2 + 1, ...
    heads = weight.view(-1, head_dim, *weight.shape[1:])
    return heads.index_select(1, perm).reshape(weight.shape)


def _llama_like_state(config: MoEConfig, state: dict[str, torch.Tensor], *, interleave_rope: bool
                      ) -> dict[str, torch.Tensor]:
    """Mixtral / Ernie 4.5 MoE names: same module tree, stacked experts, renamed norms, router and shared MLP."""
    renames = (("input_norm.", "input_layernorm."), ("post_attention_norm.", "post_attention_layernorm."),
               ("mlp.router.weight", "mlp.gate.weight"), ("mlp.shared_mlp.", "mlp.shared_experts."))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".mlp.experts." in key:
            continue  # stacked below
        if key.endswith(".router.score_bias"):
            if interleave_rope:  # Ernie; Mixtral has no selection bias (checked zero by the caller)
                out[key.replace("router.score_bias", "gate.moe_statics.e_score_correction_bias")] = \
                    value.float().unsqueeze(0)  # [1, E]: one expert group
            continue
        for old, new in renames:
            key = key.replace(old, new)
        if interleave_rope and (".self_attn.q_proj." in key or ".self_attn.k_proj." in key):
            value = _rope_interleave(value, config.head_dim)
        out[key] = value
    if interleave_rope and config.bias:
        # Ernie's `use_bias` includes the LM head; ours has none, so zeros.
        out["lm_head.bias"] = state["lm_head.weight"].new_zeros(config.vocab_size)
    for layer in config.moe_layer_indices:
        prefix = f"model.layers.{layer}.mlp.experts"
        experts = range(config.num_local_experts)
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([state[f"{prefix}.{e}.gate_proj.weight"],
                                                                state[f"{prefix}.{e}.up_proj.weight"]]) for e in experts])
        out[f"{prefix}.down_proj"] = torch.stack([state[f"{prefix}.{e}.down_proj.weight"] for e in experts])
    return out
