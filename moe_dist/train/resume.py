"""Continue a run from its newest intact checkpoint, as it was saved or resharded onto a new layout.

A layout is (engine, EP size, world size) and the ETP size the experts were sliced at (recorded
in the checkpoint's expert_slices.json; 1 when absent). At the layout that saved it, the engine
loads its own checkpoint and every rank its own random streams. At another, the weights and (where
they can be) the Adam moments go through the portable state of `parallel.portable`, which joins
expert slices back into whole experts, and the engine cuts them again when this run slices them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint.formats import read_expert_slices
from ..model.configuration import MoEConfig
from ..model.modeling import MoEForCausalLM
from ..parallel.engines import TrainEngine
from ..parallel.portable import read_state
from .checkpoint import CheckpointError, CheckpointStore, load_rank_state, restore_rng, step_of
from .state import ReportTotals, TrainerState, read_trainer_state

log = logging.getLogger("moe_dist")


def layout(engine: TrainEngine, ep_size: int) -> tuple[str, int, int]:
    return engine.kind, ep_size, engine.world_size


def find_checkpoint(engine: TrainEngine, store: CheckpointStore) -> Path | None:
    """The newest intact checkpoint, or None before the first save.

    Rank 0 checks the files; every rank gets its choice.
    """
    choice = -1  # -1: nothing saved yet; -2: only broken checkpoints
    if engine.is_main:
        store.remove_partials()
        good = store.candidates()
        choice = step_of(good[0]) if good else (-2 if store.complete() else -1)
    choice = engine.broadcast_int(choice)
    if choice == -2:
        raise CheckpointError(
            f"no intact checkpoint in {store.root} (see the warnings above); move it away to start fresh"
        )
    return None if choice == -1 else store.root / f"step{choice:08d}"


def load_checkpoint(
    path: Path,
    engine: TrainEngine,
    *,
    ep_size: int,
    config: MoEConfig,
    allow_optimizer_reset: bool,
    trainable: Callable[[MoEForCausalLM], MoEForCausalLM],
) -> tuple[TrainerState, ReportTotals]:
    """Restore the engine (and this rank's RNG) from `path`; returns the loop's state and report totals.

    `trainable` sets which of a model's weights train (LoRA, a frozen router), as the run's model has it: the
    saved optimizer state holds those alone."""
    state, totals = read_trainer_state(path)
    saved_etp = (read_expert_slices(path) or {}).get("etp_size", 1)
    if (state.engine, state.ep_size, state.world_size, saved_etp) == (*layout(engine, ep_size), engine.spec.etp_size):
        engine.load(path)
        restore_rng(load_rank_state(path, engine.rank)["rng"])
    else:
        _reshard(
            path,
            state,
            engine,
            ep_size=ep_size,
            saved_etp=saved_etp,
            config=config,
            allow_optimizer_reset=allow_optimizer_reset,
            trainable=trainable,
        )
    return state, totals


def _reshard(
    path: Path,
    saved: TrainerState,
    engine: TrainEngine,
    *,
    ep_size: int,
    saved_etp: int,
    config: MoEConfig,
    allow_optimizer_reset: bool,
    trainable: Callable[[MoEForCausalLM], MoEForCausalLM],
) -> None:
    """Load a checkpoint written by another engine, EP size, ETP size or world size, through the portable state."""
    with torch.device("meta"):
        model = trainable(MoEForCausalLM(config))
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    state = read_state(
        path, engine=saved.engine, ep_size=saved.ep_size, num_experts=config.num_local_experts, shapes=shapes
    )
    if state.exp_avg is None and not allow_optimizer_reset:
        raise CheckpointError(
            f"cannot carry the optimizer state of {path} over to this layout "
            f"({state.why_no_moments}); add --allow_optimizer_reset to continue with exact "
            f"weights and a fresh optimizer"
        )
    engine.load_portable(state)
    engine.restore_schedule(saved.scheduler_steps)
    if saved.world_size > engine.rank:  # this rank existed before: keep its random streams
        restore_rng(load_rank_state(path, engine.rank)["rng"])
    kind, _, world = layout(engine, ep_size)
    log.info(
        "resharded %s from %s EP=%d%s on %d rank(s) to %s EP=%d%s on %d rank(s); optimizer %s",
        path.name,
        saved.engine,
        saved.ep_size,
        _etp(saved_etp),
        saved.world_size,
        kind,
        ep_size,
        _etp(engine.spec.etp_size),
        world,
        "state carried over" if state.exp_avg is not None else "reset (--allow_optimizer_reset)",
    )


def _etp(etp_size: int) -> str:
    return f" x ETP={etp_size}" if etp_size > 1 else ""
