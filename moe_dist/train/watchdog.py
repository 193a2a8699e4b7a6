"""End the job when training stops making progress, instead of hanging forever.

A stuck rank leaves its peers blocked inside a collective. DeepSpeed builds the expert
groups with `new_group` and no timeout (torch's backend default, not the default group's), so
the engines set every group's timeout to `--dist_timeout` plus a margin
(`process_group.collective_timeout_s`): a collective error would not name the stuck rank, this
thread does, so it must come first. Every rank therefore runs this thread: the loop calls
`beat(step)` as it goes, and after `timeout_s` without a beat the watchdog prints which
rank went quiet first (from the per-rank heartbeat files), dumps the stacks, and exits.
The launcher then ends the other ranks.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

EXIT_STUCK = 3


class Watchdog:
    def __init__(self, timeout_s: float, heartbeat_dir: Path, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self.dir = Path(heartbeat_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.step, self.phase, self.last = 0, "start", time.monotonic()
        threading.Thread(target=self._watch, name="moe-dist-watchdog", daemon=True).start()

    def beat(self, step: int, phase: str = "train") -> None:
        self.step, self.phase, self.last = step, phase, time.monotonic()
        # Wall-clock time in the file: other ranks compare it with theirs.
        (self.dir / f"rank{self.rank:05d}").write_text(f"{step} {phase} {time.time():.3f}\n")

    def _watch(self) -> None:
        while True:
            time.sleep(min(5.0, self.timeout_s / 4))
            quiet = time.monotonic() - self.last
            if quiet > self.timeout_s:
                self._give_up(quiet)

    def _give_up(self, quiet: float) -> None:
        print(f"error: rank {self.rank} made no progress for {quiet:.0f} s (--dist_timeout {self.timeout_s:.0f}) "
              f"at step {self.step} ({self.phase}); {self._stalest()}; ending the job", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(EXIT_STUCK)

    def _stalest(self) -> str:
        beats = []
        for path in self.dir.glob("rank*"):
            try:
                step, phase, stamp = path.read_text().split()
                beats.append((float(stamp), int(path.name[4:]), int(step), phase))
            except (OSError, ValueError):
                continue
        if not beats:
            return "no rank has reported yet"
        # The rank furthest behind is the culprit; peers blocked in a collective with it got further.
        step, stamp, rank, phase = min((step, stamp, rank, phase) for stamp, rank, step, phase in beats)
        return f"the rank furthest behind is rank {rank}, last seen at step {step} ({phase}) {time.time() - stamp:.0f} s ago"
