"""Process-group lifecycle: a free rendezvous port, start-up and clean shutdown.

Kept apart from the engines because tools and tests need the same three steps without an
engine (a launcher's `--master_port`, a bare `deepspeed.init_distributed` in a test script).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT / `--master_port`).

    The OS picks it (bind to port 0); another process could still take it before the caller
    binds, which is acceptable for launching local jobs.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Collectives time out this long after the `--dist_timeout` watchdog would have fired, so the
# watchdog, whose message names the stuck rank, always ends a hung job first. It checks every
# 5 s at most, so a minute is ample.
WATCHDOG_MARGIN_S = 60


def collective_timeout_s(dist_timeout_s: int) -> int:
    """The process groups' timeout for a run with `--dist_timeout dist_timeout_s`."""
    return dist_timeout_s + WATCHDOG_MARGIN_S


def init_distributed(timeout_s: int) -> tuple[Path, ...]:
    """`deepspeed.init_distributed`, then unlink this rank's CPU shared-memory all-reduce segment.

    On the CPU accelerator DeepSpeed (0.19.8) creates a 66 MB `/dev/shm` segment per rank, named
    after the master address and port, and never unlinks it: every launch, clean or killed,
    leaves them behind and they hold RAM until reboot. Peers only need the name while they map it
    during init; after a barrier every rank has, so the mapping outlives the name and the memory
    is freed when the processes exit, however they exit. Returns the paths unlinked.

    The barrier is taken on the accelerator, which is the same on every rank, never on whether
    this rank's file exists: a stale file on some ranks would put a barrier on those ranks only
    and pair it with whatever collective the others run next.
    """
    import deepspeed  # lazily: only DeepSpeed runs need it (DESIGN.md §4)
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    if get_accelerator().device_name() != "cpu":  # GPU backends: DeepSpeed made no segment
        return ()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    segment = Path("/dev/shm") / name
    dist.barrier()
    if not segment.exists():  # ranks on several hosts, or a build without the shm all-reduce
        return ()
    segment.unlink(missing_ok=True)
    return (segment,)


def set_expert_group_timeouts(timeout_s: int) -> int:
    """Give DeepSpeed's expert and expert-data-parallel groups `timeout_s`; returns how many.

    DeepSpeed 0.19.8 creates them with `dist.new_group(ranks)` and no timeout, and torch's
    `new_group(timeout=None)` does not inherit the default group's timeout: it takes the
    backend's constant (10 min for NCCL, 30 min for gloo), which would fire before a longer
    `--dist_timeout` watchdog. Call after the MoE layers have created the groups.
    """
    from deepspeed.utils import groups
    from torch.distributed.distributed_c10d import _set_pg_timeout

    timeout = timedelta(seconds=timeout_s)
    made = [*groups._get_expert_parallel_group_dict().values(),
            *groups._get_expert_data_parallel_group_dict().values()]
    unique = list({id(g): g for g in made}.values())
    for group in unique:
        _set_pg_timeout(timeout, group)
    return len(unique)


def shutdown_distributed() -> None:
    """Barrier, then destroy the process groups: the last call of a rank that succeeded.

    A process that exits with gloo groups still alive tears their worker threads down during
    interpreter finalization, which can abort it (SIGABRT, "terminate called without an active
    exception") after all its work is done, and the launcher reports the job as failed. The
    barrier keeps a fast rank from destroying the groups while a peer is still in a collective.
    Only for success: a rank that failed must not wait here for peers that will never come.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
