"""A few greedy replies at each eval of a conversation run, so the log shows what the fine-tuning is teaching.

The prompts are the first validation conversations up to their first assistant turn, rendered with the run's
chat template and its generation prompt. Every rank decodes the same prompts for the same number of tokens, with
no early stop, so expert-parallel all-to-alls stay matched; the reply shown is cut at the first stop id.
"""

from __future__ import annotations

import torch

from .conversations import read_conversations

NUM_SAMPLES, MAX_NEW_TOKENS = 2, 32


def chat_prompts(valid_file: str, tokenizer, n: int = NUM_SAMPLES) -> list[list[int]]:
    """Token ids of the first `n` validation conversations' openings, ready for the assistant's reply."""
    prompts = []
    for messages in read_conversations(valid_file, "valid_file")[:n]:
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        text = tokenizer.apply_chat_template(messages[:first], tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


@torch.no_grad()
def greedy_replies(model, prompts: list[list[int]], tokenizer, device: torch.device, autocast, stop_ids) -> list[str]:
    """Each prompt's greedy continuation of MAX_NEW_TOKENS tokens, decoded up to the first of `stop_ids`."""
    was_training = model.training
    model.eval()
    replies = []
    try:
        with autocast():
            for prompt in prompts:
                ids = torch.tensor([prompt], device=device)
                new = []
                for _ in range(MAX_NEW_TOKENS):
                    logits = model(input_ids=ids[:, -model.config.max_position_embeddings :], use_cache=False).logits
                    token = logits[0, -1].argmax()
                    new.append(int(token))
                    ids = torch.cat([ids, token.view(1, 1)], dim=1)
                stop = next((i for i, t in enumerate(new) if t in stop_ids), len(new))
                replies.append(tokenizer.decode(new[:stop]))
    finally:
        model.train(was_training)
    return replies
