"""Model configuration: the single source of truth for model shape and routing.

Field names follow Hugging Face (Mixtral/Llama) so that tools which read
`config.json` (lm-evaluation-harness, vLLM-style loaders) find what they expect.
Parallelism (EP size, ZeRO, engine) is deliberately absent: it is a property of a
run, not of a model, and never lands in `config.json`.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

NORM_TYPES = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "swiglu")
POSITION_TYPES = ("learned", "rope")
ROUTER_TYPES = ("softmax", "random")
# The load-balancing loss's form: "per_layer" each MoE layer's Switch loss (routes counted once, f sums to 1),
# summed over layers; "stock" transformers' `load_balancing_loss_func`, which the stock MoE classes train with
# when `output_router_logits` is true (counts and probabilities pooled over all MoE layers, all k choices
# counted); "none" no load-balancing loss, as those classes train when it is false (the coefficient is kept).
ROUTER_AUX_LOSSES = ("per_layer", "stock", "none")
QK_NORMS = (None, "head", "projection")
# RoPE types whose frequencies transformers computes once (modeling_rope_utils.ROPE_INIT_FUNCTIONS); "dynamic"
# and "longrope" change them with the sequence length, which this model does not do.
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Expert ids are int32 in the expert-parallel dispatch (expert_parallel._PrecomputedGate): no more experts than that.
MAX_EXPERTS = 2**31 - 1

# GPT-2 style block used by the seed studies. With biases in attention, LayerNorm and the
# dense FFN, and none in experts or router, this reproduces the seed parameter table
# (70.51M / 108.25M / 158.60M / 259.29M / 158.62M at vocab 50257, untied head).
_SEED = dict(
    hidden_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    intermediate_size=2048,
    max_position_embeddings=256,
    hidden_act="gelu",
    norm_type="layernorm",
    position_embedding_type="learned",
    bias=True,
    expert_bias=False,
)
# CPU-sized twin: same block, 128 wide, 4 layers, 128 tokens of context.
_TINY = dict(
    _SEED,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=512,
    max_position_embeddings=128,
)
# RMSNorm, RoPE, GQA and SwiGLU experts, balanced by the aux-loss-free bias
# (DeepSeek-V3, arXiv:2412.19437 §2.1.2, update rate 1e-3) plus the ST-MoE z-loss
# (arXiv:2202.08906, coefficient 1e-3).
_MODERN = dict(
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=1408,
    max_position_embeddings=256,
    hidden_act="swiglu",
    norm_type="rmsnorm",
    position_embedding_type="rope",
    bias=False,
    num_local_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=704,
    norm_topk_prob=True,
    router_aux_loss_coef=0.0,
    router_bias_update_rate=1e-3,
    router_z_loss_coef=1e-3,
)
# The modern block at CPU size: the base of the tiny modern presets below.
_TINY_MODERN = dict(
    _MODERN,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=352,
    moe_intermediate_size=176,
    max_position_embeddings=128,
)

PRESETS: dict[str, dict] = {
    "seed-baseline": dict(_SEED),
    "seed-moe-e4": dict(_SEED, num_local_experts=4, num_experts_per_tok=1),
    "seed-moe-e8": dict(_SEED, num_local_experts=8, num_experts_per_tok=1),
    "seed-moe-e16": dict(_SEED, num_local_experts=16, num_experts_per_tok=1),
    "seed-top2-e16": dict(
        _SEED, num_local_experts=16, num_experts_per_tok=2, moe_intermediate_size=1024, norm_topk_prob=True
    ),
    "modern-moe": dict(_MODERN),
    "tiny-dense": dict(_TINY),
    # Same active parameters as tiny-dense: one expert of the dense FFN's size per token.
    "tiny-moe": dict(_TINY, num_local_experts=8, num_experts_per_tok=1),
    "tiny-modern": dict(_TINY_MODERN),
    # CPU-sized modern presets exportable by construction (python -m moe_dist.export RUN OUT --format ...).
    # mixtral-tiny: every FFN routed, renormalised softmax top-2, balanced by the aux loss (Mixtral has no
    # selection bias and no shared experts).
    "mixtral-tiny": dict(
        _TINY_MODERN,
        router_aux_loss_coef=0.01,
        router_bias_update_rate=0.0,
    ),
    # ernie-tiny: Ernie 4.5's block: a dense first layer, one shared expert, aux-loss-free bias balancing.
    "ernie-tiny": dict(
        _TINY_MODERN,
        num_shared_experts=1,
        skip_first_moe=1,
    ),
}


def _check_types(config: MoEConfig) -> None:
    """Each field's value is of its annotated type, a float finite and an int an int64: a config.json is anyone's
    text."""
    for name, annotation in MoEConfig.__annotations__.items():
        value = getattr(config, name)
        if not any(_is_a(value, kind.strip()) for kind in annotation.split("|")):
            raise ValueError(f"MoEConfig.{name}={value!r} is invalid: expected {annotation}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"MoEConfig.{name}={value!r} is invalid: must be finite")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:  # torch and safetensors hold sizes as int64
            raise ValueError(f"MoEConfig.{name}={value!r} is invalid: must fit in int64")


def _is_a(value, kind: str) -> bool:
    """Whether `value` is of the annotated `kind` (JSON's kinds: a bool is not a number, an int is a float)."""
    if kind == "None":
        return value is None
    if isinstance(value, bool):
        return kind == "bool"
    if kind == "list[int]":
        return isinstance(value, list) and all(_is_a(v, "int") for v in value)
    return isinstance(value, {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict}[kind])


class MoEConfig(PretrainedConfig):
    """Shape and routing of a decoder-only (MoE) language model.

    A model is dense when `num_local_experts == 0`; otherwise every `moe_every`-th FFN
    after the first `skip_first_moe` is a routed MoE block.
    """

    model_type = "moe_dist"
    keys_to_ignore_at_inference = ["past_key_values"]
    # One name per concept: short names are aliases of the HF fields. `top_k` is not one:
    # transformers reserves it for generation, so the CLI maps --top_k itself.
    attribute_map = {"num_experts": "num_local_experts", "num_kv_heads": "num_key_value_heads"}

    vocab_size: int = 50257
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # None: multi-head attention (= num_attention_heads)
    intermediate_size: int = 2048  # dense FFN width
    max_position_embeddings: int = 256  # context length; lm-eval-harness reads it
    hidden_act: str = "gelu"  # "gelu": 2-matrix GPT-2 MLP; "swiglu": 3-matrix gated MLP
    norm_type: str = "layernorm"
    norm_eps: float = 1e-5
    position_embedding_type: str = "learned"
    rope_theta: float = 10000.0  # configs written before rope_parameters existed; folded into it
    # transformers' RoPE settings: {"rope_type": one of ROPE_TYPES, "rope_theta": ..., and the type's own
    # fields (factor, low_freq_factor, ...)}; its frequencies come from transformers' own functions.
    rope_parameters: dict | None = None
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Qwen3 sets its own)
    # RMSNorm of queries and keys before RoPE: None, "head" (over each head, Qwen3) or "projection"
    # (over the whole q and k projections, OLMoE/OLMo 2).
    qk_norm: str | None = None
    clip_qkv: float | None = None  # clamp q, k and v to [-clip_qkv, clip_qkv] after the norm (OLMoE)
    bias: bool = True  # biases in attention, LayerNorm and the dense FFN (GPT-2)
    # Dropout, training only: on the attention probabilities (every class's attention_dropout, GPT-2's
    # attn_pdrop), on each block's attention and FFN outputs (GPT-2's resid_pdrop), on the embeddings (embd_pdrop).
    attention_dropout: float = 0.0
    resid_dropout: float = 0.0
    embd_dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None  # a list: stop on any of them (Llama 3 instruct models)
    pad_token_id: int | None = None

    num_local_experts: int = 0  # experts per MoE layer; 0 = dense model
    num_experts_per_tok: int = 1  # top-k
    moe_intermediate_size: int | None = None  # expert width; None = intermediate_size
    moe_every: int = 1
    skip_first_moe: int = 0
    mlp_only_layers: list[int] | None = None  # layers kept dense whatever moe_every says (Qwen3-MoE)
    num_shared_experts: int = 0  # always-on experts of moe_intermediate_size (DeepSeekMoE)
    expert_bias: bool = False
    router_type: str = "softmax"  # "random": a frozen random projection picks the experts
    norm_topk_prob: bool = False  # renormalise the k gate weights to sum to 1
    capacity_factor: float | None = 1.0  # training; None = dropless
    eval_capacity_factor: float | None = None  # None = dropless, so eval is batch-independent
    min_capacity: int = 4
    router_jitter_noise: float = 0.0  # multiplicative input noise, training only
    router_aux_loss_coef: float = 0.01  # Switch/GShard load balancing
    router_aux_loss: str = "per_layer"  # its form, one of ROUTER_AUX_LOSSES (configs before it: per_layer)
    router_z_loss_coef: float = 0.0  # ST-MoE
    router_bias_update_rate: float = 0.0  # DeepSeek-V3 aux-loss-free bias; 0 = off

    def __post_init__(self, **kwargs):
        _check_types(self)  # first: the defaults below compute with the values
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.head_dim is None and self.num_attention_heads > 0:  # else _validate refuses the head count
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.mlp_only_layers = sorted(self.mlp_only_layers or [])
        super().__post_init__(**kwargs)  # moves rope_theta into rope_parameters (RotaryEmbeddingConfigMixin)
        _validate(self)

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        if not self.is_moe or layer_idx < self.skip_first_moe or layer_idx in self.mlp_only_layers:
            return False
        return (layer_idx - self.skip_first_moe) % self.moe_every == 0

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MoEConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        overrides = {cls.attribute_map.get(k, k): v for k, v in overrides.items()}
        unknown = sorted(set(overrides) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown MoEConfig field(s) {unknown} for preset {name!r}")
        return cls(**{**PRESETS[name], **overrides})


def _validate(config: MoEConfig) -> None:
    """Each field within its range and consistent with the others; the first broken rule raises."""
    _check_choices(config)
    _check_sizes(config)
    _check_attention(config)
    _check_layers_and_experts(config)
    _check_coefficients(config)


def _invalid(config: MoEConfig, field: str, valid: str) -> ValueError:
    return ValueError(f"MoEConfig.{field}={getattr(config, field)!r} is invalid: {valid}")


def _check_choices(config: MoEConfig) -> None:
    for field, choices in (
        ("norm_type", NORM_TYPES),
        ("hidden_act", ACTIVATIONS),
        ("position_embedding_type", POSITION_TYPES),
        ("router_type", ROUTER_TYPES),
        ("router_aux_loss", ROUTER_AUX_LOSSES),
    ):
        if getattr(config, field) not in choices:
            raise _invalid(config, field, f"expected one of {choices}")


def _check_sizes(config: MoEConfig) -> None:
    for field in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "moe_intermediate_size",
        "moe_every",
        "num_experts_per_tok",
        "head_dim",
    ):
        if getattr(config, field) < 1:
            raise _invalid(config, field, "must be >= 1")


def _check_attention(config: MoEConfig) -> None:
    """The query/key options, the position encoding and the grouping of the heads."""
    if config.qk_norm not in QK_NORMS:
        raise _invalid(config, "qk_norm", f"expected one of {QK_NORMS}")
    if config.clip_qkv is not None and config.clip_qkv <= 0:
        raise _invalid(config, "clip_qkv", "must be > 0, or None for no clamp")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if config.position_embedding_type == "rope" and rope_type not in ROPE_TYPES:
        raise ValueError(
            f"MoEConfig.rope_parameters['rope_type']={rope_type!r} is invalid: expected one of {ROPE_TYPES}"
        )
    if (
        not 1 <= config.num_key_value_heads <= config.num_attention_heads
        or config.num_attention_heads % config.num_key_value_heads
    ):
        raise _invalid(config, "num_key_value_heads", f"must divide num_attention_heads={config.num_attention_heads}")
    if config.position_embedding_type == "rope" and config.head_dim % 2:
        raise _invalid(config, "num_attention_heads", f"RoPE needs an even head_dim, got {config.head_dim}")


def _check_layers_and_experts(config: MoEConfig) -> None:
    """Which layers are MoE, and how many experts each has and picks."""
    layers = config.num_hidden_layers
    if any(not 0 <= i < layers for i in config.mlp_only_layers):
        raise _invalid(config, "mlp_only_layers", f"layer indices must be in [0, num_hidden_layers={layers})")
    if config.num_local_experts == 1 or config.num_local_experts < 0:
        raise _invalid(config, "num_local_experts", "use 0 for a dense model or >= 2 experts")
    if config.num_local_experts > MAX_EXPERTS:
        raise _invalid(config, "num_local_experts", f"must be <= {MAX_EXPERTS} (expert ids are int32 in the dispatch)")
    if config.is_moe and config.num_experts_per_tok > config.num_local_experts:
        experts = config.num_local_experts
        raise _invalid(config, "num_experts_per_tok", f"top_k must be in [1, num_local_experts={experts}]")
    if not 0 <= config.skip_first_moe < layers:
        raise _invalid(config, "skip_first_moe", f"must be in [0, num_hidden_layers={layers})")
    if config.num_shared_experts < 0:
        raise _invalid(config, "num_shared_experts", "must be >= 0")


def _check_coefficients(config: MoEConfig) -> None:
    """The numbers that scale or bound something (loss coefficients, rates, epsilons, noise, capacities)."""
    for field in (
        "router_aux_loss_coef",
        "router_z_loss_coef",
        "router_bias_update_rate",
        "norm_eps",
        "min_capacity",
        "initializer_range",
    ):
        if getattr(config, field) < 0:
            raise _invalid(config, field, "must be >= 0 (a coefficient or rate cannot be negative)")
    for field in ("router_jitter_noise", "attention_dropout", "resid_dropout", "embd_dropout"):
        if not 0 <= getattr(config, field) < 1:
            raise _invalid(config, field, "must be in [0, 1)")
    for field in ("capacity_factor", "eval_capacity_factor"):
        if getattr(config, field) is not None and getattr(config, field) <= 0:
            raise _invalid(config, field, "must be > 0, or None for dropless routing")
