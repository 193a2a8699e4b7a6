"""The step's gradient on packed conversations is the same however the batch is split: data-parallel size
{1, 2} x accumulation {1, 4} x EP {1, 2}, through the deepspeed launcher on CPU ranks."""

from __future__ import annotations

import json

import pytest
import torch
from launcher import ROOT, deepspeed

SCRIPT = ROOT / "tests" / "scripts" / "sft_normalisation.py"


@pytest.mark.multirank
def test_gradients_agree_across_data_parallel_accumulation_and_ep(tmp_path):
    for ranks, settings in ((1, [[1, 1], [4, 1]]), (2, [[1, 1], [4, 1], [1, 2], [4, 2]])):
        proc = deepspeed(SCRIPT, [str(tmp_path), json.dumps(settings)], ranks=ranks, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def grads(world: int, accum: int, ep: int) -> dict[str, torch.Tensor]:
        merged = {}
        for rank in range(world):
            merged |= torch.load(tmp_path / f"grads-W{world}-A{accum}-EP{ep}-rank{rank}.pt", weights_only=True)
        return merged

    reference = grads(1, 1, 1)
    assert any(".experts." in n for n in reference) and len(reference) > 20
    # Relative to the gradient's norm over the whole model: some tensors' gradients are 0 up to rounding (a key
    # bias cannot change a softmax), and those differ by rounding only.
    norm = torch.cat([g.flatten() for g in reference.values()]).norm()
    for world, accum, ep in ((1, 4, 1), (2, 1, 1), (2, 4, 1), (2, 1, 2), (2, 4, 2)):
        other = grads(world, accum, ep)
        assert other.keys() == reference.keys(), (world, accum, ep)
        diff = torch.cat([(other[n] - g).flatten() for n, g in reference.items()]).norm()
        assert diff / norm <= 1e-6, (world, accum, ep, (diff / norm).item())
