"""Validation: loss, perplexity, next-token accuracy and routing over a fixed sharded set.

Every rank evaluates the same number of micro-batches of the same shape (see
`data.validation_shard`), so expert-parallel all-to-alls stay matched; the rows that only pad
the last batches are masked out of the sums, and the sums are all-reduced, so the result is the
mean over every validation block, identical on every rank and the same at any world size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..model.modeling import IGNORE_INDEX
from .data import batch_tensors
from .metrics import RoutingAccumulator


@torch.no_grad()
def evaluate(
    model,
    blocks: np.ndarray,
    shards: list[tuple[np.ndarray, np.ndarray]],
    *,
    device: torch.device,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    autocast=contextlib.nullcontext,
    progress: Callable[[], None] = lambda: None,
) -> dict:
    """Returns loss, ppl, top1_acc, top3_acc and `routing` (stats averaged over the pass, this rank).

    `shards` is this rank's (block indices, real-row mask) list from `validation_shard`. Exact
    only with dropless eval routing (eval_capacity_factor None, the default): with a capacity,
    a row's routes depend on its batch mates, padding included.
    """
    was_training = model.training
    model.eval()
    # loss sum, tokens, top-1 hits, top-3 hits; float64 so long sets sum exactly enough
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    routing = RoutingAccumulator()
    try:
        with autocast():
            for idx, real in shards:
                input_ids, labels, *packed = (t.to(device) for t in batch_tensors(blocks, idx))
                weight_B = torch.from_numpy(np.asarray(real, dtype=np.float64)).to(device)
                # Packed conversations: positions and the real-token mask, as in training (`forward_kwargs`).
                kwargs = dict(zip(("position_ids", "real_tokens"), packed))
                # Our own per-row loss, not out.loss (a mean over the whole batch, padding included).
                logits_BSV = model(input_ids=input_ids, use_cache=False, **kwargs).logits.float()
                nll_BS = F.cross_entropy(logits_BSV.flatten(0, 1), labels.flatten(), reduction="none")
                top3_BSK = logits_BSV.topk(3, dim=-1).indices
                counted_BS = labels != IGNORE_INDEX  # every label of a text block; the supervised ones of a row
                per_row = torch.stack(
                    [
                        nll_BS.view_as(labels).double().sum(1),
                        counted_BS.sum(1).double(),
                        ((top3_BSK[..., 0] == labels) & counted_BS).sum(1).double(),
                        ((top3_BSK == labels[..., None]).any(-1) & counted_BS).sum(1).double(),
                    ]
                )
                sums += per_row @ weight_B
                # Routing stats include the padded rows (they pass through the routers too): a
                # few repeated blocks in the last batches only, so the averages stay representative.
                routing.add(model.routing_stats())
                progress()
    finally:
        model.train(was_training)
    all_reduce(sums)
    loss = (sums[0] / sums[1]).item()
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "top1_acc": (sums[2] / sums[1]).item(),
        "top3_acc": (sums[3] / sums[1]).item(),
        "routing": routing.average(),
    }
