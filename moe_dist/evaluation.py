"""Validation: loss, perplexity, next-token accuracy and routing over a fixed sharded set.

Every rank evaluates the same number of micro-batches (see `data.validation_shard`), so
expert-parallel all-to-alls stay matched, and the sums are all-reduced so the result is
the mean over the whole validation set, identical on every rank.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import torch

from .data import batch_tensors
from .metrics import RoutingAccumulator


@torch.no_grad()
def evaluate(model, blocks: np.ndarray, shards: list[np.ndarray], *, device: torch.device,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
             autocast=contextlib.nullcontext, progress: Callable[[], None] = lambda: None) -> dict:
    """Returns loss, ppl, top1_acc, top3_acc and `routing` (stats averaged over the pass, this rank)."""
    was_training = model.training
    model.eval()
    # loss * tokens, tokens, top-1 hits, top-3 hits; float64 so long sets sum exactly enough
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    routing = RoutingAccumulator()
    try:
        with autocast():
            for idx in shards:
                input_ids, labels = batch_tensors(blocks, idx)
                input_ids, labels = input_ids.to(device), labels.to(device)
                out = model(input_ids=input_ids, shift_labels=labels, use_cache=False)
                top3 = out.logits.float().topk(3, dim=-1).indices
                sums += torch.stack([out.loss.double() * labels.numel(), torch.tensor(labels.numel(), device=device),
                                     (top3[..., 0] == labels).sum(), (top3 == labels[..., None]).any(-1).sum()]
                                    ).to(sums)
                routing.add(model.routing_stats())
                progress()
    finally:
        model.train(was_training)
    all_reduce(sums)
    loss = (sums[0] / sums[1]).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "top1_acc": (sums[2] / sums[1]).item(),
            "top3_acc": (sums[3] / sums[1]).item(), "routing": routing.average()}
