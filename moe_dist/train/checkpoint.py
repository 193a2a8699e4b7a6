"""Atomic, verifiable checkpoints that every engine writes into.

A save goes to `checkpoints/stepNNNNNNNN.partial/`. Only after every rank has written its
shards (a barrier) does rank 0 fsync them and list them with size and CRC32 in
`MANIFEST.json` (`seal`), then rename the folder to `stepNNNNNNNN/` and point `latest` at
it (`publish`). DeepSpeed's own save writes `latest` with a plain write and no barrier, so
a rank killed mid-save could leave `latest` naming a checkpoint without its expert files.

Resume takes the newest checkpoint whose files all match their manifest, and says which;
a truncated or corrupted file is named and the previous checkpoint is used instead.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..atomic_io import fsync_dir, write_atomic

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_PARTIAL = ".partial"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step"))


class CheckpointStore:
    def __init__(self, root: str | Path, *, is_main: bool, barrier: Callable[[], None]):
        self.root = Path(root)
        self.is_main = is_main
        self.barrier = barrier

    # ---- saving ---------------------------------------------------------------------------

    def begin(self, step: int) -> Path:
        """A fresh staging folder for this step, visible to every rank on return."""
        staging = self.root / f"step{step:08d}{_PARTIAL}"
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.barrier()
        return staging

    def seal(self, staging: Path) -> None:
        """Once every rank has written into `staging`: fsync everything and write the manifest."""
        self.barrier()
        if self.is_main:
            manifest = {}
            for path in sorted(p for p in staging.rglob("*") if p.is_file()):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                manifest[str(path.relative_to(staging))] = {"bytes": path.stat().st_size, "crc32": _crc32(path)}
            data = json.dumps(manifest, indent=1).encode()
            write_atomic(staging / MANIFEST, lambda f: f.write(data))

    def publish(self, staging: Path, *, best: bool, keep_last: int) -> Path:
        """Make a sealed save visible: rename it into place, then point `latest` (and `best`) at it."""
        final = staging.with_name(staging.name.removesuffix(_PARTIAL))
        if self.is_main:
            if final.exists():  # re-saving a step after a resume: the new save replaces it
                shutil.rmtree(final)
            os.replace(staging, final)
            fsync_dir(self.root)
            name = final.name.encode()
            write_atomic(self.root / "latest", lambda f: f.write(name))
            if best:
                write_atomic(self.root / "best", lambda f: f.write(name))
            self._prune(keep_last)
        self.barrier()
        return final

    def _prune(self, keep_last: int) -> None:
        """Keep the newest `keep_last` complete checkpoints and the best; never the only good one."""
        complete = self.complete()
        keep = set(complete[-keep_last:]) | {self.pointer("best")}
        for path in complete:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # ---- finding and checking -------------------------------------------------------------

    def pointer(self, name: str) -> Path | None:
        try:
            return self.root / (self.root / name).read_text().strip()
        except FileNotFoundError:
            return None

    def complete(self) -> list[Path]:
        """Committed checkpoints, oldest first (unverified)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step*") if p.is_dir() and not p.name.endswith(_PARTIAL)]
        return sorted(found, key=step_of)

    def candidates(self) -> list[Path]:
        """Checkpoints to try on resume, newest first; corrupt ones are reported and skipped."""
        good = []
        for path in reversed(self.complete()):
            try:
                verify(path)
                good.append(path)
            except CheckpointError as e:
                log.warning("%s; falling back to an older checkpoint", e)
        return good

    def remove_partials(self) -> None:
        """Leftovers of a save that was killed: never trusted, so remove them (rank 0, at start)."""
        for path in self.root.glob(f"step*{_PARTIAL}"):
            shutil.rmtree(path, ignore_errors=True)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify(path: Path) -> None:
    """Every file of the manifest is there with its size and CRC32, or CheckpointError names it."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint {path} has no readable {MANIFEST}") from None
    for rel, expected in manifest.items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint file {file} is truncated ({file.stat().st_size} bytes, "
                f"the manifest says {expected['bytes']})"
            )
        if _crc32(file) != expected["crc32"]:
            raise CheckpointError(f"checkpoint file {file} is corrupted (CRC32 differs from the manifest)")


# ---- per-rank state that no engine saves for us ------------------------------------------


def capture_rng() -> dict:
    """Every RNG this process draws from. DeepSpeed saves none, and the MoE path writes its
    client state from rank 0 only; without the torch RNG, routing noise diverges on resume."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # Only this rank's own device: a list of every visible device cannot be restored
        # when the job resumes with fewer devices visible per process.
        device = torch.cuda.current_device()
        state["cuda_device"] = {"index": device, "state": torch.cuda.get_rng_state(device)}
    return state


def cuda_rng_for_device(state: dict, device: int) -> torch.Tensor | None:
    """The CUDA RNG state saved for this rank, to restore on its `device`, or None.

    New checkpoints hold the rank's own device (`cuda_device`), restored on whatever device
    the rank has now. Older ones hold `get_rng_state_all()` (`cuda`), whose entry for the
    rank's device is used when that device index was saved.
    """
    if "cuda_device" in state:
        return state["cuda_device"]["state"]
    saved = state.get("cuda")
    if saved is not None and 0 <= device < len(saved):
        return saved[device]
    return None


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        cuda_state = cuda_rng_for_device(state, device)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


def save_rank_state(staging: Path, rank: int, state: dict) -> None:
    path = staging / "ranks" / f"rank{rank:05d}.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save(state, path)


def load_rank_state(path: Path, rank: int) -> dict:
    file = path / "ranks" / f"rank{rank:05d}.pt"
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no state for rank {rank} ({file}); it was saved with fewer ranks")
    try:
        return torch.load(file, weights_only=True)
    except Exception as e:  # a corrupt pickle raises many different types
        raise CheckpointError(f"checkpoint file {file} cannot be read ({type(e).__name__}: {e})") from None
