"""What the expert all-to-alls of a training step should move, and how to quote their bandwidth.

Pure arithmetic, so `tools/profile_alltoall.py` and its test check measurements against the
same formula. Byte counts are per rank: the size of the buffer a rank hands to
`all_to_all_single`, of which (n-1)/n leaves the rank and 1/n stays with it.
"""

from __future__ import annotations

from ..model.routing import expert_capacity


def alltoall_bytes(*, num_experts: int, capacity: int, hidden_size: int, dtype_bytes: int) -> int:
    """Bytes one rank hands to one dispatch (or combine) all-to-all of one MoE layer.

    DeepSpeed's MOELayer exchanges the whole [E, C, D] capacity buffer (GShard, arXiv:2006.16668,
    Algorithm 2), empty slots included, so the volume depends on the capacity, not on the routing.
    """
    return num_experts * capacity * hidden_size * dtype_bytes


def step_alltoall_bytes(config, *, tokens_per_micro_batch: int, micro_batches: int, dtype_bytes: int) -> dict:
    """Per rank and optimizer step: `per_call`, `forward` and `backward` bytes, at a fixed capacity factor.

    Each MoE layer runs two all-to-alls forward (dispatch, combine); autograd runs the same
    two on the gradients backward (`_AllToAll.backward` is an all-to-all of the same shape).
    """
    if config.capacity_factor is None:
        raise ValueError("dropless routing: the capacity is the largest expert count over the EP group, "
                         "known only after routing; pass a capacity factor for an analytic count")
    capacity = expert_capacity(num_tokens=tokens_per_micro_batch, num_experts=config.num_local_experts,
                               top_k=config.num_experts_per_tok, capacity_factor=config.capacity_factor,
                               min_capacity=config.min_capacity)
    per_call = alltoall_bytes(num_experts=config.num_local_experts, capacity=capacity,
                              hidden_size=config.hidden_size, dtype_bytes=dtype_bytes)
    per_direction = 2 * len(config.moe_layer_indices) * micro_batches * per_call
    return {"capacity": capacity, "per_call": per_call, "forward": per_direction, "backward": per_direction}


def algorithm_bandwidth(nbytes: int, seconds: float) -> float:
    """GB/s as nccl-tests quotes all-to-all: bytes each rank sends (its whole buffer) / time."""
    return nbytes / seconds / 1e9


def bus_bandwidth(algbw: float, ranks: int) -> float:
    """nccl-tests' bus bandwidth for all-to-all, algbw x (n-1)/n: only that share crosses a link
    (github.com/NVIDIA/nccl-tests src/alltoall.cu AlltoAllGetBw, doc/PERFORMANCE.md)."""
    return algbw * (ranks - 1) / ranks
