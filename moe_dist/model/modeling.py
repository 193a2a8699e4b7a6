"""Decoder-only (MoE) language model: attention, norms, blocks and `MoEForCausalLM`.

One model, two block styles chosen by the config: GPT-2 (LayerNorm, GELU, learned
positions) and modern (RMSNorm, RoPE, GQA, SwiGLU). Only sibling relative imports, so
`save_pretrained` can copy this file for `trust_remote_code` loading; no DeepSpeed here.

Shapes: B batch, S new tokens, L cached + new tokens, D width, H heads, Hkv KV heads, hd head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep

from .configuration import MoEConfig
from .moe import FeedForward, MoEBlock
from .routing import Router, total_router_loss

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache` (in `generate`, the model
# inputs and the outputs), keeping the old name as a deprecated alias. Models must take either
# name, and return the cache under the field the installed release declares, or `generate` finds
# no cache and decodes each new token without its context.
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


IGNORE_INDEX = -100  # labels the loss leaves out (transformers' ignore_index): prompts and padding


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache once, as `cache` (or the older name `past_key_values`)")
    return past_key_values if cache is None else cache


def build_norm(config: MoEConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.bias)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al., arXiv:2104.09864), rotate-half convention as in Llama.

    The frequencies of a scaled type (`rope_parameters["rope_type"]`: linear, llama3, yarn) come from
    transformers' own `ROPE_INIT_FUNCTIONS`, with the cos/sin scale they return (yarn's attention factor),
    so an imported Llama 3 or a YaRN model rotates exactly as its stock class does.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        rope_type = self.config.rope_parameters.get("rope_type", "default")
        if rope_type != "default":
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](self.config, None)
            return inv_freq
        self.attention_scaling = 1.0
        hd, theta = self.config.head_dim, self.config.rope_parameters["rope_theta"]
        return 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))

    @torch.no_grad()
    def forward(self, position_ids_BS: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_BSh = position_ids_BS[..., None].float() * self.inv_freq.to(position_ids_BS.device)
        emb_BSd = torch.cat((freqs_BSh, freqs_BSh), dim=-1)
        return (emb_BSd.cos() * self.attention_scaling).to(dtype), (emb_BSd.sin() * self.attention_scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos_BSd, sin_BSd):
    cos, sin = cos_BSd.unsqueeze(1), sin_BSd.unsqueeze(1)  # broadcast over heads
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention for `attn_implementation="eager"`; sdpa is the default."""
    groups = module.num_key_value_groups
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores_BHSL = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        scores_BHSL = scores_BHSL.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores_BHSL + mask
    probs = F.dropout(scores_BHSL.softmax(dim=-1, dtype=torch.float32).to(query.dtype), dropout, module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class Attention(nn.Module):
    """Causal self-attention, multi-head or grouped-query (Ainslie et al., arXiv:2305.13245), with optional
    RMSNorm of queries and keys, per head (Qwen3) or over the whole projection (OLMoE), and OLMoE's clamp."""

    def __init__(self, config: MoEConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True  # read by the sdpa/flash attention kernels
        D, q, kv = (
            config.hidden_size,
            config.num_attention_heads * self.head_dim,
            config.num_key_value_heads * self.head_dim,
        )
        self.q_proj = nn.Linear(D, q, bias=config.bias)
        self.k_proj = nn.Linear(D, kv, bias=config.bias)
        self.v_proj = nn.Linear(D, kv, bias=config.bias)
        self.o_proj = nn.Linear(q, D, bias=config.bias)
        norm_width = {"head": (self.head_dim, self.head_dim), "projection": (q, kv)}.get(config.qk_norm)
        self.q_norm = nn.RMSNorm(norm_width[0], eps=config.norm_eps) if norm_width else None
        self.k_norm = nn.RMSNorm(norm_width[1], eps=config.norm_eps) if norm_width else None

    def forward(self, x_BSD, position_embeddings, attention_mask, cache: Cache | None, position_ids=None):
        B, S, _ = x_BSD.shape
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)  # (B, S, H*hd), (B, S, Hkv*hd) x 2
        if self.config.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.config.clip_qkv is not None:
            q, k, v = (t.clamp(-self.config.clip_qkv, self.config.clip_qkv) for t in (q, k, v))
        q, k, v = (t.view(B, S, -1, self.head_dim) for t in (q, k, v))  # (B, S, heads, hd)
        if self.config.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd), (B, Hkv, S, hd) x 2
        if position_embeddings is not None:
            q, k = apply_rotary(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, L, hd)
        attend: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        dropout = self.config.attention_dropout if self.training else 0.0
        # position_ids: FlashAttention finds packed sequences from where they restart (its varlen path); sdpa and
        # eager take them from the block-diagonal mask instead.
        y_BSHd, _ = attend(
            self, q, k, v, attention_mask, scaling=self.scaling, dropout=dropout, position_ids=position_ids
        )
        return self.o_proj(y_BSHd.reshape(B, S, -1))


class DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); the FFN is dense or MoE."""

    def __init__(self, config: MoEConfig, layer_idx: int):
        super().__init__()
        self.input_norm = build_norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_norm = build_norm(config)
        self.mlp = (
            MoEBlock(config, layer_idx)
            if config.is_moe_layer(layer_idx)
            else FeedForward(config.hidden_size, config.intermediate_size, config.hidden_act, config.bias)
        )
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(
        self, x_BSD, position_embeddings=None, attention_mask=None, cache=None, position_ids=None, real_BS=None
    ):
        attn_BSD = self.self_attn(self.input_norm(x_BSD), position_embeddings, attention_mask, cache, position_ids)
        x_BSD = x_BSD + self.resid_dropout(attn_BSD)
        h_BSD = self.post_attention_norm(x_BSD)
        out = self.mlp(h_BSD) if isinstance(self.mlp, FeedForward) else self.mlp(h_BSD, real_BS)
        ffn_BSD, router_loss = out if isinstance(out, tuple) else (out, x_BSD.new_zeros(()))
        return x_BSD + self.resid_dropout(ffn_BSD), router_loss


class MoEPreTrainedModel(PreTrainedModel):
    config_class = MoEConfig
    config: MoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # transformers treats every model outside its own package as "custom code" and then
        # skips `_init_weights` for modules without direct parameters (Attention, FeedForward,
        # MoEBlock), which would silently drop the residual scaling and the per-expert seeds
        # below. Our inits go through `transformers.initialization`, which already leaves
        # loaded tensors alone, so the custom-code shortcut is not needed.
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        # GPT-2 (Radford et al. 2019 §2.3): scale residual-stream output projections by
        # 1/sqrt(number of residual layers), so activations don't grow with depth.
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        if isinstance(module, Attention):
            init.normal_(module.o_proj.weight, std=residual_std)
        elif isinstance(module, FeedForward):
            init.normal_(module.down_proj.weight, std=residual_std)
        elif isinstance(module, Router):
            init.normal_(module.weight, std=std)
            init.zeros_(module.score_bias)
            init.zeros_(module.load_sum)
        elif isinstance(module, RotaryEmbedding):
            # Non-persistent buffers are not in the checkpoint: from_pretrained hands them over
            # uninitialised (torch.empty) and relies on this method to refill them.
            init.copy_(module.inv_freq, module.compute_inv_freq())
        if isinstance(module, MoEBlock):
            self._init_experts(module, std, residual_std)

    def _init_experts(self, block: MoEBlock, std: float, residual_std: float) -> None:
        """Seed every expert from (run seed, layer, global expert id).

        An expert's initial weights then depend neither on how many experts a rank holds nor
        on construction order, and no two experts start identical (the trap of DeepSpeed's
        `Experts`, which deep-copies one module into every slot).
        """
        for expert_id, expert in enumerate(block.experts):
            weight = expert.up_proj.weight
            if weight.is_meta:
                return
            gen = torch.Generator(device=weight.device)
            gen.manual_seed((torch.initial_seed() * 1_000_003 + block.layer_idx * 10_007 + expert_id) % 2**63)
            for name, param in expert.named_parameters():
                if name.endswith("bias"):
                    continue
                init.normal_(param, std=residual_std if name.startswith("down_proj") else std, generator=gen)


@dataclass
class MoEModelOutput(BaseModelOutputWithPast):
    router_loss: torch.Tensor | None = None  # sum over MoE layers of the weighted aux + z losses


class MoEModel(MoEPreTrainedModel):
    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        learned = config.position_embedding_type == "learned"
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size) if learned else None
        self.rotary_emb = None if learned else RotaryEmbedding(config)
        self.embd_dropout = nn.Dropout(config.embd_dropout)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        past_key_values=None,
        real_tokens=None,
        **kwargs,
    ) -> MoEModelOutput:
        """Packed sequences: `position_ids` restarting at 0 where each one starts, no `attention_mask` and no
        cache; transformers' `create_causal_mask` then keeps attention inside each sequence. `real_tokens`
        (bool, B x S) leaves the padding out of the routing losses and statistics."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x_BSD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cache = _one_cache(cache, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            if self.embed_positions is not None and past + x_BSD.shape[1] > self.config.max_position_embeddings:
                raise ValueError(
                    f"{past + x_BSD.shape[1]} tokens exceed the context length "
                    f"(max_position_embeddings={self.config.max_position_embeddings})"
                )
            position_ids = torch.arange(past, past + x_BSD.shape[1], device=x_BSD.device).unsqueeze(0)

        # The cache goes positionally: its keyword is `past_key_values` before transformers 5.24, `cache` after.
        mask = create_causal_mask(self.config, x_BSD, attention_mask, cache, position_ids=position_ids)
        rope = None
        if self.embed_positions is not None:
            x_BSD = x_BSD + self.embed_positions(position_ids.clamp_min(0))  # left padding has negative ids
        else:
            rope = self.rotary_emb(position_ids, x_BSD.dtype)
        x_BSD = self.embd_dropout(x_BSD)

        router_loss = x_BSD.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x_BSD, layer_loss = layer(
                x_BSD,
                position_embeddings=rope,
                attention_mask=mask,
                cache=cache if use_cache else None,
                position_ids=position_ids,
                real_BS=real_tokens,
            )
            router_loss = router_loss + layer_loss  # the stock form's vectors add up as its formula pools them
        c = self.config
        router_loss = total_router_loss(router_loss, num_experts=c.num_local_experts, aux_coef=c.router_aux_loss_coef)
        return MoEModelOutput(last_hidden_state=self.norm(x_BSD), router_loss=router_loss, **{CACHE_FIELD: cache})


class MoEForCausalLM(MoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.model = MoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        shift_labels=None,
        use_cache=None,
        logits_to_keep=0,
        past_key_values=None,
        real_tokens=None,
        num_items_in_batch=None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """`labels` follow the HF convention (shifted here); `shift_labels` are already aligned
        with the inputs, as the trainer's packed `seq_len + 1` blocks give them. The KV cache comes
        as `cache` (transformers >= 5.24) or `past_key_values` (older callers). With `num_items_in_batch`
        the loss is the sum over the labelled tokens divided by it (transformers' convention), so that a
        caller can normalise over a whole optimizer step; `real_tokens`: see `MoEModel.forward`."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            real_tokens=real_tokens,
        )
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))
        router_loss = out.router_loss
        if self.training:
            for router in self.routers():
                router.accumulate_load()

        loss = None
        if labels is not None or shift_labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.vocab_size,
                shift_labels=None if shift_labels is None else shift_labels.contiguous(),
                num_items_in_batch=num_items_in_batch,
            )
            if self.training:
                loss = loss + router_loss
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=router_loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)}
        )

    # ---- MoE-specific API ---------------------------------------------------------------

    def routers(self) -> Iterator[Router]:
        return (m for m in self.modules() if isinstance(m, Router))

    def routing_stats(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per MoE layer, the statistics of the last forward (tensors; no host sync here)."""
        return {r.layer_idx: r.stats for r in self.routers() if r.stats}

    def router_loads(self) -> list[torch.Tensor]:
        """The bias-update window (`load_sum`, shape [E]) of every router that balances by bias,
        in `routers()` order: the rows that `update_router_biases` takes back, once summed."""
        return [r.load_sum for r in self.routers() if r.updates_bias]

    @torch.no_grad()
    def update_router_biases(self, loads_LE: torch.Tensor | None = None, apply: bool = True) -> None:
        """One aux-loss-free balancing step per router; call after each optimizer step.

        `loads_LE` holds one row per router of `router_loads()`, usually summed over the
        data-parallel ranks by the engine; without it each router uses its own window. No
        collective here: the model stays free of process groups. `apply=False` (after a
        skipped step) drops the windows instead.
        """
        balancing = [r for r in self.routers() if r.updates_bias]  # the others keep no window
        if loads_LE is not None and len(loads_LE) != len(balancing):
            raise ValueError(f"loads_LE has {len(loads_LE)} rows for {len(balancing)} bias-balanced routers")
        for i, router in enumerate(balancing):
            router.update_bias(None if loads_LE is None else loads_LE[i], apply)

    @torch.no_grad()
    def load_weights(
        self,
        source,
        named_parameters: Callable[[nn.Module], Iterable] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        """Materialise a model built on the meta device and fill it from `source`, one tensor at a time.

        `source` has `read(name) -> Tensor` and `has(name)`, under our checkpoint names;
        `named_parameters(model)` gives each parameter with its checkpoint name (default: its own; a
        model whose experts were sharded passes names with global expert ids). The buffers a checkpoint
        does not hold are refilled: RoPE frequencies, the routers' load windows, and a selection bias the
        source lacks (a stock class without one) starts at zero.
        """
        # to_empty makes new Parameter objects: keep the attributes a library tagged the old ones with
        # (DeepSpeed marks expert parameters with `allreduce` and `group_name`).
        tags = {name: dict(p.__dict__) for name, p in self.named_parameters()}
        self.to_empty(device=device)
        for name, param in self.named_parameters():
            param.__dict__.update(tags.get(name, {}))
        self.tie_weights()  # to_empty gave the tied head a tensor of its own
        for name, param in (named_parameters or nn.Module.named_parameters)(self):
            tensor = source.read(name)
            if tensor.shape != param.shape:
                raise ValueError(
                    f"{name}: the checkpoint holds shape {tuple(tensor.shape)}, the model {tuple(param.shape)}"
                )
            param.copy_(tensor)
        for name, module in self.named_modules():
            if isinstance(module, RotaryEmbedding):
                module.inv_freq.copy_(module.compute_inv_freq())
            elif isinstance(module, Router):
                module.load_sum.zero_()
                bias = f"{name}.score_bias"
                module.score_bias.copy_(source.read(bias) if source.has(bias) else torch.zeros_like(module.score_bias))

    def num_active_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters one token passes through: the routed experts count k of E times."""
        total = self.num_parameters(exclude_embeddings=exclude_embeddings)
        for module in self.modules():
            if isinstance(module, MoEBlock):
                routed = sum(p.numel() for p in module.experts.parameters())
                total -= routed - routed * self.config.num_experts_per_tok // self.config.num_local_experts
        return total
