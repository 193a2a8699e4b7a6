"""Analytic cost model: parameters, forward FLOPs per token and per-rank training memory.

Pure functions of an `MoEConfig` (no model is built), so a tool can size a 100B-parameter
run on a laptop. The counts follow the layer definitions in `modeling.py` and `moe.py`
exactly; the memory estimate states every assumption where it is made.

Units: FLOPs count a multiply-add as 2 (the PaLM / Chinchilla convention); memory is bytes.
"""

from __future__ import annotations

from ..model.configuration import MoEConfig
from ..model.routing import expert_capacity

GiB = 2**30
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# ---- parameters -----------------------------------------------------------------------


def _mlp_matmul_params(config: MoEConfig, width: int) -> int:
    """Weight elements of one `FeedForward`: 2 matrices for GELU, 3 for SwiGLU (no biases)."""
    return (3 if config.hidden_act == "swiglu" else 2) * config.hidden_size * width


def _mlp_params(config: MoEConfig, width: int, bias: bool) -> int:
    mats = 3 if config.hidden_act == "swiglu" else 2
    return _mlp_matmul_params(config, width) + (bias * ((mats - 1) * width + config.hidden_size))


def _attention_params(config: MoEConfig) -> int:
    D, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    q = config.num_attention_heads * config.head_dim  # D unless head_dim is set apart (Qwen3)
    norms = {"head": 2 * config.head_dim, "projection": q + kv}.get(config.qk_norm, 0)
    return 2 * D * q + 2 * D * kv + config.bias * (q + D + 2 * kv) + norms


def parameter_counts(config: MoEConfig) -> dict[str, int]:
    """Parameter counts as `MoEForCausalLM` builds them.

    `expert` is the routed experts of all layers (the parameters expert parallelism shards);
    `dense` is everything else (embeddings, attention, norms, dense FFNs, routers, shared
    experts: replicated on every rank). `active` counts k of the E routed experts, as
    `MoEForCausalLM.num_active_parameters()` does.
    """
    D, V = config.hidden_size, config.vocab_size
    norm = D * (2 if config.norm_type == "layernorm" and config.bias else 1)
    embedding = V * D + (config.max_position_embeddings * D if config.position_embedding_type == "learned" else 0)
    dense = embedding + norm + (0 if config.tie_word_embeddings else V * D)
    expert = active_expert = 0
    for layer in range(config.num_hidden_layers):
        dense += _attention_params(config) + 2 * norm
        if not config.is_moe_layer(layer):
            dense += _mlp_params(config, config.intermediate_size, config.bias)
            continue
        E, k, width = config.num_local_experts, config.num_experts_per_tok, config.moe_intermediate_size
        dense += E * D  # router, no bias
        if config.num_shared_experts:
            dense += _mlp_params(config, config.num_shared_experts * width, config.expert_bias)
        one = _mlp_params(config, width, config.expert_bias)
        expert += E * one
        active_expert += k * one
    return {
        "total": dense + expert,
        "active": dense + active_expert,
        "dense": dense,
        "expert": expert,
        "embedding": embedding,
    }


# ---- FLOPs ----------------------------------------------------------------------------


def flops_per_token(config: MoEConfig, *, context: int) -> dict[str, int]:
    """Forward FLOPs of one token that attends to `context` tokens, itemised.

    Convention (PaLM, Chowdhery et al. 2022, App. B; Chinchilla, Hoffmann et al. 2022,
    App. F): a matmul with an m x n weight costs 2mn FLOPs per token; attention costs
    2 * context * d_attn for QK^T plus the same for softmax(.)V per layer, with the FULL
    context (no causal discount: a kernel that skips the masked half does half of that).
    d_attn = heads * head_dim; GQA shrinks the k/v projections but not these products,
    since every query head still attends. Biases, norms, activations, softmax and the
    router's top-k are not counted (O(d) per token, under 1% here), nor embedding lookups
    (no FLOPs). The lm_head is a matmul and is counted. Hence
    total = 2 x (matmul weights a token passes through) + attention scores.
    """
    D, L = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    d_attn = config.num_attention_heads * config.head_dim
    out = {
        "attention_proj": L * 2 * (2 * D * d_attn + 2 * D * kv),
        "attention_scores": L * 2 * 2 * context * d_attn,
        "dense_ffn": 0,
        "routed_experts": 0,
        "shared_experts": 0,
        "router": 0,
        "lm_head": 2 * D * config.vocab_size,
    }
    for layer in range(L):
        if not config.is_moe_layer(layer):
            out["dense_ffn"] += 2 * _mlp_matmul_params(config, config.intermediate_size)
            continue
        width = config.moe_intermediate_size
        out["routed_experts"] += 2 * config.num_experts_per_tok * _mlp_matmul_params(config, width)
        out["shared_experts"] += 2 * _mlp_matmul_params(config, config.num_shared_experts * width)
        out["router"] += 2 * D * config.num_local_experts
    out["total"] = sum(out.values())
    return out


def expert_rows_per_rank(config: MoEConfig, *, tokens_per_rank: int, ep_size: int = 1, etp_size: int = 1) -> int:
    """Rows one rank pushes through its experts per MoE layer and micro-batch (each row through a 1/etp_size slice).

    ETP all-gathers the tokens of its `etp_size` ranks, so a rank runs its slices on
    etp_size x `tokens_per_rank` tokens. EP > 1 goes through DeepSpeed's capacity buffer, which
    computes every slot, empty ones too: E x C per rank, C the capacity of the gathered tokens
    (etp_size x the per-rank capacity, see `expert_tensor_parallel._gather_routing`). Without
    EP the experts run the exact routes (k per token), and so does a dropless buffer, whose
    data-dependent capacity is not known in advance (a lower bound there).
    """
    k, E = config.num_experts_per_tok, config.num_local_experts
    if ep_size == 1 or config.capacity_factor is None:
        return etp_size * tokens_per_rank * k
    return (
        E
        * etp_size
        * expert_capacity(
            num_tokens=tokens_per_rank,
            num_experts=E,
            top_k=k,
            capacity_factor=config.capacity_factor,
            min_capacity=config.min_capacity,
        )
    )


def flops_per_rank(
    config: MoEConfig, *, tokens_per_rank: int, seq_len: int, ep_size: int = 1, etp_size: int = 1
) -> dict[str, int]:
    """Forward FLOPs one rank does for one micro-batch of `tokens_per_rank` tokens (sequences of `seq_len`).

    Everything but the routed experts runs on the rank's own tokens (`flops_per_token` at context
    `seq_len`). The routed experts run `expert_rows_per_rank` rows through slices of 1/etp_size
    of an expert: with ETP the expert FLOPs per row are divided by T and the rows multiplied by
    T. `train` = 3 x forward (the backward costs two matmuls per forward one; Kaplan et al. 2020).
    """
    per_token = flops_per_token(config, context=seq_len)
    moe_layers = len(config.moe_layer_indices)
    expert_row = 2 * _mlp_matmul_params(config, config.moe_intermediate_size) // etp_size  # one slice, one row
    rows = expert_rows_per_rank(config, tokens_per_rank=tokens_per_rank, ep_size=ep_size, etp_size=etp_size)
    out = {
        "non_expert": tokens_per_rank * (per_token["total"] - per_token["routed_experts"]),
        "routed_experts": moe_layers * rows * expert_row if config.is_moe else 0,
    }
    out["forward"] = out["non_expert"] + out["routed_experts"]
    out["train"] = 3 * out["forward"]
    return out


# ---- memory ---------------------------------------------------------------------------


def _optimizer_bytes_per_param(precision: str, zero_stage: int) -> int:
    """AdamW state: two fp32 moments, plus an fp32 master copy where one exists.

    Mixed precision keeps an fp32 master (ZeRO paper, Rajbhandari et al. 2020 §3.1: K = 12).
    DeepSpeed's ZeRO-1/2 optimizer also clones its fp32 partition when training in fp32
    (`single_partition_of_fp32_groups` in deepspeed/runtime/zero/stage_1_and_2.py), so only
    plain fp32 AdamW without ZeRO has the moments alone.
    """
    return 12 if precision != "fp32" or zero_stage >= 1 else 8


def _norm_bytes(config: MoEConfig, a: int) -> int:
    """What one norm keeps per token: LayerNorm its input; torch's RMSNorm computes in fp32 and
    keeps the fp32 input and the fp32 normalised tensor (measured with saved-tensor hooks)."""
    return a * config.hidden_size if config.norm_type == "layernorm" else 8 * config.hidden_size


def _activation_bytes_per_token(
    config: MoEConfig, layer: int, *, a: int, context: int, ep_size: int, flash_attention: bool, etp_size: int = 1
) -> float:
    """Bytes one token keeps alive for the backward of one layer (`a` = bytes per activation).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models", §4.1, eq. 1) count 34sbh + 5as^2b bytes per layer for a GPT block in 16-bit.
    Adapted to this model: no dropout (their 1-byte masks and dropout outputs go); sdpa
    keeps a per-row fp32 logsumexp instead of the a*s^2 probabilities (FlashAttention, Dao
    et al. 2022) unless `flash_attention=False`; GQA keys/values are kv wide; SwiGLU keeps 4
    intermediates (gate, silu(gate), up, product) where GELU keeps 2 (its input and output).
    MoE: the router works in fp32; every route keeps its gathered input and expert body, and
    the fp32 combine keeps the expert output and its weighted copy (moe.LocalExperts).
    ETP: a rank runs the routes of the tokens of all T ranks of its ETP group, each
    through a 1/T slice of its expert: per own token T x the routes, each keeping a full-width
    input and output but 1/T of the body. The gathered gate weights and expert ids (a few
    bytes per route) are left out.
    """
    D, H, E = config.hidden_size, config.num_attention_heads, config.num_local_experts
    kv = config.num_key_value_heads * config.head_dim
    body = 4 if config.hidden_act == "swiglu" else 2
    norm = _norm_bytes(config, a)
    # QKV input, Q, K, V, attention output (= o_proj input); then the softmax state
    attention = norm + a * (3 * D + 2 * kv) + (4 * H if flash_attention else a * H * context)
    if not config.is_moe_layer(layer):
        return attention + norm + a * (D + body * config.intermediate_size)  # FFN input, body
    width = config.moe_intermediate_size
    # DeepSpeed's all-to-all dispatch pads every expert to capacity (capacity_factor x the
    # fair share of T*k routes); at EP=1 and dropless the experts run exact slices.
    cf = config.capacity_factor if ep_size > 1 and config.capacity_factor is not None else 1.0
    routes = config.num_experts_per_tok * cf * etp_size
    router = (4 * D if a != 4 else 0) + 4 * 2 * E  # fp32 copy of the input; fp32 logits and probs
    experts = routes * (a * (D + body * width / etp_size) + 2 * 4 * D)
    shared = a * body * config.num_shared_experts * width
    return attention + norm + a * D + router + experts + shared


def _stacked_expert_bytes(
    config: MoEConfig, layer: int, *, a: int, ep_size: int, etp_size: int, experts_impl: str
) -> int:
    """The per-forward stack of a MoE layer's expert weights ([E, out, in] per projection) that the
    EP/ETP batched matmul and the grouped GEMM of `moe.LocalExperts` keep for the backward. At one
    rank per expert (EP = ETP = 1) the per-expert loop (`experts_impl="loop"`, the choice of
    `moe.experts_impl` on CPU and on CUDA outside bf16 on sm90) keeps none. Under ETP the
    stack holds the rank's slices."""
    if not config.is_moe_layer(layer) or (ep_size * etp_size == 1 and experts_impl == "loop"):
        return 0
    projections = 3 if config.hidden_act == "swiglu" else 2
    return (
        a
        * projections
        * config.num_local_experts
        // ep_size
        * config.hidden_size
        * config.moe_intermediate_size
        // etp_size
    )


def reduce_bucket_elements(ds_config: dict) -> int:
    """Elements of the contiguous gradient buckets DeepSpeed's ZeRO-1/2 optimizer allocates, from its JSON.

    With `contiguous_gradients` (default true) `DeepSpeedZeroOptimizer.setup_buckets` allocates
    `reduce_bucket_size` elements (default 5e8) per gradient dtype up front, twice with
    `overlap_comm` (default false for stages 1 and 2), however small the model
    (deepspeed/runtime/zero/stage_1_and_2.py, 0.19.8). Stage 0 has none.
    """
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage", 0) not in (1, 2) or not zero.get("contiguous_gradients", True):
        return 0
    return int(zero.get("reduce_bucket_size", 5e8)) * (2 if zero.get("overlap_comm", False) else 1)


def _state_bytes(
    config: MoEConfig, *, a: int, precision: str, zero_stage: int, world_size: int, ep_size: int, etp_size: int
) -> dict[str, float]:
    """Weights, gradients and AdamW state of one rank.

    - weights: dense parameters are replicated; each rank holds E/ep_size experts per layer,
      each as a 1/etp_size slice under expert tensor parallelism. Held in
      `precision` (bf16/fp16 weights are 2 bytes, fp32 4).
    - gradients: same dtype as the weights; ZeRO-2 shards them (dense over `world_size`
      ranks, experts over the world/(ep_size x etp_size) ranks of their expert-data-parallel group).
    - optimizer: AdamW, see `_optimizer_bytes_per_param`; ZeRO-1 and 2 shard it like the
      gradients. ZeRO-3 does not exist for native MoE (DeepSpeed refuses it).
    """
    params = parameter_counts(config)
    block = ep_size * etp_size  # ranks that hold one copy of every expert between them
    dense, expert = params["dense"], params["expert"] / block  # per rank
    edp = world_size // block  # expert-data-parallel replicas of each expert (slice)
    shard_grads, shard_optim = zero_stage >= 2, zero_stage >= 1
    grads = a * (dense / (world_size if shard_grads else 1) + expert / (edp if shard_grads else 1))
    optim = _optimizer_bytes_per_param(precision, zero_stage) * (
        dense / (world_size if shard_optim else 1) + expert / (edp if shard_optim else 1)
    )
    return {"weights": a * (dense + expert), "gradients": grads, "optimizer": optim}


def _activation_bytes(
    config: MoEConfig,
    *,
    a: int,
    micro_batch: int,
    seq_len: int,
    ep_size: int,
    etp_size: int,
    grad_ckpt: bool,
    flash_attention: bool,
    experts_impl: str,
) -> float:
    """Activations of one micro-batch on one rank.

    `micro_batch * seq_len` tokens through every layer, per `_activation_bytes_per_token`, plus the head: final
    norm and lm_head inputs, the logits in `precision` and the fp32 log-probabilities of the loss; plus each MoE
    layer's stacked expert weights (`_stacked_expert_bytes`; none for `experts_impl="loop"` at EP = ETP = 1, the
    default "grouped" being the single-GPU bf16 path). With `grad_ckpt` every block keeps only its input, plus one
    block's activations while it is recomputed (Korthikanti et al. 2022 §4.2, full recomputation).
    """
    layers = range(config.num_hidden_layers)
    per_layer = [
        _activation_bytes_per_token(
            config, i, a=a, context=seq_len, ep_size=ep_size, etp_size=etp_size, flash_attention=flash_attention
        )
        for i in layers
    ]
    body = (config.num_hidden_layers * a * config.hidden_size + max(per_layer)) if grad_ckpt else sum(per_layer)
    head = _norm_bytes(config, a) + a * config.hidden_size + (a + 4) * config.vocab_size
    stacked = [
        _stacked_expert_bytes(config, i, a=a, ep_size=ep_size, etp_size=etp_size, experts_impl=experts_impl)
        for i in layers
    ]
    return micro_batch * seq_len * (body + head) + (max(stacked) if grad_ckpt else sum(stacked))


def _check_settings(*, precision: str, zero_stage: int, world_size: int, ep_size: int, etp_size: int) -> None:
    """Refuse what DeepSpeed cannot run, rather than predict memory for it."""
    if precision not in _BYTES:
        raise ValueError(f"precision={precision!r} is invalid: expected one of {sorted(_BYTES)}")
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage={zero_stage!r} is invalid: 0, 1 or 2 (native MoE refuses ZeRO-3)")
    if world_size % (ep_size * etp_size):
        raise ValueError(f"ep_size={ep_size} x etp_size={etp_size} must divide world_size={world_size}")


def memory_bytes(
    config: MoEConfig,
    *,
    zero_stage: int,
    ep_size: int,
    world_size: int,
    precision: str,
    micro_batch: int,
    seq_len: int,
    grad_ckpt: bool = False,
    flash_attention: bool = True,
    etp_size: int = 1,
    reduce_bucket: int = 0,
    experts_impl: str = "grouped",
) -> dict[str, float]:
    """Predicted per-rank training memory (bytes) of one DeepSpeed rank, itemised.

    Assumptions:
    - weights, gradients, optimizer: see `_state_bytes`.
    - activations: see `_activation_bytes`.
    - buffers: DeepSpeed's contiguous gradient bucket, `reduce_bucket` elements in `precision`
      (`reduce_bucket_elements` reads it from a DeepSpeed JSON; 0 leaves it out).
    - total: the sum, as if every part were alive at once (activations are in fact freed
      while gradients are written, so this bounds the backward-pass peak from above).
    - not modelled: DeepSpeed's all-gather buckets, the all-to-all and ETP all-gather buffers,
      the transient fp32 gradient partition of the step, allocator fragmentation, the CUDA
      context and library code; a measurement includes them.
    The activation count agrees within 5% with the bytes autograd really saves for the tiny
    presets (tests/test_profile_memory.py, measured with saved-tensor hooks on CPU), and the
    total within 10% of the CPU allocator's peak in a DeepSpeed EP x ETP run (the same file).
    """
    _check_settings(
        precision=precision, zero_stage=zero_stage, world_size=world_size, ep_size=ep_size, etp_size=etp_size
    )
    a = _BYTES[precision]
    out = _state_bytes(
        config,
        a=a,
        precision=precision,
        zero_stage=zero_stage,
        world_size=world_size,
        ep_size=ep_size,
        etp_size=etp_size,
    )
    out["activations"] = _activation_bytes(
        config,
        a=a,
        micro_batch=micro_batch,
        seq_len=seq_len,
        ep_size=ep_size,
        etp_size=etp_size,
        grad_ckpt=grad_ckpt,
        flash_attention=flash_attention,
        experts_impl=experts_impl,
    )
    out["buffers"] = a * reduce_bucket
    out["total"] = sum(out.values())
    return out


def fit_verdict(total_bytes: float, *, gpu_mem_gib: float, headroom: float = 0.1) -> str:
    """'fits' within (1 - headroom) of one GPU's memory, 'tight' within all of it, else 'does not fit'.

    The headroom stands for what `memory_bytes` leaves out (CUDA context, communication
    buckets, fragmentation): a prediction that needs all of the GPU will not run reliably.
    """
    capacity = gpu_mem_gib * GiB
    if total_bytes <= (1 - headroom) * capacity:
        return "fits"
    return "tight" if total_bytes <= capacity else "does not fit"
