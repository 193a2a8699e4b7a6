"""Entry point shared by `launch/train.py` and the `moe-dist-train` console script.

Bad input (ConfigError, DataError, an invalid MoEConfig, an impossible EP layout) ends the
run with one line on stderr and exit status 2, before any process group or model exists
where the mistake can be seen that early.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

from ..export import ExportError
from ..output_guard import OutputRefused
from ..parallel.ds_config import ConfigError
from ..parallel.expert_parallel import ExpertParallelError
from ..parallel.process_group import release_distributed
from .args import parse_args
from .checkpoint import CheckpointError
from .data import DataError
from .settings import table

# Errors we raise on purpose with a one-line message. While planning, a bare ValueError is
# an invalid MoEConfig field; once training runs, a ValueError is a bug and keeps its traceback.
RUN_ERRORS = (ConfigError, DataError, ExpertParallelError, CheckpointError, ExportError, OutputRefused)
PLAN_ERRORS = (*RUN_ERRORS, ValueError)  # what planning refuses with one line
# Third-party messages a user can do nothing about, each named; every other warning still shows.
KNOWN_WARNINGS = (
    # DeepSpeed 0.19's ZeRO-2 gathers call the old torch name (deprecated in torch 2.13): printed by
    # every rank, again after each eval.
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
)
KNOWN_LOG_LINES = (
    # GuardedAdamW is torch's AdamW plus an agreed skip; the engine vouches for it on purpose.
    ("DeepSpeed", "ZeRO with an untested optimizer"),
)


def main(argv: list[str] | None = None) -> int:
    from .plan import plan_run
    from .trainer import TrainingHalted, run

    quiet_known_warnings()
    rank = int(os.environ.get("RANK", "0"))
    try:
        plan = plan_run(*parse_args(argv))
    except PLAN_ERRORS as e:
        # Every rank sees the same mistake in the command line: rank 0 reports it, and the
        # others wait a moment so the launcher does not kill rank 0 before it has printed.
        if rank == 0:
            _error_line(f"error: {e}")
        else:
            time.sleep(2)
        return 2
    if rank == 0:  # before data preparation, so a wrong setting shows before the slow part
        print(table(plan.settings), flush=True)
    try:
        run(plan)
    except RUN_ERRORS as e:
        _error_line(f"error{f' (rank {rank})' if rank else ''}: {e}")
        release_distributed()
        return 2
    except TrainingHalted as e:
        _error_line(f"error{f' (rank {rank})' if rank else ''}: {e}")
        release_distributed()
        return 3
    return 0


def quiet_known_warnings() -> None:
    """Hide exactly the messages in KNOWN_WARNINGS and KNOWN_LOG_LINES."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for logger, text in KNOWN_LOG_LINES:
        logging.getLogger(logger).addFilter(lambda record, text=text: text not in record.getMessage())


def _error_line(text: str) -> None:
    # One write per line: the launcher merges every rank's stderr into one pipe, and print()'s
    # separate write of the newline let another rank's line land in the middle of ours.
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
