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
    """`beat` only notes the step in memory; this thread writes it to the rank's heartbeat file at
    most once per `write_every_s` (a file write per step would be an RPC per rank per step on NFS or
    Lustre), and reads the files only when it gives up. The thread runs while the main thread is
    blocked in a collective, so a rank's file always shows its latest beat within a second."""

    def __init__(self, timeout_s: float, heartbeat_dir: Path, rank: int, *, write_every_s: float = 1.0):
        self.timeout_s, self.rank, self.write_every_s = timeout_s, rank, write_every_s
        self.dir = Path(heartbeat_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.step, self.phase, self.last, self.wall = 0, "start", time.monotonic(), time.time()
        self.written: tuple | None = None  # the (step, phase, wall) the file holds
        self.writes = 0
        threading.Thread(target=self._watch, name="moe-dist-watchdog", daemon=True).start()

    def beat(self, step: int, phase: str = "train") -> None:
        # Wall-clock time goes into the file: other ranks compare it with theirs.
        self.step, self.phase, self.last, self.wall = step, phase, time.monotonic(), time.time()

    def _watch(self) -> None:
        poll = min(self.write_every_s, self.timeout_s / 4)
        while True:
            time.sleep(poll)
            self._write()
            quiet = time.monotonic() - self.last
            if quiet > self.timeout_s:
                self._give_up(quiet)

    def _write(self) -> None:
        beat = (self.step, self.phase, self.wall)
        if beat != self.written:
            (self.dir / f"rank{self.rank:05d}").write_text(f"{beat[0]} {beat[1]} {beat[2]:.3f}\n")
            self.written, self.writes = beat, self.writes + 1

    def _give_up(self, quiet: float) -> None:
        self._write()  # this rank's last beat, for the line below and for the other ranks
        print(
            f"error: rank {self.rank} made no progress for {quiet:.0f} s (--dist_timeout {self.timeout_s:.0f}) "
            f"at step {self.step} ({self.phase}); {self._stalest()}; ending the job",
            file=sys.stderr,
            flush=True,
        )
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
        ago = time.time() - stamp
        return f"the rank furthest behind is rank {rank}, last seen at step {step} ({phase}) {ago:.0f} s ago"
