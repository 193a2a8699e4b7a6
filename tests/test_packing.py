"""Packed conversations: a row's logits, loss and expert choices are each conversation's alone, and the step's
loss is the mean over its supervised tokens however the batch is split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from moe_dist.model.configuration import MoEConfig
from moe_dist.model.modeling import IGNORE_INDEX, MoEForCausalLM
from moe_dist.train.data_prep import DataError
from moe_dist.train.packing import INPUTS, LABELS, POSITIONS, REAL, pack_conversations, packed_tensors


@dataclass
class Ex:
    input_ids: np.ndarray
    supervised: np.ndarray


def examples(lengths, vocab=512, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        sup = np.zeros(n, dtype=bool)
        sup[n // 2 :] = True  # the answer is the second half
        out.append(Ex(rng.integers(0, vocab, n), sup))
    return out


def model(preset: str, **overrides) -> MoEForCausalLM:
    torch.manual_seed(0)
    config = MoEConfig.from_preset(preset, vocab_size=512, **overrides)
    return MoEForCausalLM(config).eval()


def choices(m: MoEForCausalLM):
    """Per-token top-k expert choices of every router, recorded by forward hooks."""
    seen = []
    for router in m.routers():
        router.register_forward_hook(lambda mod, args, out: seen.append(out.expert_idx_TK))
    return seen


@pytest.mark.parametrize("preset", ["tiny-moe", "mixtral-tiny"])
def test_a_packed_row_computes_each_conversation_as_if_alone(preset):
    exs = examples([17, 9, 30, 5, 12])
    rows, counts = pack_conversations(exs, 40, truncate=False, label="train")
    assert counts["conversations"] == 5 and len(rows) == 2  # 16 + 8 + 29 + 4 + 11 = 68 tokens in 2 rows of 40
    m = model(preset)
    seen = choices(m)
    input_ids, labels, positions, real = packed_tensors(rows, np.arange(len(rows)))
    with torch.no_grad():
        packed = m(input_ids=input_ids, position_ids=positions, real_tokens=real, use_cache=False)
    packed_choices = [c.view(len(rows), 40, -1) for c in seen]
    seen.clear()
    found = 0
    for r in range(len(rows)):
        starts = np.flatnonzero(rows[r, POSITIONS] == 0)
        for s, e in zip(starts, [*starts[1:], 40]):
            if not rows[r, REAL, s]:
                continue
            n = int(rows[r, REAL, s:e].sum())
            alone_ids = torch.from_numpy(rows[r, INPUTS, s : s + n])[None]
            with torch.no_grad():
                alone = m(input_ids=alone_ids, use_cache=False)
            assert (alone.logits[0] - packed.logits[r, s : s + n]).abs().max() <= 1e-5
            for layer, c in enumerate(seen):
                assert torch.equal(c.view(n, -1), packed_choices[layer][r, s : s + n])
            seen.clear()
            found += 1
    assert found == 5


def test_the_routing_losses_leave_the_padding_out():
    exs = examples([17, 9])
    rows, _ = pack_conversations(exs, 40, truncate=False, label="train")  # one row, 15 padding tokens
    m = model("tiny-moe", router_z_loss_coef=1e-3)
    input_ids, labels, positions, real = packed_tensors(rows, np.arange(1))
    with torch.no_grad():
        packed = m(input_ids=input_ids, position_ids=positions, real_tokens=real, use_cache=False)
        stats = {i: dict(r.stats) for i, r in enumerate(m.routers())}
        n = int(real.sum())
        alone = m(input_ids=input_ids[:, :n], position_ids=positions[:, :n], use_cache=False)
    assert abs(packed.aux_loss.item() - alone.aux_loss.item()) <= 1e-6
    for i, r in enumerate(m.routers()):
        assert torch.equal(stats[i]["selected_per_expert"], r.stats["selected_per_expert"])
        assert abs(stats[i]["entropy"].item() - r.stats["entropy"].item()) <= 1e-6


def test_the_loss_is_the_mean_over_the_supervised_tokens_of_the_step():
    exs = examples([17, 9, 30, 5, 12, 21, 8, 14])
    rows, counts = pack_conversations(exs, 40, truncate=False, label="train")
    m = model("tiny-moe", router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    input_ids, labels, positions, real = packed_tensors(rows, np.arange(len(rows)))
    supervised = (labels != IGNORE_INDEX).sum()
    assert supervised == counts["supervised_tokens"]
    whole = m(input_ids=input_ids, shift_labels=labels, position_ids=positions, real_tokens=real, use_cache=False)
    # Split into micro-batches of one row: the summed losses over the step's count give the same number.
    parts = sum(
        m(
            input_ids=input_ids[i : i + 1],
            shift_labels=labels[i : i + 1],
            position_ids=positions[i : i + 1],
            real_tokens=real[i : i + 1],
            use_cache=False,
            num_items_in_batch=supervised,
        ).loss
        for i in range(len(rows))
    )
    assert abs(parts.item() - whole.loss.item()) <= 1e-6 * whole.loss.item()  # float32 sums in another order


def test_best_fit_packs_a_long_tail_densely_and_refuses_or_truncates_long_ones():
    rng = np.random.default_rng(1)
    lengths = np.minimum((rng.pareto(1.5, 2000) * 40 + 8).astype(int), 256)
    rows, counts = pack_conversations(examples(lengths), 256, truncate=False, label="train")
    assert counts["real_fraction"] >= 0.95, counts
    assert (rows[:, LABELS] != IGNORE_INDEX).sum() == counts["supervised_tokens"]
    with pytest.raises(DataError, match=r"train: 1 conversation\(s\) longer than .* record 2;"):
        pack_conversations(examples([10, 300, 20]), 256, truncate=False, label="train")
    rows, counts = pack_conversations(examples([10, 300, 20]), 256, truncate=True, label="train")
    assert counts["truncated"] == 1 and counts["conversations"] == 3
    assert rows[:, REAL].sum() == 9 + 256 + 19
