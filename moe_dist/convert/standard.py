"""Stock transformers classes <-> our model: one table, read in both directions (export and `--init_from`).

Read field by field against the installed transformers 5.25 (models/gpt2, llama, qwen3, mixtral, qwen3_moe,
olmoe, ernie4_5_moe). For each class:

- `to_ours(stock config)`: our `MoEConfig` fields, or `Unrepresentable(field, value)` for the first stock
  field our model cannot reproduce (a sliding window, a rope type whose frequencies change with the length,
  an LM-head bias, ...);
- `_RULES`: which of our fields a class can hold (`blocking_field`), and `standard_config`, the stock config
  for one of ours;
- `standard_keys.key_pairs(config, fmt)`: our tensor names against the names the class's checkpoints
  store on disk (what `save_pretrained` writes and hub checkpoints hold: one tensor per expert), with the
  transform each way. The exporter writes those files; `--init_from` reads them lazily, key by key.

Both directions are checked by logits, never assumed: the exporter loads its folder with the stock class in a
fresh interpreter; an import compares the stock class with the converted model on a fixed batch.

    gpt2          dense GPT-2 block: LayerNorm, learned positions, tanh-GELU (`gelu_new`), MHA; Conv1D weights
                  [in, out] with biases (zeros when ours have none); tied or untied head.
    llama         dense RMSNorm/RoPE/GQA/SwiGLU block; `attention_bias` and `mlp_bias` (ours: one `bias`),
                  `head_dim`, any static rope type (llama3 for Llama 3.x), tied or untied head.
    qwen3         llama plus per-head q/k RMSNorm (our `qk_norm="head"`); no MLP bias; no sliding window.
    mixtral       every FFN routed, softmax -> top-k -> always renormalised; no shared experts, no selection bias.
    qwen3_moe     qwen3's attention; routed FFNs placed by `decoder_sparse_step` and `mlp_only_layers` (dense
                  ones `intermediate_size` wide); `norm_topk_prob` either way.
    olmoe         every FFN routed; q/k RMSNorm over the whole projections (`qk_norm="projection"`), then
                  `clip_qkv`; `norm_topk_prob` (False in OLMoE-1B-7B).
    ernie4_5_moe  as Mixtral plus a selection bias added to the probabilities for top-k only
                  (`moe_statics.e_score_correction_bias`, our `score_bias`), shared experts, MoE layers placed by
                  `moe_layer_start_index` / `moe_layer_interval`; interleaved RoPE pairs (q/k rows permuted).

Training-only fields (capacity, jitter, loss coefficients) do not change the forward at inference and need
no counterpart.
"""

from __future__ import annotations

from transformers import (
    Ernie4_5_MoeConfig,
    GPT2Config,
    LlamaConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from ..model.configuration import ROPE_TYPES, MoEConfig

STANDARD_FORMATS = ("gpt2", "llama", "qwen3", "mixtral", "qwen3_moe", "olmoe", "ernie4_5_moe")  # `auto`'s order
CLASS_NAMES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
}
_CONFIGS = {
    "gpt2": GPT2Config,
    "llama": LlamaConfig,
    "qwen3": Qwen3Config,
    "mixtral": MixtralConfig,
    "qwen3_moe": Qwen3MoeConfig,
    "olmoe": OlmoeConfig,
    "ernie4_5_moe": Ernie4_5_MoeConfig,
}
MOE_FORMATS = ("mixtral", "qwen3_moe", "olmoe", "ernie4_5_moe")
# Max |logit difference| in fp32 between a stock class and our model of the same weights: the bar of both
# the import check and the export check. fp32 reorderings of the same sums stay orders of magnitude below it.
TOLERANCE = 1e-4


class Unrepresentable(ValueError):
    """A stock config field our model cannot reproduce; `field` and `value` name it."""

    def __init__(self, field: str, value, why: str = ""):
        self.field, self.value = field, value
        super().__init__(f"{field}={value!r}" + (f" ({why})" if why else ""))


# ---- stock config -> ours (import) ---------------------------------------------------------------------


def to_ours(stock) -> dict:
    """Our `MoEConfig` fields for a stock config (one of `_CONFIGS`), or `Unrepresentable`."""
    fmt = stock.model_type
    if fmt == "gpt2":
        return _gpt2_to_ours(stock)
    if stock.hidden_act != "silu":
        raise Unrepresentable("hidden_act", stock.hidden_act, "only SwiGLU (silu-gated) MLPs")
    rope = dict(stock.rope_parameters or {})
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise Unrepresentable("rope_parameters.rope_type", rope.get("rope_type"), f"supported: {', '.join(ROPE_TYPES)}")
    # A window at least as long as the context never hides a key: full attention.
    if fmt == "mixtral" and stock.sliding_window is not None and stock.sliding_window < stock.max_position_embeddings:
        raise Unrepresentable("sliding_window", stock.sliding_window, "sliding-window attention")
    if getattr(stock, "use_sliding_window", False):  # Qwen3's: its sliding_window is unused without it
        raise Unrepresentable("use_sliding_window", True, "sliding-window attention")
    ours = dict(
        vocab_size=stock.vocab_size,
        hidden_size=stock.hidden_size,
        num_hidden_layers=stock.num_hidden_layers,
        num_attention_heads=stock.num_attention_heads,
        num_key_value_heads=stock.num_key_value_heads,
        head_dim=getattr(stock, "head_dim", None),
        max_position_embeddings=stock.max_position_embeddings,
        norm_type="rmsnorm",
        norm_eps=stock.rms_norm_eps,
        position_embedding_type="rope",
        rope_parameters=rope,
        rope_theta=rope.get("rope_theta", 10000.0),
        hidden_act="swiglu",
        tie_word_embeddings=bool(stock.tie_word_embeddings),
        initializer_range=stock.initializer_range,
        bias=False,
        attention_dropout=0.0 if fmt == "ernie4_5_moe" else float(stock.attention_dropout),  # Ernie has none
        **_token_ids(stock),
    )
    ours.update(_FAMILY[fmt](stock))
    return ours


def _gpt2_to_ours(s) -> dict:
    checks = (
        ("activation_function", s.activation_function in ("gelu_new", "gelu_pytorch_tanh"), "tanh-GELU only"),
        ("scale_attn_weights", s.scale_attn_weights, "unscaled attention"),
        ("scale_attn_by_inverse_layer_idx", not s.scale_attn_by_inverse_layer_idx, "per-layer attention scale"),
        ("add_cross_attention", not s.add_cross_attention, "cross-attention"),
    )
    for field, ok, why in checks:
        if not ok:
            raise Unrepresentable(field, getattr(s, field), why)
    return dict(
        vocab_size=s.vocab_size,
        hidden_size=s.n_embd,
        num_hidden_layers=s.n_layer,
        num_attention_heads=s.n_head,
        intermediate_size=s.n_inner or 4 * s.n_embd,
        max_position_embeddings=s.n_positions,
        norm_type="layernorm",
        norm_eps=s.layer_norm_epsilon,
        position_embedding_type="learned",
        hidden_act="gelu",
        bias=True,
        tie_word_embeddings=bool(s.tie_word_embeddings),
        initializer_range=s.initializer_range,
        attention_dropout=s.attn_pdrop,
        resid_dropout=s.resid_pdrop,
        embd_dropout=s.embd_pdrop,
        **_token_ids(s),
    )


def _token_ids(s) -> dict:
    """bos, eos and pad ids, None where unset or malformed; eos may be a list (an instruct model stops on any)."""

    def is_id(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    ids = {k: v if is_id(v := getattr(s, k)) else None for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    eos = s.eos_token_id
    if isinstance(eos, list) and eos and all(is_id(v) for v in eos):
        ids["eos_token_id"] = list(eos)
    return ids


def _llama(s) -> dict:
    if s.attention_bias != s.mlp_bias:
        raise Unrepresentable("attention_bias", s.attention_bias, f"with mlp_bias={s.mlp_bias}: one bias for both")
    return dict(intermediate_size=s.intermediate_size, bias=bool(s.attention_bias))


def _qwen3(s) -> dict:
    if s.attention_bias:
        raise Unrepresentable("attention_bias", True, "Qwen3's MLP has none, and ours has one bias for both")
    return dict(intermediate_size=s.intermediate_size, qk_norm="head")


def _experts(num: int, k: int, width: int, norm_topk_prob: bool, aux: float) -> dict:
    # Released MoEs route without capacity: dropless, so the imported model computes the stock function.
    return dict(
        num_local_experts=num,
        num_experts_per_tok=k,
        moe_intermediate_size=width,
        norm_topk_prob=norm_topk_prob,
        router_aux_loss_coef=aux,
        capacity_factor=None,
        eval_capacity_factor=None,
    )


def _mixtral(s) -> dict:
    return dict(
        intermediate_size=s.intermediate_size,
        **_experts(s.num_local_experts, s.num_experts_per_tok, s.intermediate_size, True, s.router_aux_loss_coef),
    )


def _qwen3_moe(s) -> dict:
    step = s.decoder_sparse_step
    if step < 1:
        raise Unrepresentable("decoder_sparse_step", step, "must be >= 1")
    # Layer i is routed iff (i + 1) % step == 0 and i is not in mlp_only_layers: ours with skip = step - 1.
    return dict(
        _qwen3(s),
        skip_first_moe=step - 1,
        moe_every=step,
        mlp_only_layers=list(s.mlp_only_layers or []),
        **_experts(
            s.num_experts, s.num_experts_per_tok, s.moe_intermediate_size, s.norm_topk_prob, s.router_aux_loss_coef
        ),
    )


def _olmoe(s) -> dict:
    head_dim = getattr(s, "head_dim", None)
    if head_dim is not None and head_dim * s.num_attention_heads != s.hidden_size:
        # OLMoE's q/k norms are hidden_size wide whatever head_dim says: the stock class itself cannot run it.
        raise Unrepresentable("head_dim", head_dim, "OLMoE needs head_dim * num_attention_heads = hidden_size")
    return dict(
        intermediate_size=s.intermediate_size,
        qk_norm="projection",
        clip_qkv=s.clip_qkv,
        bias=bool(s.attention_bias),
        **_experts(s.num_experts, s.num_experts_per_tok, s.intermediate_size, s.norm_topk_prob, s.router_aux_loss_coef),
    )


def _ernie(s) -> dict:
    # use_bias also gives the shared experts biases (ours have none) and the LM head one (which the logits
    # check holds to zero, as our exporter writes it). The multi-token-prediction layers
    # (num_nextn_predict_layers, `mtp*` tensors) are ignored, as the stock class ignores them on load.
    if s.use_bias and s.moe_num_shared_experts:
        raise Unrepresentable("use_bias", True, "biased shared experts")
    if s.moe_layer_end_index not in (-1, s.num_hidden_layers - 1) and s.moe_layer_end_index < s.num_hidden_layers:
        raise Unrepresentable("moe_layer_end_index", s.moe_layer_end_index, "dense layers after the MoE ones")
    if s.moe_norm_min > 1e-6:
        raise Unrepresentable("moe_norm_min", s.moe_norm_min, "a floor on the renormalising sum")
    start, every = s.moe_layer_start_index, s.moe_layer_interval
    # Ernie's layer i is routed iff i >= start and (i + 1) % every == 0: ours with skip = first such i.
    first = next((i for i in range(start, s.num_hidden_layers) if (i + 1) % every == 0), s.num_hidden_layers)
    if first >= s.num_hidden_layers:
        raise Unrepresentable("moe_layer_start_index", start, "no routed layer")
    return dict(
        intermediate_size=s.intermediate_size,
        bias=bool(s.use_bias),
        skip_first_moe=first,
        moe_every=every,
        num_shared_experts=s.moe_num_shared_experts,
        **_experts(s.moe_num_experts, s.moe_k, s.moe_intermediate_size, True, s.router_aux_loss_coef),
    )


_FAMILY = {
    "llama": _llama,
    "qwen3": _qwen3,
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "ernie4_5_moe": _ernie,
}


def stock_config(config_json: dict):
    """The stock config class of `config_json`'s model_type, built from it; None for a model_type not in the table."""
    cls = _CONFIGS.get(config_json.get("model_type"))
    return None if cls is None else cls.from_dict(config_json)


# ---- ours -> stock class (export) ----------------------------------------------------------------------


def _ernie_places_moe_layers(c: MoEConfig) -> bool:
    # Ernie: layer i is MoE iff (i + 1) % interval == 0 and i >= start; ours: i >= skip and
    # (i - skip) % every == 0. With interval = every and start = skip they agree iff skip = -1 mod every.
    return (c.skip_first_moe + 1) % c.moe_every == 0


_MODERN = ("llama", "qwen3", "mixtral", "qwen3_moe", "olmoe", "ernie4_5_moe")


def _each(formats, check) -> dict:
    return {f: check for f in formats}


# field -> {format: whether that format represents this config's value}. A format without an entry for a
# field either ignores it or cannot reach it. Checked in this order, so a dense model is refused by an MoE
# class on `num_local_experts` first.
_RULES = {
    "num_local_experts": {
        **_each(("gpt2", "llama", "qwen3"), lambda c: not c.is_moe),
        **_each(MOE_FORMATS, lambda c: c.is_moe),
    },
    "norm_type": {"gpt2": lambda c: c.norm_type == "layernorm", **_each(_MODERN, lambda c: c.norm_type == "rmsnorm")},
    "position_embedding_type": {
        "gpt2": lambda c: c.position_embedding_type == "learned",
        **_each(_MODERN, lambda c: c.position_embedding_type == "rope"),
    },
    "hidden_act": {"gpt2": lambda c: c.hidden_act == "gelu", **_each(_MODERN, lambda c: c.hidden_act == "swiglu")},
    "num_key_value_heads": {"gpt2": lambda c: c.num_key_value_heads == c.num_attention_heads},
    "head_dim": _each(("gpt2", "ernie4_5_moe"), lambda c: c.head_dim * c.num_attention_heads == c.hidden_size),
    "qk_norm": {
        **_each(("gpt2", "llama", "mixtral", "ernie4_5_moe"), lambda c: c.qk_norm is None),
        **_each(("qwen3", "qwen3_moe"), lambda c: c.qk_norm == "head"),
        "olmoe": lambda c: c.qk_norm == "projection",
    },
    "clip_qkv": _each(("gpt2", "llama", "qwen3", "mixtral", "qwen3_moe", "ernie4_5_moe"), lambda c: c.clip_qkv is None),
    # One `bias` for attention and dense MLP; Qwen3's MLPs and every class's experts have none, and Ernie's
    # one `use_bias` also gives the shared experts (ours have none) and the LM head (zeros) biases.
    "bias": {
        **_each(("mixtral", "qwen3", "qwen3_moe"), lambda c: not c.bias),
        "ernie4_5_moe": lambda c: not c.bias or not c.num_shared_experts,
    },
    "expert_bias": _each(MOE_FORMATS, lambda c: not c.expert_bias),
    # Mixtral and OLMoE route every layer; Ernie places routed layers by start and interval only.
    "moe_every": {**_each(("mixtral", "olmoe"), lambda c: c.moe_every == 1), "ernie4_5_moe": _ernie_places_moe_layers},
    "skip_first_moe": {
        **_each(("mixtral", "olmoe"), lambda c: c.skip_first_moe == 0),
        "ernie4_5_moe": _ernie_places_moe_layers,
    },
    "mlp_only_layers": _each(("mixtral", "olmoe", "ernie4_5_moe"), lambda c: not c.mlp_only_layers),
    "num_shared_experts": _each(("mixtral", "qwen3_moe", "olmoe"), lambda c: c.num_shared_experts == 0),
    "router_type": _each(MOE_FORMATS, lambda c: c.router_type == "softmax"),
    "norm_topk_prob": _each(("mixtral", "ernie4_5_moe"), lambda c: c.norm_topk_prob),
    "router_bias_update_rate": _each(("mixtral", "qwen3_moe", "olmoe"), lambda c: c.router_bias_update_rate == 0),
    # Capacity dropping at eval makes a token's output depend on its batch mates: no standard class drops.
    "eval_capacity_factor": _each(MOE_FORMATS, lambda c: c.eval_capacity_factor is None),
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
    able = [f for f in STANDARD_FORMATS if blocking_field(config, f) is None] + ["native"]
    return f"{field}={value!r} cannot be exported as {fmt}; formats that represent this model: {', '.join(able)}"


def fitting_formats(config: MoEConfig, first: str | None = None) -> list[str]:
    """The standard classes whose fields represent the model, in `--format auto`'s order (`first` leading)."""
    order = [first, *STANDARD_FORMATS] if first in STANDARD_FORMATS else STANDARD_FORMATS
    return [f for f in dict.fromkeys(order) if blocking_field(config, f) is None]


def standard_config(config: MoEConfig, fmt: str):
    """The standard class's config for our `config` (already checked by `unrepresentable`)."""
    return _AS_STOCK[fmt](config)


def _shared(c: MoEConfig) -> dict:
    """The fields every class names as we do."""
    return dict(
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        tie_word_embeddings=c.tie_word_embeddings,
        vocab_size=c.vocab_size,
        use_cache=True,
        initializer_range=c.initializer_range,
    )


def _as_gpt2(c: MoEConfig) -> GPT2Config:
    # tanh-GELU is GPT-2's `gelu_new`; the dropout is the model's (training only, as the stock class applies it).
    return GPT2Config(
        n_positions=c.max_position_embeddings,
        n_embd=c.hidden_size,
        n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads,
        n_inner=c.intermediate_size,
        activation_function="gelu_new",
        resid_pdrop=c.resid_dropout,
        embd_pdrop=c.embd_dropout,
        attn_pdrop=c.attention_dropout,
        layer_norm_epsilon=c.norm_eps,
        **_shared(c),
    )


def _modern_block(c: MoEConfig) -> dict:
    """The fields of the RMSNorm/RoPE/SwiGLU classes' block, the same in all of them."""
    return dict(
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        hidden_act="silu",
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.norm_eps,
        rope_parameters=dict(c.rope_parameters),
        attention_dropout=c.attention_dropout,  # Ernie's attention has none: there it is only a record
        **_shared(c),
    )


def _routing(c: MoEConfig) -> dict:
    """The router fields Mixtral, Qwen3-MoE and OLMoE name as we do (Ernie names top-k `moe_k`)."""
    return dict(num_experts_per_tok=c.num_experts_per_tok, **_router_loss(c))


def _router_loss(c: MoEConfig) -> dict:
    # The stock classes add the pooled loss when output_router_logits is true, none when false (`router_aux_loss`).
    return dict(router_aux_loss_coef=c.router_aux_loss_coef, output_router_logits=c.router_aux_loss == "stock")


def _as_llama(c: MoEConfig) -> LlamaConfig:
    return LlamaConfig(
        intermediate_size=c.intermediate_size,
        attention_bias=c.bias,
        mlp_bias=c.bias,
        head_dim=c.head_dim,
        **_modern_block(c),
    )


def _as_qwen3(c: MoEConfig) -> Qwen3Config:
    return Qwen3Config(
        intermediate_size=c.intermediate_size, use_sliding_window=False, head_dim=c.head_dim, **_modern_block(c)
    )


def _as_mixtral(c: MoEConfig) -> MixtralConfig:
    return MixtralConfig(
        intermediate_size=c.moe_intermediate_size,
        num_local_experts=c.num_local_experts,
        router_jitter_noise=c.router_jitter_noise,
        sliding_window=None,
        head_dim=c.head_dim,
        **_routing(c),
        **_modern_block(c),
    )


def _as_qwen3_moe(c: MoEConfig) -> Qwen3MoeConfig:
    dense = [i for i in range(c.num_hidden_layers) if not c.is_moe_layer(i)]
    return Qwen3MoeConfig(
        intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.moe_intermediate_size,
        num_experts=c.num_local_experts,
        norm_topk_prob=c.norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=dense,
        use_sliding_window=False,
        head_dim=c.head_dim,
        **_routing(c),
        **_modern_block(c),
    )


def _as_olmoe(c: MoEConfig) -> OlmoeConfig:
    return OlmoeConfig(
        intermediate_size=c.moe_intermediate_size,
        num_experts=c.num_local_experts,
        norm_topk_prob=c.norm_topk_prob,
        clip_qkv=c.clip_qkv,
        attention_bias=c.bias,
        **_routing(c),
        **_modern_block(c),
    )


def _as_ernie(c: MoEConfig) -> Ernie4_5_MoeConfig:
    # moe_norm_min 0: the clamp never binds, so the gates are divided by their plain sum, as ours are.
    return Ernie4_5_MoeConfig(
        intermediate_size=c.intermediate_size,
        use_bias=c.bias,
        moe_intermediate_size=c.moe_intermediate_size,
        moe_k=c.num_experts_per_tok,
        moe_num_experts=c.num_local_experts,
        moe_num_shared_experts=c.num_shared_experts,
        moe_layer_start_index=c.skip_first_moe,
        moe_layer_end_index=c.num_hidden_layers - 1,
        moe_layer_interval=c.moe_every,
        moe_norm_min=0.0,
        **_router_loss(c),
        **_modern_block(c),
    )


_AS_STOCK = {
    "gpt2": _as_gpt2,
    "llama": _as_llama,
    "qwen3": _as_qwen3,
    "mixtral": _as_mixtral,
    "qwen3_moe": _as_qwen3_moe,
    "olmoe": _as_olmoe,
    "ernie4_5_moe": _as_ernie,
}
