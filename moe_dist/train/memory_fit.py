"""Whether a planned run fits in the memory it will train in, decided before any data is prepared or weight allocated.

The estimate is `analysis.costs.memory_bytes` for one rank (weights, gradients, AdamW state, activations and
DeepSpeed's gradient bucket, each part as if alive at once, so an upper bound of the peak). On a GPU it is held
against one GPU: `--gpu_mem_gib`, else the device's own memory. On CPU every rank of this machine lives in its
RAM, so the estimate times those ranks is held against the memory available now (psutil), or against
`--gpu_mem_gib` per rank. Only what cannot fit is refused: a tight fit is the user's to try.
"""

from __future__ import annotations

import os

import psutil
import torch

from ..analysis.costs import GiB, memory_bytes, reduce_bucket_elements
from ..model.configuration import MoEConfig
from ..parallel.ds_config import ConfigError


def check_fits(
    config: MoEConfig,
    *,
    zero_stage: int,
    ds_config: dict | None,
    ep_size: int,
    etp_size: int,
    world_size: int,
    precision: str,
    micro_batch: int,
    seq_len: int,
    grad_ckpt: bool,
    gpu_mem_gib: float | None,
) -> None:
    """Refuse with one line naming the estimate and the memory when one rank's estimate cannot fit."""
    cuda = torch.cuda.is_available()
    # The per-expert loop keeps no stacked weights; the grouped path (CUDA) does: estimate the larger there.
    estimate = memory_bytes(
        config,
        zero_stage=zero_stage,
        ep_size=ep_size,
        etp_size=etp_size,
        world_size=world_size,
        precision=precision,
        micro_batch=micro_batch,
        seq_len=seq_len,
        grad_ckpt=grad_ckpt,
        reduce_bucket=reduce_bucket_elements(ds_config) if ds_config else 0,
        experts_impl="grouped" if cuda else "loop",
    )
    ranks, capacity, where = _memory(cuda, gpu_mem_gib, world_size)
    if estimate["total"] * ranks <= capacity:
        return
    parts = ", ".join(
        f"{name} {estimate[name] / GiB:.1f}"
        for name in ("weights", "gradients", "optimizer", "activations", "buffers")
        if estimate[name] >= GiB / 20
    )
    times = f" x {ranks} ranks on this machine" if ranks > 1 else ""
    raise ConfigError(
        f"the model does not fit in memory: the estimate is {estimate['total'] / GiB:.1f} GiB per rank "
        f"({parts} GiB; moe_dist.analysis.costs.memory_bytes){times}, more than {where}; use fewer or "
        f"smaller experts, a smaller batch or --seq_len, more ranks (expert parallelism shards the "
        f"experts), or --gpu_mem_gib to plan for another device"
    )


def _memory(cuda: bool, gpu_mem_gib: float | None, world_size: int) -> tuple[int, float, str]:
    """(ranks sharing the memory, its bytes, how to name it)."""
    if gpu_mem_gib is not None:
        return 1, gpu_mem_gib * GiB, f"--gpu_mem_gib {gpu_mem_gib:g}"
    if cuda:
        device = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        total = torch.cuda.get_device_properties(device).total_memory
        return 1, total, f"GPU {device}'s {total / GiB:.1f} GiB"
    # deepspeed's launcher announces the ranks of this machine as LOCAL_SIZE, torchrun as LOCAL_WORLD_SIZE.
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size)
    available = psutil.virtual_memory().available
    return ranks, available, f"the {available / GiB:.1f} GiB of memory available on this machine"
