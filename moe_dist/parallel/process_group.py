"""Process-group lifecycle: a free rendezvous port, start-up and clean shutdown.

Kept apart from the engines because tools and tests need the same three steps without an
engine (a launcher's `--master_port`, a bare `deepspeed.init_distributed` in a test script).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Mapping
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


class LauncherError(RuntimeError):
    """The deepspeed launcher cannot be found, or cannot be given the GPUs asked for; one line."""


def deepspeed_launcher(num_gpus: int, environ: Mapping[str, str] = os.environ) -> tuple[list[str], dict[str, str]]:
    """The `deepspeed` command for `num_gpus` local ranks on the GPUs that `environ` (the launch's
    environment) makes visible, and the variables it needs on top of `environ`.

    The launcher is the one beside this interpreter (a venv's bin/), else the one on PATH. Given
    `--num_gpus`, DeepSpeed's runner (0.19.8, runner.py `main`) drops CUDA_VISIBLE_DEVICES and takes
    GPUs 0..N-1, whatever the user chose; so when the variable names devices, the ranks go to its
    first `num_gpus` through `--include localhost:...` instead. The runner takes indices: GPU UUIDs are
    mapped to NVML's indices, which follow the PCI bus, so CUDA is told to order devices that way too.
    """
    here = Path(sys.executable).parent
    launcher = shutil.which("deepspeed", path=os.pathsep.join([str(here), environ.get("PATH", "")]))
    if launcher is None:
        raise LauncherError(
            f"no `deepspeed` launcher beside {sys.executable} or on PATH: pip install deepspeed in this environment"
        )
    visible = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        return [launcher, "--num_gpus", str(num_gpus)], {}
    if len(visible) < num_gpus:
        raise LauncherError(
            f"CUDA_VISIBLE_DEVICES={','.join(visible)} names {len(visible)} device(s), {num_gpus} needed"
        )
    chosen = visible[:num_gpus]
    if all(d.isdigit() for d in chosen):
        return [launcher, "--include", f"localhost:{','.join(chosen)}"], {}
    return [launcher, "--include", f"localhost:{','.join(map(str, _nvml_indices(chosen)))}"], {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID"
    }


def _nvml_indices(uuids: list[str]) -> list[int]:
    """NVML's index of each GPU UUID in CUDA_VISIBLE_DEVICES (NVML ignores that variable)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByUUID(u)) for u in uuids]
    except Exception as e:  # no NVML, a MIG instance, an unknown UUID: all end the same way
        raise LauncherError(
            f"CUDA_VISIBLE_DEVICES={','.join(uuids)}: cannot map these to the GPU indices the "
            f"deepspeed launcher takes ({type(e).__name__}: {e}); set it to indices instead"
        ) from None


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
    import deepspeed  # lazily: only DeepSpeed runs need it (docs/design.md#code-conventions)
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    if get_accelerator().device_name() != "cpu":  # GPU backends: DeepSpeed made no segment
        return ()
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
        f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}"
    )
    segment = Path("/dev/shm") / name
    dist.barrier()
    if not segment.exists():  # ranks on several hosts, or a build without the shm all-reduce
        return ()
    segment.unlink(missing_ok=True)
    return (segment,)


def set_group_timeouts(timeout_s: int) -> int:
    """Give every process group this rank belongs to `timeout_s`; returns how many.

    DeepSpeed 0.19.8 creates groups with `dist.new_group(ranks)` and no timeout: the expert and
    expert-data-parallel groups when its MoE layers are built, and inside `deepspeed.initialize`
    its copy of the world group that ZeRO reduces and gathers the non-expert weights over
    (`groups._get_data_parallel_group`). torch's `new_group(timeout=None)` does not inherit the
    default group's timeout: it takes the backend's constant (10 min for NCCL, 30 min for gloo),
    which would fire before a longer `--dist_timeout` watchdog and end the job unnamed. Call
    after `deepspeed.initialize`, once every group exists; it covers the ones made since.
    """
    from torch.distributed.distributed_c10d import _rank_not_in_group, _set_pg_timeout, _world

    timeout = timedelta(seconds=timeout_s)
    groups = [g for g in list(_world.pg_map) if not _rank_not_in_group(g)]
    for group in groups:
        _set_pg_timeout(timeout, group)
    return len(groups)


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


def release_distributed() -> None:
    """Destroy the process groups without a barrier: the last call of a rank that stops on an error
    raised on purpose (between collectives, so no work of its own is pending in them).

    Without it the gloo threads can abort the exiting process (see shutdown_distributed), and the
    launcher reports -6 instead of the exit status the error line promised. A peer still waiting
    in a collective gets a closed connection, as it would when this process exits.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
