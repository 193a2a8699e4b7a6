"""The per-rank RNG state a checkpoint saves: restorable with fewer devices visible (a job may resume with
one GPU per process)."""

import random

import numpy as np
import torch

from moe_dist.train.checkpoint import capture_rng, cuda_rng_for_device, restore_rng


def test_rng_round_trip_restores_python_numpy_and_torch_draws():
    state = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_cuda_rng_is_saved_for_the_ranks_own_device_and_restored_on_its_current_one():
    own = torch.arange(4, dtype=torch.uint8)
    state = {"cuda_device": {"index": 3, "state": own}}
    # Saved on device 3 of 4, resumed with one device visible: the rank's own state, not IndexError.
    assert cuda_rng_for_device(state, device=0) is own


def test_old_checkpoints_with_every_devices_rng_are_still_read():
    every = [torch.full((4,), i, dtype=torch.uint8) for i in range(4)]
    assert torch.equal(cuda_rng_for_device({"cuda": every}, device=2), every[2])
    assert cuda_rng_for_device({"cuda": every[:1]}, device=2) is None  # that device was not saved
    assert cuda_rng_for_device({}, device=0) is None  # saved on a machine without CUDA
