"""A rank that raises, or hangs, ends the whole job promptly with a message naming it.

The times are printed (pytest -s) for the closing note; the bounds asserted are the
contract (60 s after a crash; the timeout plus the watchdog's poll after a hang), not goals.
"""

import re
import time
from datetime import datetime

import pytest
from launcher import EP2_ARGS, TRAIN, deepspeed, leftover_shm

from moe_dist.train.checkpoint import CheckpointStore, verify

pytestmark = [pytest.mark.faults, pytest.mark.multirank]

ARGS = [*EP2_ARGS, "--save_every", "4"]


def log_time(pattern: str, text: str) -> float:
    """Wall-clock time (today) of the first log line matching `pattern`."""
    hhmmss = re.search(r"(\d\d:\d\d:\d\d) \w+ " + pattern, text).group(1)
    clock = datetime.combine(datetime.now().date(), datetime.strptime(hhmmss, "%H:%M:%S").time())
    return clock.timestamp()


def test_an_exception_on_rank_1_ends_the_job_and_names_rank_and_step(tmp_path):
    run = tmp_path / "run"
    proc = deepspeed(TRAIN, [*ARGS, "--output_dir", str(run)], env={"MOE_DIST_FAULT": "raise@before_step:6:1"})
    ended = time.time()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 1 failed at step 6: InjectedFault" in out
    crash_to_exit = ended - log_time("rank 1 failed at step 6", out)
    print(f"\ncrash on rank 1 -> job exit: {crash_to_exit:.1f} s (1 s log resolution)")
    assert crash_to_exit < 60
    # A crashed job leaves no shared memory behind: the segments were unlinked right after init.
    assert "unlinked /dev/shm/deepspeed_allreduce_buffer_" in out
    assert leftover_shm(proc) == []
    # The last complete checkpoint (step 4) is intact and is what a relaunch would take.
    store = CheckpointStore(run / "checkpoints", is_main=True, barrier=lambda: None)
    assert store.candidates()[0].name == "step00000004"
    verify(store.candidates()[0])


def test_a_stuck_rank_ends_the_job_after_dist_timeout_and_is_named(tmp_path):
    timeout = 10
    run = tmp_path / "run"
    proc = deepspeed(
        TRAIN,
        [*ARGS, "--dist_timeout", str(timeout), "--output_dir", str(run)],
        env={"MOE_DIST_FAULT": "hang@before_step:6:1"},
        timeout=240,
    )
    ended = time.time()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # Either watchdog may fire first: the stuck rank's own (its last beat was step 5) or its
    # peer's, blocked in the step-6 all-to-all. The one that fires ends the job; both name rank 1.
    assert re.search(rf"rank [01] made no progress for \d+ s \(--dist_timeout {timeout}\) at step [56]", out), out[
        -3000:
    ]
    assert "the rank furthest behind is rank 1, last seen at step 5" in out
    stuck_to_exit = ended - log_time(r"step 5/24", out)
    print(f"\nrank 1 stuck at step 6 -> job exit: {stuck_to_exit:.1f} s with --dist_timeout {timeout}")
    assert timeout <= stuck_to_exit < timeout + 30
    assert leftover_shm(proc) == []
    assert (
        CheckpointStore(run / "checkpoints", is_main=True, barrier=lambda: None).candidates()[0].name == "step00000004"
    )
