"""Never remove or replace a file or folder that moe-dist did not write.

Every folder a command writes into carries a record, `.moe-dist.json`, of the top-level names
moe-dist wrote there and the kind of output each one is (`{"outputs": {"summary.json": "train"}}`);
a folder written whole (an export) also records each file's size and sha256 (`"files"`).
Two ways to write a folder, and one rule for both:

- **add** (`check` / `record` / `claim`): put our names beside whatever is there. Allowed when no
  name we write is already taken by an entry we did not write (training into a folder that holds
  the user's notes is fine; a `summary.json` of someone else's is not).
- **replace** (`replace_dir`): swap the whole folder for a new one (an export). Allowed when the
  folder is missing, empty, or its record lists every entry in it as this kind's output and every
  file it fingerprinted still has its recorded size and sha256. With no record, only when the
  command's `unproven(folder)` finds no entry that its output from before records cannot account for.

Anything else is refused with `OutputRefused`, whose message is the one line the user sees,
before the command does any work; so is a folder that cannot be written (read-only, permission
denied, under a file). In add mode, outputs written before the record existed are recognised by
a `legacy(folder)` predicate of the command's own (a run's `run.json`).

Standard library only, like `atomic_io`: the trainer, the exporter and the tools all use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from collections.abc import Callable, Iterable
from pathlib import Path

from .atomic_io import write_atomic, write_dir_atomic

RECORD = ".moe-dist.json"
Legacy = Callable[[Path], bool]
Unproven = Callable[[Path], list[str]]


class OutputRefused(Exception):
    """Writing there would lose something the user has; the message names the folder and what is in it."""


def owned(folder: str | os.PathLike) -> dict[str, str]:
    """The names in `folder` that moe-dist wrote, with their kind ({} when there is no record)."""
    try:
        return {str(k): str(v) for k, v in _read_record(folder)["outputs"].items()}
    except (KeyError, TypeError, AttributeError):
        return {}


def fingerprints(folder: str | os.PathLike) -> dict[str, dict]:
    """The size and sha256 the record holds for each file of a folder written whole ({} in older records)."""
    files = _read_record(folder).get("files")
    return {str(k): v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def check(
    folder: str | os.PathLike, kind: str, names: Iterable[str], *, legacy: Legacy | None = None, what: str = ""
) -> None:
    """Refuse (before any work) to write `names` into `folder` if one of them is taken by an entry we did not write.

    `what` names the flag in the message (`--output_dir`); `legacy(folder)` says that the folder is
    this kind's output from before records existed, so its names count as ours.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputRefused(f"{_label(what, folder)} is a file, not a folder")
    _check_writable(folder, what)
    if not folder.exists():
        return
    ours = owned(folder)
    taken = [n for n in names if (folder / n).exists() or (folder / n).is_symlink()]
    # A name the record does not list may still be ours from before records existed (`legacy`).
    foreign = [n for n in taken if ours.get(n) != kind and (n in ours or legacy is None or not legacy(folder))]
    if foreign:
        raise OutputRefused(
            f"{_label(what, folder)} holds {_list(folder, foreign)}, which moe-dist did not write "
            f"as {kind} output; it would be overwritten. Move it, or choose another folder"
        )


def record(folder: str | os.PathLike, kind: str, names: Iterable[str]) -> None:
    """Note `names` in `folder`'s record as ours (call it before writing them: a killed run's leftovers stay ours)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ours = owned(folder)
    new = {**ours, **{n: kind for n in names}}
    if new != ours:
        _write_record(folder, new, fingerprints(folder))


def claim(
    folder: str | os.PathLike, kind: str, names: Iterable[str], *, legacy: Legacy | None = None, what: str = ""
) -> Path:
    """`check`, then `record`: for a command that runs in one process. Returns the folder."""
    names = list(names)
    check(folder, kind, names, legacy=legacy, what=what)
    record(folder, kind, names)
    return Path(folder)


def check_replace(folder: str | os.PathLike, kind: str, *, unproven: Unproven | None = None, what: str = "") -> None:
    """Refuse (before any work) to replace `folder` unless it is missing, empty, or only our earlier `kind` output.

    Ours by its record: every entry listed as `kind`, every fingerprinted file unchanged. A folder without a
    record is ours only when `unproven(folder)` (what this kind's output from before records cannot account
    for, the names to show first first) is empty: a file we cannot prove we wrote is not ours, however much it
    looks like our output.
    """
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OutputRefused(f"{_label(what, folder)} is {'a link' if folder.is_symlink() else 'a file'}, not a folder")
    for path in (folder.parent, folder):  # the swap renames in the parent and empties the folder
        _check_writable(path, what, folder)
    entries = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    foreign, why = _not_ours(folder, kind, entries, unproven) if entries else ([], "")
    if foreign:
        raise OutputRefused(
            f"{_label(what, folder)} holds {_list(folder, foreign)}, {why}; it would be replaced. "
            f"Move it aside (mv {shlex.quote(str(folder))} {shlex.quote(str(folder) + '.old')}) "
            f"or choose a new or empty folder"
        )


def replace_dir(
    folder: str | os.PathLike,
    kind: str,
    write_fn: Callable[[Path], object],
    *,
    unproven: Unproven | None = None,
    what: str = "",
) -> Path:
    """Write a new `folder` through `write_fn(staging)` and swap it in whole (`check_replace` first); its record
    fingerprints every file, so a later replace can tell a file the user edited from ours."""
    check_replace(folder, kind, unproven=unproven, what=what)

    def write(staging: Path) -> None:
        write_fn(staging)
        entries = [p for p in staging.iterdir() if p.name != RECORD]
        _write_record(
            staging,
            {p.name: kind for p in entries},
            {p.name: _fingerprint(p) for p in entries if p.is_file() and not p.is_symlink()},
        )

    write_dir_atomic(folder, write)
    return Path(folder)


def _not_ours(folder: Path, kind: str, entries: list[str], unproven: Unproven | None) -> tuple[list[str], str]:
    """The entries of `folder` not proven to be our `kind` output, and why."""
    ours = owned(folder)
    if not ours:
        return (unproven(folder) if unproven is not None else entries), (
            f"which moe-dist cannot prove it wrote (there is no {RECORD}, and it is not an untouched {kind} output "
            f"from before records existed)"
        )
    foreign = [n for n in entries if n != RECORD and ours.get(n) != kind]
    if foreign:
        return foreign, "which moe-dist did not write"
    files = fingerprints(folder)  # read only once every name is ours: hashing is the one costly check
    return (
        [n for n in entries if n in files and not _unchanged(folder / n, files[n])],
        f"changed since moe-dist wrote it (size or sha256 differs from {RECORD})",
    )


def _read_record(folder: str | os.PathLike) -> dict:
    try:
        data = json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(folder: Path, outputs: dict[str, str], files: dict[str, dict]) -> None:
    data = {"written_by": "moe-dist", "outputs": dict(sorted(outputs.items()))}
    if files:
        data["files"] = dict(sorted(files.items()))
    text = json.dumps(data, indent=1).encode()
    write_atomic(folder / RECORD, lambda f: f.write(text))


def _fingerprint(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _unchanged(path: Path, recorded: dict) -> bool:
    """The file still has its recorded size and sha256 (the size first: a changed length costs no reading)."""
    return (
        path.is_file()
        and not path.is_symlink()
        and path.stat().st_size == recorded.get("size")
        and _sha256(path) == recorded.get("sha256")
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()  # in 1 MiB reads (hashlib.file_digest is Python 3.11+): weights can be large
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_writable(path: Path, what: str, folder: Path | None = None) -> None:
    """Refuse now, not after the work, a folder we could not create or write: the nearest existing one of `path`
    and its parents is a file, read-only or not ours to write (`os.access` sees a read-only mount and an
    immutable folder, for root too)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    label = _label(what, folder or path)
    if not existing.is_dir():
        raise OutputRefused(f"{label} cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputRefused(f"{label} cannot be written: {existing} is read-only or permission is denied")


def _label(what: str, path: Path) -> str:
    return f"{what} {path}" if what else str(path)


def _list(folder: Path, names: list[str], shown: int = 4) -> str:
    items = [f"{n}/" if (folder / n).is_dir() else n for n in names[:shown]]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(items) + more
