"""Rendered conversations -> fixed-length training rows, several conversations per row, none attending to another.

A conversation of n tokens gives n - 1 (input, label) pairs; the label is the next token where that token is
supervised, else `IGNORE_INDEX`. Pieces are placed best-fit decreasing (each, longest first, into the open row
with the least room that still holds it), which packs long-tailed length distributions to a few percent of
padding. Each row is stored as four channels of `seq_len` values: input ids, labels, position ids (restarting at
0 where each conversation starts: transformers' `create_causal_mask` turns the restarts into a block-diagonal
causal mask, and FlashAttention's varlen path reads them too) and the real-token mask (0 on the padding that
ends a row, which the routers leave out).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence

import numpy as np
import torch

from ..model.modeling import IGNORE_INDEX
from .data_prep import DataError

log = logging.getLogger(__name__)

INPUTS, LABELS, POSITIONS, REAL = range(4)


def piece(input_ids: np.ndarray, supervised: np.ndarray, seq_len: int) -> np.ndarray | None:
    """One conversation, cut to seq_len + 1 tokens, as a [4, n - 1] piece; None when nothing in it is supervised."""
    input_ids, supervised = input_ids[: seq_len + 1], supervised[: seq_len + 1]
    n = len(input_ids) - 1
    out = np.empty((4, n), dtype=np.int64)
    out[INPUTS] = input_ids[:-1]
    out[LABELS] = np.where(supervised[1:], input_ids[1:], IGNORE_INDEX)
    out[POSITIONS] = np.arange(n)
    out[REAL] = 1
    return out if (out[LABELS] != IGNORE_INDEX).any() else None


def pack_conversations(
    examples: Sequence, seq_len: int, *, truncate: bool, label: str, pad_id: int = 0
) -> tuple[np.ndarray, dict]:
    """Examples (`input_ids`, `supervised`, in file order) -> rows [R, 4, seq_len] and counts for the log.

    An over-long conversation is refused (one line naming how many, the first one's record and the flag that
    truncates instead), or with `truncate` cut to seq_len + 1 tokens; the counts are logged either way.
    """
    kept, too_long, empty = [], [], 0
    for i, ex in enumerate(examples):
        if len(ex.input_ids) - 1 > seq_len:
            too_long.append(i)
            if not truncate:
                continue
        p = piece(np.asarray(ex.input_ids), np.asarray(ex.supervised, dtype=bool), seq_len)
        if p is None:
            empty += 1
        else:
            kept.append(p)
    if too_long and not truncate:
        raise DataError(
            f"{label}: {len(too_long)} conversation(s) longer than seq_len + 1 = {seq_len + 1} tokens, the first "
            f"is record {too_long[0] + 1}; raise --seq_len or pass --truncate_conversations true"
        )
    if not kept:
        raise DataError(f"{label}: no conversation has a supervised token within seq_len = {seq_len}")
    rows = _best_fit(kept, seq_len, pad_id)
    real = int(rows[:, REAL].sum())
    counts = {
        "conversations": len(kept),
        "truncated": len(too_long),
        "dropped_unsupervised": empty,
        "rows": len(rows),
        "real_fraction": real / rows[:, REAL].size,
        "supervised_tokens": int((rows[:, LABELS] != IGNORE_INDEX).sum()),
    }
    log.info(
        "%s: %d conversations in %d rows of %d tokens, %.1f%% real tokens, %d supervised; %d truncated, %d dropped "
        "with nothing supervised",
        label,
        counts["conversations"],
        counts["rows"],
        seq_len,
        100 * counts["real_fraction"],
        counts["supervised_tokens"],
        counts["truncated"],
        counts["dropped_unsupervised"],
    )
    return rows, counts


def _best_fit(kept: list[np.ndarray], seq_len: int, pad_id: int) -> np.ndarray:
    """Best-fit decreasing; ties keep file order, so the rows are the same on every run."""
    order = sorted(range(len(kept)), key=lambda i: (-kept[i].shape[1], i))
    rooms: list[tuple[int, int]] = []  # (room left, row), sorted
    fill: list[int] = []
    members: list[list[int]] = []
    for i in order:
        n = kept[i].shape[1]
        at = bisect.bisect_left(rooms, (n, -1))
        if at == len(rooms):
            row = len(fill)
            fill.append(0)
            members.append([])
        else:
            _, row = rooms.pop(at)
        members[row].append(i)
        fill[row] += n
        if seq_len - fill[row] > 0:
            bisect.insort(rooms, (seq_len - fill[row], row))
    rows = np.zeros((len(members), 4, seq_len), dtype=np.int64)
    rows[:, INPUTS] = pad_id
    rows[:, LABELS] = IGNORE_INDEX
    for row, ids in enumerate(members):
        at = 0
        for i in ids:
            n = kept[i].shape[1]
            rows[row, :, at : at + n] = kept[i]
            at += n
    return rows


def packed_tensors(rows: np.ndarray, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
    """(input_ids, labels, position_ids, real) for the rows `idx`: what the engines take for packed batches."""
    batch = torch.from_numpy(np.asarray(rows[idx], dtype=np.int64))
    return (
        batch[:, INPUTS].contiguous(),
        batch[:, LABELS].contiguous(),
        batch[:, POSITIONS].contiguous(),
        batch[:, REAL].bool().contiguous(),
    )
