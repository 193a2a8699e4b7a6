"""Folders of stock transformers classes, exactly as a downloaded checkpoint looks, built from small random configs.

No model hub is reachable here: each class is built from its own config class, every tensor is drawn at
random (norm weights and selection biases included, so a swapped or misplaced one shows in the logits), and
saved with `save_pretrained` beside a tokenizer trained on the test corpus.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from launcher import FIXTURES

from moe_dist.train.data import SEPARATOR, build_tokenizer

SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
GPT2_SHAPE = dict(n_embd=64, n_layer=3, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def configs(vocab: int, experts: int = 4) -> dict[str, transformers.PretrainedConfig]:
    """One config per class, each using what makes that class different from ours."""
    t = transformers
    moe = dict(num_experts_per_tok=2, router_aux_loss_coef=0.0)
    return {
        # Tied embeddings, as the released GPT-2 checkpoints are. Dropout off (released: 0.1, which
        # tests/test_import_stock.py sets): the trained losses compared across layouts are then deterministic.
        "gpt2": t.GPT2Config(vocab_size=vocab, tie_word_embeddings=True, **GPT2_SHAPE),
        # Llama 3.2-style: llama3 rope scaling and a tied head.
        "llama": t.LlamaConfig(
            vocab_size=vocab,
            intermediate_size=128,
            tie_word_embeddings=True,
            rope_parameters=dict(LLAMA3_ROPE),
            **SHAPE,
        ),
        # Per-head q/k RMSNorm, and a head_dim that is not hidden_size / heads.
        "qwen3": t.Qwen3Config(vocab_size=vocab, intermediate_size=128, head_dim=32, **SHAPE),
        "mixtral": t.MixtralConfig(vocab_size=vocab, intermediate_size=64, num_local_experts=experts, **moe, **SHAPE),
        # A dense first layer (mlp_only_layers), unnormalised top-k, head_dim 32.
        "qwen3_moe": t.Qwen3MoeConfig(
            vocab_size=vocab,
            intermediate_size=128,
            moe_intermediate_size=64,
            num_experts=experts,
            norm_topk_prob=False,
            mlp_only_layers=[0],
            head_dim=32,
            **moe,
            **SHAPE,
        ),
        # q/k norms over the whole projections and a clamp that binds.
        "olmoe": t.OlmoeConfig(
            vocab_size=vocab,
            intermediate_size=64,
            num_experts=experts,
            clip_qkv=0.5,
            norm_topk_prob=False,
            **moe,
            **SHAPE,
        ),
        # A dense first layer, one shared expert, a selection bias, interleaved RoPE.
        "ernie4_5_moe": t.Ernie4_5_MoeConfig(
            vocab_size=vocab,
            intermediate_size=128,
            moe_intermediate_size=64,
            moe_num_experts=experts,
            moe_k=2,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            use_bias=False,
            router_aux_loss_coef=0.0,
            **SHAPE,
        ),
    }


def tokenizer_for_tests(folder: Path):
    stories = [s.strip() for s in (FIXTURES / "stories.txt").read_text().split(SEPARATOR) if s.strip()]
    return build_tokenizer("train:512", stories, folder)


def save_stock(fmt: str, folder: Path, tokenizer, *, experts: int = 4, seed: int = 0, **changes) -> Path:
    """`folder` holding a random `fmt` model (the tokenizer's vocabulary, config fields `changes`) and the tokenizer.
    An LM-head bias is saved zero, as our exporter writes it."""
    config = configs(len(tokenizer), experts)[fmt]
    for key, value in changes.items():
        setattr(config, key, value)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                # Around 1 for norms, small elsewhere; a selection bias large enough to change the choice.
                base = 1.0 if name.endswith("norm.weight") or ".ln_" in name else 0.0
                scale = 0.3 if "e_score_correction_bias" in name else 0.1
                tensor.copy_(base + scale * torch.randn_like(tensor))
            if name == "lm_head.bias":
                tensor.zero_()
    model.save_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE  # an instruction model's: it must reach the run and its export
    tokenizer.save_pretrained(folder)
    return folder
