"""Never remove or replace a file or folder that moe-dist did not write.

Every folder a command writes into carries a record, `.moe-dist.json`, of the top-level names
moe-dist wrote there and the kind of output each one is (`{"outputs": {"summary.json": "train"}}`).
Two ways to write a folder, and one rule for both:

- **add** (`check` / `record` / `claim`): put our names beside whatever is there. Allowed when no
  name we write is already taken by an entry we did not write (training into a folder that holds
  the user's notes is fine; a `summary.json` of someone else's is not).
- **replace** (`replace_dir`): swap the whole folder for a new one (an export). Allowed when the
  folder is missing, empty, or holds our own earlier output of the same kind and nothing else.

Anything else is refused with `OutputRefused`, whose message is the one line the user sees,
before the command does any work. Outputs written before the record existed are recognised by a
`legacy(folder)` predicate of the command's own (an export's `model_type`, a run's `run.json`).

Standard library only, like `atomic_io`: the trainer, the exporter and the tools all use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .atomic_io import write_atomic, write_dir_atomic

RECORD = ".moe-dist.json"
Legacy = Callable[[Path], bool]


class OutputRefused(Exception):
    """Writing there would lose something the user has; the message names the folder and what is in it."""


def owned(folder: str | os.PathLike) -> dict[str, str]:
    """The names in `folder` that moe-dist wrote, with their kind ({} when there is no record)."""
    try:
        data = json.loads((Path(folder) / RECORD).read_text())
        return {str(k): str(v) for k, v in data["outputs"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def check(folder: str | os.PathLike, kind: str, names: Iterable[str], *, legacy: Legacy | None = None,
          what: str = "") -> None:
    """Refuse (before any work) to write `names` into `folder` if one of them is taken by an entry we did not write.

    `what` names the flag in the message (`--output_dir`); `legacy(folder)` says that the folder is
    this kind's output from before records existed, so its names count as ours.
    """
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise OutputRefused(f"{_label(what, folder)} is a file, not a folder")
    ours = owned(folder)
    taken = [n for n in names if (folder / n).exists() or (folder / n).is_symlink()]
    # A name the record does not list may still be ours from before records existed (`legacy`).
    foreign = [n for n in taken if ours.get(n) != kind and (n in ours or legacy is None or not legacy(folder))]
    if foreign:
        raise OutputRefused(f"{_label(what, folder)} holds {_list(folder, foreign)}, which moe-dist did not write "
                            f"as {kind} output; it would be overwritten. Move it, or choose another folder")


def record(folder: str | os.PathLike, kind: str, names: Iterable[str]) -> None:
    """Note `names` in `folder`'s record as ours (call it before writing them: a killed run's leftovers stay ours)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ours = owned(folder)
    new = {**ours, **{n: kind for n in names}}
    if new != ours:
        data = json.dumps({"written_by": "moe-dist", "outputs": dict(sorted(new.items()))}, indent=1).encode()
        write_atomic(folder / RECORD, lambda f: f.write(data))


def claim(folder: str | os.PathLike, kind: str, names: Iterable[str], *, legacy: Legacy | None = None,
          what: str = "") -> Path:
    """`check`, then `record`: for a command that runs in one process. Returns the folder."""
    names = list(names)
    check(folder, kind, names, legacy=legacy, what=what)
    record(folder, kind, names)
    return Path(folder)


def check_replace(folder: str | os.PathLike, kind: str, *, legacy: Legacy | None = None, what: str = "") -> None:
    """Refuse (before any work) to replace `folder` unless it is missing, empty, or only our earlier `kind` output."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise OutputRefused(f"{_label(what, folder)} is {'a link' if folder.is_symlink() else 'a file'}, not a folder")
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    ours = owned(folder)
    if ours:
        foreign = [n for n in entries if n != RECORD and ours.get(n) != kind]
    else:
        foreign = [] if legacy is not None and legacy(folder) else entries
    if foreign:
        raise OutputRefused(f"{_label(what, folder)} holds {_list(folder, foreign)}, which moe-dist did not write; "
                            f"it would be replaced. Choose a new or empty folder")


def replace_dir(folder: str | os.PathLike, kind: str, write_fn: Callable[[Path], object], *,
                legacy: Legacy | None = None, what: str = "") -> Path:
    """Write a new `folder` through `write_fn(staging)` and swap it in whole (`check_replace` first)."""
    check_replace(folder, kind, legacy=legacy, what=what)

    def write(staging: Path) -> None:
        write_fn(staging)
        record(staging, kind, [p.name for p in staging.iterdir() if p.name != RECORD])

    write_dir_atomic(folder, write)
    return Path(folder)


def _label(what: str, path: Path) -> str:
    return f"{what} {path}" if what else str(path)


def _list(folder: Path, names: list[str], shown: int = 4) -> str:
    items = [f"{n}/" if (folder / n).is_dir() else n for n in names[:shown]]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(items) + more
