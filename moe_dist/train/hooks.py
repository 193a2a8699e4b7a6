"""Named events of a training run, and the hooks that listen to them (fault injection, mostly).

The loop fires, per step, `before_step` (before the step's heartbeat, so a rank stuck there
still reports the previous step) and `after_step`; per save, `save_begin` (the staging folder
exists, nothing is written yet), `save_file` (DeepSpeed has just written its n-th file of this
save) and `before_commit` (every shard is written and sealed, nothing is published yet). `n` is
the step, except at `save_file`. With no hook, firing an event costs one check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

EVENTS = ("before_step", "after_step", "save_begin", "save_file", "before_commit")


@dataclass(frozen=True)
class Event:
    name: str  # one of EVENTS
    n: int  # the step; at save_file, the files written so far in this save
    rank: int
    model: nn.Module  # the bare model, for hooks that poison it


Hook = Callable[[Event], None]


class Hooks:
    """The hook list of one run: every hook sees every event, in the order they were given."""

    def __init__(self, hooks: Iterable[Hook], *, rank: int, model: nn.Module):
        self.hooks, self.rank, self.model = list(hooks), rank, model
        self.files_saved = 0

    def fire(self, name: str, n: int) -> None:
        if name == "save_begin":
            self.files_saved = 0
        if not self.hooks:
            return
        event = Event(name, n, self.rank, self.model)
        for hook in self.hooks:
            hook(event)

    def watch_saved_files(self, checkpoint_engine) -> None:
        """Fire `save_file` after each file that DeepSpeed's checkpoint engine writes.

        DeepSpeed writes a checkpoint file by file (one per expert and rank), so this is how a
        test kills a rank between two expert files. Without hooks the writer is left alone.
        """
        if not self.hooks or checkpoint_engine is None:
            return
        write = checkpoint_engine.save

        def save(state_dict, path):
            write(state_dict, path)
            self.files_saved += 1
            self.fire("save_file", self.files_saved)

        checkpoint_engine.save = save
