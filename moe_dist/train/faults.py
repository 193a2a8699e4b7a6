"""Fault injection for tests: one environment variable, turned into a hook on the run's events.

    MOE_DIST_FAULT="<action>@<event>:<n>[:<rank>]"     e.g. "exit@after_step:12", "raise@before_step:5:1"

Actions: `exit` (os._exit, as a crash), `kill` (SIGKILL this process), `raise` (an exception
in the loop), `hang` (sleep forever, as a stuck rank), `nan_batch` (NaN into the next
forward's embeddings), `nan_expert` (NaN into an expert weight, for good). Events and their
`n` are those of `hooks.EVENTS`; without a rank, every rank acts.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch

from .hooks import EVENTS, Event, Hook


class InjectedFault(RuntimeError):
    pass


def hooks_from_env() -> list[Hook]:
    """The hook that MOE_DIST_FAULT asks for, or none."""
    spec = os.environ.get("MOE_DIST_FAULT")
    if not spec:
        return []
    action, _, where = spec.partition("@")
    event, n, *rank = where.split(":")
    if action not in _ACTIONS:
        raise ValueError(f"MOE_DIST_FAULT={spec!r}: action must be one of {', '.join(_ACTIONS)}")
    if event not in EVENTS:
        raise ValueError(f"MOE_DIST_FAULT={spec!r}: event must be one of {', '.join(EVENTS)}")
    return [Fault(action, event, int(n), int(rank[0]) if rank else None)]


@dataclass(frozen=True)
class Fault:
    action: str
    event: str
    n: int
    rank: int | None  # None: every rank

    def __call__(self, event: Event) -> None:
        if (event.name, event.n) == (self.event, self.n) and self.rank in (None, event.rank):
            _ACTIONS[self.action](event)


def _exit(event: Event) -> None:
    os._exit(17)


def _kill(event: Event) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _raise(event: Event) -> None:
    raise InjectedFault(f"injected fault at {event.name}, step {event.n}, rank {event.rank}")


def _hang(event: Event) -> None:
    while True:  # a rank that never reaches the next collective
        time.sleep(3600)


def _poison_next_forward(event: Event) -> None:
    def hook(module, args, output):
        handle.remove()
        output = output.clone()
        output[0, 0, 0] = float("nan")
        return output

    handle = event.model.get_input_embeddings().register_forward_hook(hook)


@torch.no_grad()
def _poison_an_expert(event: Event) -> None:
    from ..model.moe import MoEBlock

    block = next(m for m in event.model.modules() if isinstance(m, MoEBlock))
    next(block.experts.parameters()).fill_(float("nan"))


_ACTIONS = {
    "exit": _exit,
    "kill": _kill,
    "raise": _raise,
    "hang": _hang,
    "nan_batch": _poison_next_forward,
    "nan_expert": _poison_an_expert,
}
