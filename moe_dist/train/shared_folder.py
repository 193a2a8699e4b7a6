"""Refuse a run folder that some rank cannot see, before any data is prepared.

Every rank writes its own checkpoint shards into `--output_dir` and rank 0 commits them (writes
`latest`), so on several nodes the folder must be on storage every node sees. On a node-local
path each node would train happily and then leave a checkpoint that no node can resume. So at
start each rank writes a marker holding a per-launch nonce (rank 0's, broadcast), and rank 0
must read every marker with that nonce; the nonce keeps a stale marker from an earlier launch
into the same folder from passing for a live rank.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from ..parallel.ds_config import ConfigError

MARKERS = ".ranks"
PATIENCE_S = 3.0  # how long rank 0 waits for a marker to show (network file systems can lag)


class UnsharedRunFolder(ConfigError):
    """`--output_dir` is not one folder for every rank."""


def check_run_folder_shared(run_dir: Path, engine) -> None:
    """Stop every rank unless rank 0 sees every rank's marker in `run_dir`.

    Rank 0 raises `UnsharedRunFolder` (one line, exit 2, through cli.main); the others exit 2 quietly.
    `engine` gives `rank`, `world_size`, `is_main`, `barrier()`, `broadcast_int()` and `close()`; every
    rank must call this, since it runs collectives.
    """
    if engine.world_size == 1:
        return
    nonce = engine.broadcast_int(secrets.randbits(62) if engine.is_main else 0)
    markers = Path(run_dir) / MARKERS
    markers.mkdir(parents=True, exist_ok=True)
    mine = markers / f"rank{engine.rank}"
    mine.write_text(str(nonce))
    engine.barrier()  # every marker is written (and closed) before rank 0 looks
    unseen = []
    if engine.is_main:
        unseen = _unseen(markers, engine.world_size, str(nonce))
    # Rank 0 tells every rank how many it missed, so all of them stop (or go on) together.
    missing = engine.broadcast_int(len(unseen))
    mine.unlink(missing_ok=True)
    if missing:
        # Every rank knows the verdict, so they can end the process group together: a rank that
        # exits with gloo's threads alive can abort during finalization (SIGABRT, exit -6 in the
        # launcher's report; seen in CI) instead of exiting 2.
        engine.close()
    if missing and engine.is_main:
        raise UnsharedRunFolder(
            f"--output_dir {run_dir} is not shared by every rank: rank 0 cannot see ranks "
            f"{unseen}; put it on storage every node sees"
        )
    if missing:
        # One line for the job, from rank 0; the others leave quietly with the same status, after
        # a moment so the launcher does not kill rank 0 before it has printed (as cli.main does).
        time.sleep(2)
        raise SystemExit(2)
    engine.barrier()  # every rank has removed its marker
    if engine.is_main:
        try:
            markers.rmdir()
        except OSError:
            pass


def _unseen(markers: Path, world_size: int, nonce: str) -> list[int]:
    """The ranks whose marker rank 0 cannot read; asked again for a moment first, since a network
    file system may show another node's new file a little late."""
    deadline = time.monotonic() + PATIENCE_S
    while True:
        unseen = [r for r in range(world_size) if _read(markers / f"rank{r}") != nonce]
        if not unseen or time.monotonic() > deadline:
            return unseen
        time.sleep(0.2)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
