"""Replace a file or a folder so that a reader sees the old one or the new one, never half of either.

A run killed mid-write must not leave a torn file that a later run trusts: checkpoint pointers and
manifests, `summary.json`, `metrics.jsonl` after a resume, token caches, the saved tokenizer, an
export. Everything is written beside its target as `NAME.tmp-PID` and renamed into place.

Standard library only, so the trainer, the data pipeline and the exporter can all use it without
importing each other. The model files an export ships must not import it (they import nothing else
from `moe_dist`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, write_fn: Callable[[BinaryIO], object]) -> None:
    """Write `path` through `write_fn(binary_file)`; the old file stays until the new one is durable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the rename makes them visible
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # and the rename itself survives a power loss


def write_dir_atomic(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> None:
    """Fill a fresh folder through `write_fn(folder)`, then swap it in for `path`.

    For writers that produce a folder (`save_pretrained`). The swap is one atomic exchange of the
    two folders (Linux `renameat2(RENAME_EXCHANGE)`), so a reader, or a process killed at any
    instant, sees the old folder whole or the new one whole. Where the system cannot exchange, the
    old folder is renamed aside first and removed after: a kill between the two renames leaves it
    whole as `NAME.old-PID`. Callers decide whether `path` may be replaced (`output_guard`).
    """
    path = Path(path)
    tmp = _tmp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of this pid's earlier, killed attempt
    try:
        write_fn(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        os.replace(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp)  # now the old folder
    else:
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the C library or file system cannot."""
    rename_exchange, at_fdcwd = 2, -100  # <linux/fs.h>, <fcntl.h>
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of folder `path` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    # Beside the target (a rename never crosses file systems), and per process, so two writers
    # never share a temporary file.
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")
