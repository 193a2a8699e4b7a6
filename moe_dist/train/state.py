"""`trainer_state.json`: what a checkpoint holds besides the engine's files (written by rank 0).

Two records, kept apart in code and written as one flat JSON object, so the checkpoints written
before they were separated load as they are: `TrainerState`, what the loop needs to continue
exactly where it stopped, and `ReportTotals`, the numbers the summary reports so far.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where the loop stands: step, early-stopping record, data position and the layout that saved it."""

    step: int = 0
    best_val_loss: float = math.inf
    best_step: int = -1
    evals_without_improvement: int = 0
    bad_in_a_row: int = 0
    scheduler_steps: int = 0  # optimizer steps taken (skipped ones hold the lr schedule)
    engine: str = ""  # the layout that wrote the checkpoint: a different one means resharding
    ep_size: int = 0
    world_size: int = 0
    sampler: dict = field(default_factory=dict)
    collapse: dict = field(default_factory=dict)


@dataclass
class ReportTotals:
    """The run's numbers so far, for `summary.json`; carried across resumes."""

    last_val: dict = field(default_factory=dict)
    max_tok_s: float = 0.0
    peak_mem_mb: float = 0.0  # the largest rank's; torch's allocator peak on GPU, peak RSS on CPU
    peak_mem_mb_per_rank: list = field(default_factory=list)
    nvml_used_mb_per_rank: list = field(default_factory=list)  # whole-GPU use seen by NVML, max over logs
    skipped_steps: int = 0


def write_trainer_state(folder: Path, state: TrainerState, totals: ReportTotals) -> None:
    (folder / TRAINER_STATE).write_text(json.dumps({**asdict(state), **asdict(totals)}, indent=1))


def read_trainer_state(folder: Path) -> tuple[TrainerState, ReportTotals]:
    saved = json.loads((folder / TRAINER_STATE).read_text())
    return _pick(TrainerState, saved), _pick(ReportTotals, saved)


def _pick(cls, saved: dict):
    return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})
