"""Fault injection for tests: one environment variable, read once, checked at named points.

    MOE_DIST_FAULT="<action>@<point>:<step>[:<rank>]"     e.g. "exit@after_step:12", "raise@after_step:5:1"

Actions: `exit` (os._exit, as a crash), `kill` (SIGKILL this process), `raise` (an exception
in the loop), `hang` (sleep forever inside the step, as a stuck rank). Points are the
places the trainer calls `fault_point`; with no variable set each call is one comparison.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from functools import cache


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
    if action not in ("exit", "kill", "raise", "hang"):
        raise ValueError(f"MOE_DIST_FAULT={spec!r}: action must be exit, kill, raise or hang")
    return _Fault(action, point, int(step), int(rank[0]) if rank else None)


def fault_point(point: str, step: int, rank: int) -> None:
    fault = _configured()
    if fault is None or fault.point != point or fault.step != step or fault.rank not in (None, rank):
        return
    if fault.action == "exit":
        os._exit(17)
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.action == "raise":
        raise InjectedFault(f"injected fault at {point}, step {step}, rank {rank}")
    while True:  # "hang": a rank that never reaches the next collective
        time.sleep(3600)
