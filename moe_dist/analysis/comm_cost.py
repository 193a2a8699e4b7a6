"""What the expert collectives of a training step should move, and how to quote their bandwidth.

Pure arithmetic, so `tools/profile_alltoall.py` and its test check measurements against the
same formula. Byte counts are per rank: the size of the buffer a rank hands to
`all_to_all_single`, of which (n-1)/n leaves the rank and 1/n stays with it; for the expert
tensor parallel (ETP) collectives, the full buffer of the group: the all-gather's
output and the reduce-scatter's input. The per-layer ETP count is
`parallel.expert_tensor_parallel.etp_bytes_per_layer`, which the layer's own byte counter is
tested against; this module only multiplies it out per step.
"""

from __future__ import annotations

from ..model.routing import expert_capacity
from ..parallel.expert_tensor_parallel import etp_bytes_per_layer


def alltoall_bytes(*, num_experts: int, capacity: int, hidden_size: int, dtype_bytes: int) -> int:
    """Bytes one rank hands to one dispatch (or combine) all-to-all of one MoE layer.

    DeepSpeed's MOELayer exchanges the whole [E, C, D] capacity buffer (GShard, arXiv:2006.16668,
    Algorithm 2), empty slots included, so the volume depends on the capacity, not on the routing.
    """
    return num_experts * capacity * hidden_size * dtype_bytes


def step_alltoall_bytes(
    config, *, tokens_per_micro_batch: int, micro_batches: int, dtype_bytes: int, etp_size: int = 1
) -> dict:
    """Per rank and optimizer step: `per_call`, `forward` and `backward` bytes, at a fixed capacity factor.

    Each MoE layer runs two all-to-alls forward (dispatch, combine); autograd runs the same
    two on the gradients backward (`_AllToAll.backward` is an all-to-all of the same shape).
    Under ETP the all-to-all carries the ETP group's gathered tokens: `capacity` is etp_size x
    the per-rank capacity (`expert_tensor_parallel._gather_routing`).
    """
    if config.capacity_factor is None:
        raise ValueError(
            "dropless routing: the capacity is the largest expert count over the EP group, "
            "known only after routing; pass a capacity factor for an analytic count"
        )
    capacity = (
        expert_capacity(
            num_tokens=tokens_per_micro_batch,
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            capacity_factor=config.capacity_factor,
            min_capacity=config.min_capacity,
        )
        * etp_size
    )
    per_call = alltoall_bytes(
        num_experts=config.num_local_experts, capacity=capacity, hidden_size=config.hidden_size, dtype_bytes=dtype_bytes
    )
    per_direction = 2 * len(config.moe_layer_indices) * micro_batches * per_call
    return {"capacity": capacity, "per_call": per_call, "forward": per_direction, "backward": per_direction}


def step_etp_bytes(config, *, tokens_per_micro_batch: int, micro_batches: int, dtype_bytes: int, etp_size: int) -> dict:
    """Per rank and optimizer step: the ETP all-gather and reduce-scatter bytes, forward and backward.

    `etp_bytes_per_layer` per MoE layer and micro-batch: forward, the all-gather of the tokens
    and their routing and the reduce-scatter of the partial outputs; backward, their mirror
    images. Zero without ETP. Unlike the all-to-all, the volume does not depend on the capacity.
    """

    def per_layer(backward: bool) -> dict:  # forward, or forward + backward
        return etp_bytes_per_layer(
            tokens_per_rank=tokens_per_micro_batch,
            hidden_size=config.hidden_size,
            top_k=config.num_experts_per_tok,
            etp_size=etp_size,
            x_bytes=dtype_bytes,
            backward=backward,
        )

    forward, both = per_layer(False), per_layer(True)
    times = len(config.moe_layer_indices) * micro_batches if etp_size > 1 else 0
    return {
        f"{op}_{direction}": times * (forward[op] if direction == "forward" else both[op] - forward[op])
        for op in ("all_gather", "reduce_scatter")
        for direction in ("forward", "backward")
    }


def algorithm_bandwidth(nbytes: int, seconds: float) -> float:
    """GB/s as nccl-tests quotes all-to-all: bytes each rank sends (its whole buffer) / time."""
    return nbytes / seconds / 1e9


def bus_bandwidth(algbw: float, ranks: int) -> float:
    """nccl-tests' bus bandwidth for all-to-all, all-gather and reduce-scatter, algbw x (n-1)/n: only
    that share crosses a link (github.com/NVIDIA/nccl-tests src/alltoall.cu AlltoAllGetBw,
    doc/PERFORMANCE.md; for the latter two, algbw is quoted on the whole gathered buffer)."""
    return algbw * (ranks - 1) / ranks
