"""Text to packed token blocks on every core, in bounded memory: the main rank's data preparation.

Phases, each logged with its time and throughput, with a progress bar and ETA while it runs:

1. reading: stories stream out of the files (`.txt` split at `<|endoftext|>`, `.jsonl`/`.json` `text`
   fields, `.gz` read directly) or a hub dataset's Arrow table, a chunk at a time; never a whole file;
2. tokenizer training (`train:N`): the byte-level BPE trainer of `tokenizers`, fed from that stream; it runs
   on every core itself (Rust; on one with `num_proc` 1) and keeps only its word counts;
3. tokenization: chunks of stories go to `num_proc` worker processes, each encoding on one thread with its
   own copy of the tokenizer and returning the chunk's token ids (each story ends with eos) as one small
   array; the main process appends them to a raw token file in chunk order, so the result is the same for
   any `num_proc`. `num_proc` 1 encodes in the main process, on one thread: `--num_proc N` uses N cores;
4. packing: the raw tokens are copied into the `[blocks, seq_len + 1]` `.npy` cache through a memmap,
   a slab at a time (the tail that does not fill a block is dropped).

Memory stays bounded by the chunk size times `num_proc`, plus the tokenizer trainer's counts: nothing holds
the corpus. The blocks are bitwise the same at any `num_proc`, so the cache fingerprint leaves it out.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..atomic_io import write_atomic

log = logging.getLogger("moe_dist")

SEPARATOR = "<|endoftext|>"


class DataError(ValueError):
    """Bad data input. The message is one line naming the field or path and what is valid."""


def open_bytes(path: str | Path):
    """A binary file object over the text, decompressing .gz on the fly."""
    return gzip.open(path, "rb") if str(path).lower().endswith(".gz") else open(path, "rb")


CHUNK_STORIES = 2000  # stories per task sent to a worker: large enough to amortise the IPC, small for memory
_READ_BYTES = 1 << 22
_PACK_ROWS = 1 << 16  # blocks copied per slab while packing


def default_num_proc() -> int:
    """The CPUs this process may run on (a container's or scheduler's limit, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---- 1. reading ------------------------------------------------------------------------------------


class StoryReader:
    """The stories of one split, streamed, as often as asked; while iterating it counts the stories, the
    bytes read (for progress and ETA) and the time spent reading. `label` prefixes its errors."""

    def __init__(self, path: str | None = None, dataset=None, *, label: str = ""):
        self.path, self.dataset, self.label = path, dataset, label
        self.total_bytes = Path(path).stat().st_size if path else None
        self.stories, self.bytes_read, self.seconds = 0, 0, 0.0

    def __iter__(self) -> Iterator[str]:
        self.stories, self.bytes_read, self.seconds = 0, 0, 0.0
        pieces = self._hub() if self.path is None else (self._text() if _kind(self.path) == "text" else self._json())
        while True:
            start = time.perf_counter()  # reading = fetching, decoding and splitting, not what the caller does
            piece = next(pieces, None)
            stories = [] if piece is None else _stories(piece)
            self.seconds += time.perf_counter() - start
            if piece is None:
                return
            for story in stories:
                self.stories += 1
                yield story

    def _raw(self) -> Iterator[bytes]:
        with open(self.path, "rb") as raw:
            f = gzip.GzipFile(fileobj=raw) if self.path.lower().endswith(".gz") else raw
            while chunk := f.read(_READ_BYTES):
                self.bytes_read = raw.tell()  # compressed bytes for .gz: the file size is the total
                yield chunk

    def _text(self) -> Iterator[str]:
        """The text cut at SEPARATOR, whatever the chunk boundaries: a piece is yielded once it is complete."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        carry = ""
        for chunk in self._raw():
            text = carry + decoder.decode(chunk)
            cut = text.rfind(SEPARATOR)
            if cut < 0:
                carry = text
                continue
            yield text[:cut]
            carry = text[cut + len(SEPARATOR) :]
        yield carry + decoder.decode(b"", final=True)

    def _json(self) -> Iterator[str]:
        """JSON Lines, one record at a time; a file holding one JSON array is read whole (that format has no
        streaming reader here: use .jsonl for large corpora)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        chunks = self._raw()
        carry, started = "", False
        for chunk in chunks:
            text = carry + decoder.decode(chunk)
            if not started and text.strip():
                started = True
                if text.lstrip().startswith("["):
                    whole = text + "".join(decoder.decode(c) for c in chunks) + decoder.decode(b"", final=True)
                    yield from (_record_text(r, self.label) for r in _loads(whole, self.label))
                    return
            lines = text.split("\n")
            carry = lines.pop()
            yield from (_record_text(_loads(line, self.label), self.label) for line in lines if line.strip())
        last = carry + decoder.decode(b"", final=True)
        if last.strip():
            yield _record_text(_loads(last, self.label), self.label)

    def _hub(self) -> Iterator[str]:
        for batch in self.dataset.iter(batch_size=1000):
            yield from (text or "" for text in batch["text"])


def _stories(text: str) -> list[str]:
    # Records may hold several stories, or CRLF endings: every source is split alike.
    return [s for s in (p.strip() for p in text.replace("\r\n", "\n").split(SEPARATOR)) if s]


def _kind(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    return "text" if name.endswith(".txt") else "json"


def _loads(text: str, label: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:  # the second: nesting deeper than the parser follows
        why = getattr(e, "msg", "nested too deep")
        raise DataError(f"{label} is not valid json ({why} in a record starting {text.strip()[:40]!r})") from None


def _record_text(record, label: str) -> str:
    if not isinstance(record, dict) or "text" not in record:
        found = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{label} needs a 'text' field in every record, has {found}")
    if not isinstance(record["text"], (str, type(None))):  # null is an empty story
        raise DataError(f"{label} needs 'text' to be a string in every record, has text={record['text']!r:.40}")
    return record["text"] or ""


def chunked(stories: Iterator[str], size: int | None = None) -> Iterator[list[str]]:
    size = size or CHUNK_STORIES
    chunk: list[str] = []
    for story in stories:
        chunk.append(story)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---- 3. tokenization ------------------------------------------------------------------------------


_worker_tokenizer = None
_worker_eos = None


@contextlib.contextmanager
def one_thread_tokenizers():
    """TOKENIZERS_PARALLELISM=false for the block: `tokenizers` runs one thread (it reads the variable at each
    call), and a pool forked inside starts without the parent's thread pool (and without the library's fork
    warning). The setting before comes back after."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _init_worker(tokenizer_json: str, eos: int) -> None:
    global _worker_tokenizer, _worker_eos
    from tokenizers import Tokenizer

    _worker_tokenizer, _worker_eos = Tokenizer.from_str(tokenizer_json), eos


def _encode(chunk: list[str], tokenizer=None, eos: int | None = None) -> np.ndarray:
    """One chunk's ids, each story followed by eos, as uint32 (narrowed by the writer)."""
    tokenizer, eos = tokenizer or _worker_tokenizer, _worker_eos if eos is None else eos
    encodings = tokenizer.encode_batch(chunk, add_special_tokens=False)
    return np.fromiter((i for enc in encodings for i in (*enc.ids, eos)), dtype=np.uint32)


def tokenize_to_file(reader, tokenizer, raw_path: Path, *, num_proc: int, dtype, label: str, show: bool) -> dict:
    """Append every story's ids (+ eos) to `raw_path` in story order; returns counts and timings."""
    backend, eos = tokenizer.backend_tokenizer, tokenizer.eos_token_id
    start, tokens = time.perf_counter(), 0

    def write(ids: np.ndarray) -> None:
        nonlocal tokens
        ids.astype(dtype).tofile(out)
        tokens += len(ids)

    with open(raw_path, "wb") as out, progress(reader, f"tokenize {label}", show) as stories:
        if num_proc == 1:  # one process, one core: what --num_proc 1 asks
            with one_thread_tokenizers():
                for chunk in chunked(stories):
                    write(_encode(chunk, backend, eos))
        else:
            # fork: the workers start at once with the tokenizer library loaded; they run only its Rust code.
            # Each encodes on one thread: a forked child must not touch the thread pool its parent used
            # (tokenizers deadlocks there with TOKENIZERS_PARALLELISM=true, and warns otherwise), and the
            # processes are the parallelism. At most 2 x num_proc chunks are in flight, written back in
            # submission order: memory stays bounded (Pool.imap would read the whole input ahead) and the file
            # is the same for any num_proc.
            with (
                one_thread_tokenizers(),
                multiprocessing.get_context("fork").Pool(num_proc, _init_worker, (backend.to_str(), eos)) as pool,
            ):
                pending: deque = deque()
                for chunk in chunked(stories):
                    pending.append(pool.apply_async(_encode, (chunk,)))
                    if len(pending) >= 2 * num_proc:
                        write(pending.popleft().get())
                while pending:
                    write(pending.popleft().get())
    return {
        "stories": getattr(reader, "stories", None),
        "tokens": tokens,
        "seconds": time.perf_counter() - start,
        "read_seconds": getattr(reader, "seconds", 0.0),
    }


class progress:
    """Iterate `reader` with a progress bar over its bytes (ETA) on the main rank; a context manager, so the
    bar closes however the loop ends."""

    def __init__(self, reader, desc: str, show: bool):
        from tqdm import tqdm

        self.reader = reader
        total = getattr(reader, "total_bytes", None)
        self.bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=desc,
            disable=not show or total is None,
            mininterval=5,
            file=sys.stderr,
        )

    def __enter__(self) -> Iterator[str]:
        if self.bar.disable:
            return iter(self.reader)

        def stories():
            for story in self.reader:
                yield story
                self.bar.update(self.reader.bytes_read - self.bar.n)

        return stories()

    def __exit__(self, *exc) -> None:
        self.bar.close()


# ---- 4. packing ---------------------------------------------------------------------------------


def pack_file(raw_path: Path, npy_path: Path, seq_len: int, dtype) -> int:
    """The raw tokens as [blocks, seq_len + 1] in `npy_path`, written atomically a slab at a time; returns blocks."""
    tokens = np.memmap(raw_path, dtype=dtype, mode="r") if raw_path.stat().st_size else np.empty(0, dtype)
    width = seq_len + 1
    num_blocks = len(tokens) // width

    def write(f) -> None:
        np.lib.format.write_array_header_1_0(
            f,
            {
                "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                "fortran_order": False,
                "shape": (num_blocks, width),
            },
        )
        for first in range(0, num_blocks, _PACK_ROWS):
            last = min(num_blocks, first + _PACK_ROWS)
            f.write(np.ascontiguousarray(tokens[first * width : last * width]).tobytes())

    write_atomic(npy_path, write)
    return num_blocks


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 2**16 else np.int32


def log_phase(
    name: str, seconds: float, *, stories: int | None = None, tokens: int | None = None, num_proc: int | None = None
) -> None:
    rates = []
    if stories is not None:
        rates.append(f"{stories:,} stories, {stories / max(seconds, 1e-9):,.0f} stories/s")
    if tokens is not None:
        rates.append(f"{tokens:,} tokens, {tokens / max(seconds, 1e-9):,.0f} tokens/s")
    procs = f" on {num_proc} process(es)" if num_proc else ""
    log.info("data: %s in %.1f s%s%s", name, seconds, f" ({'; '.join(rates)})" if rates else "", procs)
