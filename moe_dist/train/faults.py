"""Fault injection for tests: one environment variable, read once, checked at named points.

    MOE_DIST_FAULT="<action>@<point>:<n>[:<rank>]"     e.g. "exit@after_step:12", "raise@before_step:5:1"

Actions: `exit` (os._exit, as a crash), `kill` (SIGKILL this process), `raise` (an exception
in the loop), `hang` (sleep forever, as a stuck rank), `nan_batch` (NaN into the next
forward's embeddings), `nan_expert` (NaN into an expert weight, for good). Points are where
the trainer calls `fault_point`; `n` is the step, except at `save_file`, where it counts the
files DeepSpeed has written in the current save. With no variable set, a call is one comparison.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from functools import cache

import torch


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class _Fault:
    action: str
    point: str
    step: int
    rank: int | None


@cache
def _configured() -> _Fault | None:
    spec = os.environ.get("MOE_DIST_FAULT")
    if not spec:
        return None
    action, _, where = spec.partition("@")
    point, step, *rank = where.split(":")
    if action not in _ACTIONS:
        raise ValueError(f"MOE_DIST_FAULT={spec!r}: action must be one of {', '.join(_ACTIONS)}")
    return _Fault(action, point, int(step), int(rank[0]) if rank else None)


_ACTIONS = ("exit", "kill", "raise", "hang", "nan_batch", "nan_expert")


def fault_point(point: str, step: int, rank: int, model=None) -> None:
    fault = _configured()
    if fault is None or fault.point != point or fault.step != step or fault.rank not in (None, rank):
        return
    if fault.action == "exit":
        os._exit(17)
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.action == "raise":
        raise InjectedFault(f"injected fault at {point}, step {step}, rank {rank}")
    if fault.action == "nan_batch":
        _poison_next_forward(model)
    elif fault.action == "nan_expert":
        _poison_an_expert(model)
    else:  # "hang": a rank that never reaches the next collective
        while True:
            time.sleep(3600)


def _poison_next_forward(model) -> None:
    def hook(module, args, output):
        handle.remove()
        output = output.clone()
        output[0, 0, 0] = float("nan")
        return output

    handle = model.get_input_embeddings().register_forward_hook(hook)


@torch.no_grad()
def _poison_an_expert(model) -> None:
    from ..model.moe import MoEBlock

    block = next(m for m in model.modules() if isinstance(m, MoEBlock))
    next(block.experts.parameters()).fill_(float("nan"))


def count_saved_files(checkpoint_engine, rank: int) -> None:
    """Make DeepSpeed's per-file writer pass through `fault_point("save_file", n, rank)` after its
    n-th file of each save, so a test can kill a rank between two expert files."""
    if _configured() is None or _configured().point != "save_file":
        return
    write, counter = checkpoint_engine.save, [0]

    def save(state_dict, path):
        write(state_dict, path)
        counter[0] += 1
        fault_point("save_file", counter[0], rank)

    checkpoint_engine.save = save
    checkpoint_engine.reset_file_count = lambda: counter.__setitem__(0, 0)
