"""Text to training batches: load stories (hub or local files), build a tokenizer, pack the
tokens into fixed-length blocks, and give each rank its resumable share of every global batch."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers.utils import GENERATION_CONFIG_NAME as GENERATION_CONFIG

from ..atomic_io import write_atomic, write_dir_atomic
from .conversations import chat_template, is_conversation_file, load_examples, read_conversations
from .data_prep import (
    SEPARATOR,
    DataError,
    StoryReader,
    default_num_proc,
    log_phase,
    one_thread_tokenizers,
    open_bytes,
    pack_file,
    progress,
    token_dtype,
    tokenize_to_file,
)
from .packing import pack_conversations, packed_tensors

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# A byte-level BPE keeps all 256 byte symbols plus SEPARATOR, so smaller vocabularies are impossible.
MIN_TRAINED_VOCAB = 257
# Bump when pack_blocks changes what it writes, so old caches are never trusted.
_CACHE_VERSION = 2
_HUB_SPLITS = {"train": "train", "valid": "validation"}
# Local text kinds by suffix; each may also be gzip-compressed (".txt.gz"), read directly.
_FILE_KINDS = {".txt": "text", ".json": "json", ".jsonl": "json"}
_VALID_SUFFIXES = ".txt, .json and .jsonl, optionally .gz"
# The TinyStories sample bundled with the repository (CDLA-Sharing-1.0, see its SOURCE.md): the
# offline default, so the quick start and the tests need no hub.
BUNDLED_SAMPLE = Path(__file__).resolve().parents[2] / "data" / "tinystories"
# GPT-2's tokenizer (MIT, see its SOURCE.md): what `--tokenizer gpt2`, the default, loads with no hub.
BUNDLED_GPT2 = Path(__file__).resolve().parents[2] / "data" / "gpt2"


@dataclass
class DataConfig:
    """Which text, tokenizer and block length. The command line's data flags are these fields.

    `tokenizer` and `seq_len` may stay None there: `plan.plan_run` settles them (the --init_from
    model's own tokenizer, else gpt2; the model's context length) before any data is read.
    """

    dataset: str | None = field(
        default=None,
        metadata={
            "help": (
                "hub dataset with train/validation splits, e.g. roneneldan/TinyStories "
                "(default, with no data flag: the TinyStories sample bundled in data/)"
            )
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": ("local training text (.txt stories split by <|endoftext|> lines, or .jsonl; .gz is read directly)")
        },
    )
    valid_file: str | None = field(default=None, metadata={"help": "local validation text, same format"})
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": (
                "Jinja chat template file for conversation data (default: the tokenizer's own); saved with the "
                "run's tokenizer, so exports and generate --chat use it"
            )
        },
    )
    truncate_conversations: bool = field(
        default=False,
        metadata={"help": "cut a conversation longer than seq_len + 1 tokens (default: refuse it); counts logged"},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": (
                "tokenizer name or path, or train:N for a byte-level BPE of N tokens "
                "(default: the --init_from model's own, else gpt2)"
            )
        },
    )
    # Each stored block holds seq_len + 1 tokens: the inputs and the labels shifted by one.
    seq_len: int | None = field(
        default=None, metadata={"help": ("tokens per training sequence (default: the model's context length)")}
    )
    max_valid_blocks: int | None = field(
        default=None, metadata={"help": ("evaluate on the first N validation blocks only")}
    )
    # Also the datasets library's cache for hub data.
    cache_dir: str | None = field(
        default=None, metadata={"help": ("where tokenized data is cached (default: <output_dir>/cache)")}
    )
    # Not part of the cache key: the blocks are the same for any value.
    num_proc: int | None = field(
        default=None,
        metadata={
            "help": (
                "processes that tokenize, one thread each; 1 also trains a train:N tokenizer on one thread "
                "(default: the CPUs available to this process; on a multi-rank launch only rank 0 prepares the data)"
            )
        },
    )

    def __post_init__(self) -> None:
        if (self.train_file is None) != (self.valid_file is None):
            raise DataError("train_file/valid_file: give both or neither")
        if self.dataset is not None and self.train_file is not None:
            raise DataError(f"dataset {self.dataset!r} and train_file/valid_file contradict each other; pass one")
        if self.dataset is None and self.train_file is None:
            self.train_file, self.valid_file = bundled_sample()
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 8):
            raise DataError(f"seq_len: must be an int >= 8, got {self.seq_len!r}")
        if self.max_valid_blocks is not None and self.max_valid_blocks < 1:
            raise DataError(f"max_valid_blocks: must be None or >= 1, got {self.max_valid_blocks!r}")
        if self.tokenizer is not None:
            trained_vocab_size(self.tokenizer)
        if self.num_proc is not None and self.num_proc < 1:
            raise DataError(f"num_proc: must be >= 1, got {self.num_proc!r}")
        self._check_conversations()

    def _check_conversations(self) -> None:
        kinds = {
            f: is_conversation_file(p) for f, p in (("train_file", self.train_file), ("valid_file", self.valid_file))
        }
        if len(set(kinds.values())) > 1:
            which = next(f for f, is_chat in kinds.items() if is_chat)
            raise DataError(
                f"train_file/valid_file: {which} holds conversations and the other plain text; give both in one form"
            )
        if self.conversations and self.tokenizer is not None and trained_vocab_size(self.tokenizer):
            raise DataError(
                f"tokenizer {self.tokenizer!r}: a train:N tokenizer learns from plain text and has no chat "
                f"template; with conversations pass the model's tokenizer (the --init_from folder's by default)"
            )
        if self.chat_template is not None and not self.conversations:
            raise DataError(f"chat_template {self.chat_template}: the data is plain text, which no template renders")

    @property
    def conversations(self) -> bool:
        """JSONL records of `messages` or prompt/completion: the fine-tuning path (see `conversations.py`)."""
        return self.train_file is not None and is_conversation_file(self.train_file)


def bundled_sample() -> tuple[str, str]:
    """(train, valid) paths of the bundled TinyStories sample."""
    train, valid = BUNDLED_SAMPLE / "train.txt.gz", BUNDLED_SAMPLE / "valid.txt.gz"
    if not (train.is_file() and valid.is_file()):
        raise DataError(
            f"data: the bundled sample is not at {BUNDLED_SAMPLE} (moe_dist installed without its "
            f"source tree?); pass --train_file and --valid_file, or --dataset NAME"
        )
    return str(train), str(valid)


def describe_source(cfg: DataConfig) -> str:
    """One phrase for the log: which data this run trains on."""
    if cfg.dataset is not None:
        return f"hub dataset {cfg.dataset!r}"
    if (cfg.train_file, cfg.valid_file) == tuple(str(BUNDLED_SAMPLE / f"{s}.txt.gz") for s in ("train", "valid")):
        return f"the bundled TinyStories sample ({BUNDLED_SAMPLE})"
    return f"local files {cfg.train_file} and {cfg.valid_file}"


def file_kind(path: str | Path) -> str | None:
    """ "text" or "json" for a supported local file (by suffix, .gz allowed), else None."""
    suffixes = [s.lower() for s in Path(path).suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return _FILE_KINDS.get(suffixes[-1]) if suffixes else None


def trained_vocab_size(spec: str) -> int | None:
    """N for a "train:N" tokenizer spec; None for a name or path."""
    if not spec.startswith("train:"):
        return None
    n = spec.removeprefix("train:")
    if not n.isdigit() or int(n) < MIN_TRAINED_VOCAB:
        raise DataError(f"tokenizer: 'train:N' needs an int N >= {MIN_TRAINED_VOCAB}, got {spec!r}")
    return int(n)


# ---------------------------------------------------------------- loading text


def load_text_splits(cfg: DataConfig) -> tuple[StoryReader, StoryReader]:
    """(train, valid) stories, each a `StoryReader`: streamed from disk (or a hub dataset's Arrow table) as
    often as it is iterated, never held whole."""
    return _load_split(cfg, "train")[0], _load_split(cfg, "valid")[0]


def _load_split(cfg: DataConfig, split: str) -> tuple[StoryReader, int]:
    """One split's stories and how many bytes of it were not valid UTF-8 (replaced by U+FFFD when read)."""
    path = cfg.train_file if split == "train" else cfg.valid_file
    if path is None:
        stories, bad = StoryReader(dataset=_load_hub(cfg, split), label=_source_name(cfg, split)), 0
    else:
        stories, bad = _open_file(f"{split}_file", path)
    if next(iter(stories), None) is None:  # stops at the first story: cheap on any corpus
        raise DataError(f"{_source_name(cfg, split)}: no story found (only blank text or {SEPARATOR} lines)")
    return stories, bad


def _load_hub(cfg: DataConfig, split: str):
    import datasets

    try:
        ds = datasets.load_dataset(cfg.dataset, split=_HUB_SPLITS[split], cache_dir=cfg.cache_dir)
    except Exception as e:  # offline, a wrong name and a missing split all surface as assorted types
        raise DataError(
            f"dataset {cfg.dataset!r} (split {_HUB_SPLITS[split]!r}): could not load it from the hub "
            f"({type(e).__name__}); no internet? pass --train_file and --valid_file"
        ) from e
    if "text" not in ds.column_names:
        raise DataError(f"dataset {cfg.dataset!r}: needs a 'text' column, has {ds.column_names}")
    return ds


def _open_file(field: str, path: str) -> tuple[StoryReader, int]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{field}: {path} does not exist; pass a file of kind {_VALID_SUFFIXES}")
    if not p.is_file():
        raise DataError(f"{field}: {path} is a directory, not a file; pass a file of kind {_VALID_SUFFIXES}")
    if file_kind(p) is None:
        raise DataError(f"{field}: {path} has suffix {''.join(p.suffixes[-2:])!r}; valid are {_VALID_SUFFIXES}")
    bad = scan_bytes(p, f"{field}: {path}").bad
    if bad:
        log.warning("%s: %d bytes are not valid UTF-8; each was replaced with U+FFFD", path, bad)
    return StoryReader(str(p), label=f"{field}: {path}"), bad


@dataclass(frozen=True)
class ByteCounts:
    total: int
    bad: int  # bytes that are not valid UTF-8
    nul: int  # NUL bytes, which no text holds


def scan_bytes(path: Path, label: str) -> ByteCounts:
    """The text's bytes counted, decompressed and streamed to the end (so huge files are fine, and a .gz that is
    corrupt or truncated is found); `DataError` naming `label` when the file cannot be read to its end."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    total = good = nul = 0
    try:
        with open_bytes(path) as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
                nul += chunk.count(0)
                good += len(decoder.decode(chunk).encode("utf-8"))
    except (OSError, EOFError, zlib.error) as e:  # gzip raises all three, by how the stream is broken
        what = "the gzip stream is corrupt or truncated" if str(path).lower().endswith(".gz") else "cannot be read"
        raise DataError(f"{label}: {what} ({type(e).__name__}: {e})") from None
    good += len(decoder.decode(b"", final=True).encode("utf-8"))
    return ByteCounts(total, total - good, nul)


def check_data_file(flag: str, path: str) -> None:
    """Refuse, before the run writes anything, a local data file that data preparation could not read to its end.

    One line naming the file: missing, a folder, an unknown kind, a corrupt or truncated .gz, bytes that are not
    text (any NUL, or more than 1 in 100 not UTF-8: a few odd bytes are data, replaced with U+FFFD and counted in
    the log), a JSON record that is not an object with a 'text' string, or no story at all. Streams the file
    once, and JSON files a second time to parse every record.
    """
    p, label = Path(path), f"{flag} {path}"
    if p.is_dir():
        raise DataError(f"{label} is a directory; pass a .txt, .json or .jsonl file")
    if not p.is_file():
        raise DataError(f"{label} does not exist")
    if file_kind(p) is None:
        raise DataError(f"{label} has suffix {''.join(p.suffixes[-2:])!r}; valid are {_VALID_SUFFIXES}")
    counts = scan_bytes(p, label)
    if counts.nul:
        raise DataError(f"{label} is not text: it holds {counts.nul:,} NUL bytes (a binary file, or UTF-16 text)")
    if counts.bad * 100 > counts.total:
        raise DataError(
            f"{label} is not UTF-8 text: {counts.bad:,} of its {counts.total:,} bytes are not valid "
            f"UTF-8 (a binary file, or another encoding: convert it with iconv -t UTF-8)"
        )
    if is_conversation_file(p):
        read_conversations(p, flag.lstrip("-"))  # every record parsed and checked, a bad one named by its line
        return
    # Every JSON record is parsed and checked (StoryReader raises on a bad one); a text file's first story is enough.
    stories = sum(1 for _ in StoryReader(str(p), label=label)) if file_kind(p) == "json" else _has_text(p)
    if not stories:
        raise DataError(f"{label} is empty: it holds no story, only blank lines or {SEPARATOR} separators")


def _has_text(path: Path) -> bool:
    """Whether any line holds text; stops at the first one, so big corpora cost nothing."""
    with open_bytes(path) as f:
        return any(line.strip() and line.strip() != SEPARATOR.encode() for line in f)


def _source_name(cfg: DataConfig, split: str) -> str:
    path = cfg.train_file if split == "train" else cfg.valid_file
    return f"{split}_file {path}" if path else f"dataset {cfg.dataset!r} split {_HUB_SPLITS[split]!r}"


# ---------------------------------------------------------------- tokenizer


def build_tokenizer(
    spec: str, train_texts: Iterable[str] | None, save_dir: str | Path | None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE ("train:N", on train_texts) or load a named one; save it if save_dir."""
    n = trained_vocab_size(spec)
    if n is None:
        tokenizer = load_tokenizer(spec)
    elif train_texts is None:
        raise DataError(f"tokenizer: {spec!r} needs training texts")
    else:
        tokenizer = _train_bpe(train_texts, n)
    if save_dir is not None:
        # A resumed run trusts an existing save_dir, so it must never exist half-written.
        write_dir_atomic(save_dir, lambda tmp: _save_tokenizer(tokenizer, spec, Path(tmp)))
    return tokenizer


def _save_tokenizer(tokenizer, spec: str, folder: Path) -> None:
    """The tokenizer, and the generation settings of the folder it came from: their stop ids and sampling
    defaults belong to its tokens, and the exporters write them back from here (`generation_config.json`)."""
    tokenizer.save_pretrained(str(folder))
    settings = Path(spec) / GENERATION_CONFIG
    if settings.is_file():
        shutil.copyfile(settings, folder / GENERATION_CONFIG)


def _train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SEPARATOR],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    # Without bos/eos/pad, eos_token_id is None and generate() never stops (docs/design.md, other library pitfalls).
    # No space clean-up on decode, so decode(encode(text)) == text.
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=SEPARATOR,
        eos_token=SEPARATOR,
        pad_token=SEPARATOR,
        clean_up_tokenization_spaces=False,
    )


# The files a saved tokenizer is read from by AutoTokenizer: tokenizers' JSON, a sentencepiece model, a BPE
# vocabulary with its merges, or a config naming the class.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerFast:
    """A saved or hub tokenizer as it is: no pad token is invented (one saved with the run would reach its exports,
    whose stock class then makes that row its `padding_idx`); "gpt2" is the copy bundled in data/gpt2, so the
    default needs no hub."""
    from transformers import AutoTokenizer

    if str(name_or_path) == "gpt2" and BUNDLED_GPT2.is_dir():
        name_or_path = BUNDLED_GPT2
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as e:
        hint = _unreadable_tokenizer_hint(Path(name_or_path))
        raise DataError(f"tokenizer: cannot load {str(name_or_path)!r} ({type(e).__name__}): {hint}") from e
    if getattr(tokenizer, "backend_tokenizer", None) is None:  # the packing workers run its `tokenizers` form
        raise DataError(
            f"tokenizer: {str(name_or_path)!r} loads as {type(tokenizer).__name__}, a Python tokenizer without a "
            f"`tokenizers` form; save it with a tokenizer.json (a fast tokenizer) or pass --tokenizer"
        )
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer: {str(name_or_path)!r} has no eos_token; packing puts one after every story")
    return tokenizer


def _unreadable_tokenizer_hint(path: Path) -> str:
    if not path.is_dir():
        return "not a local folder, and the hub could not provide it (no internet?); pass a local path or train:N"
    if (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
        import importlib.util

        if importlib.util.find_spec("sentencepiece") is None:  # transformers converts tokenizer.model only with it
            return (
                "its tokenizer is a sentencepiece tokenizer.model, which transformers reads only with the "
                "sentencepiece package (pip install sentencepiece); or save it with a tokenizer.json"
            )
    return "the folder holds no readable tokenizer"


# ---------------------------------------------------------------- packing and caching


def pack_blocks(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerFast,
    seq_len: int,
    cache_path: str | Path | None = None,
    *,
    num_proc: int = 1,
    label: str = "",
    show: bool = False,
) -> np.ndarray:
    """Tokenize every story, end each with eos, concatenate, and cut into blocks (the tail is dropped).

    Returns shape [num_blocks, seq_len + 1]. The tokens stream through a file on disk (`data_prep`),
    `num_proc` processes tokenizing, so memory does not grow with the corpus and the blocks are the same
    for any `num_proc`. With cache_path, an existing file is returned as a read-only memmap instead, and a
    fresh result is written there atomically (and returned as a memmap of it).
    """
    if cache_path is not None and Path(cache_path).exists():
        return np.load(cache_path, mmap_mode="r")
    dtype = token_dtype(len(tokenizer))
    with tempfile.TemporaryDirectory(dir=Path(cache_path).parent if cache_path else None) as tmp:
        raw, npy = Path(tmp) / "tokens.bin", Path(cache_path) if cache_path else Path(tmp) / "blocks.npy"
        done = tokenize_to_file(texts, tokenizer, raw, num_proc=num_proc, dtype=dtype, label=label, show=show)
        log_phase(
            f"tokenize {label}".strip(),
            done["seconds"],
            stories=done["stories"],
            tokens=done["tokens"],
            num_proc=num_proc,
        )
        start = time.perf_counter()
        blocks = pack_file(raw, npy, seq_len, dtype)
        log_phase(
            f"pack {label}".strip() + f" into {blocks:,} blocks of {seq_len + 1}",
            time.perf_counter() - start,
            tokens=blocks * (seq_len + 1),
        )
        return np.load(npy, mmap_mode="r") if cache_path else np.load(npy)


def cache_fingerprint(source: str, tokenizer: PreTrainedTokenizerFast, seq_len: int) -> str:
    """Key of one split's token cache: changes with the source, the tokenizer or seq_len."""
    path = Path(source)
    if path.is_file():  # size + mtime: hashing a multi-GB corpus on every start would be slow
        st = path.stat()
        source = f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    key = json.dumps([_CACHE_VERSION, source, seq_len, tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _cache_paths(cfg: DataConfig, split: str, tokenizer: PreTrainedTokenizerFast, cache_dir: Path) -> tuple[Path, Path]:
    path = cfg.train_file if split == "train" else cfg.valid_file
    source = path if path is not None else f"hub:{cfg.dataset}:{_HUB_SPLITS[split]}"
    key = cache_fingerprint(source, tokenizer, cfg.seq_len)
    return cache_dir / f"{split}-{key}.npy", cache_dir / f"{split}-{key}.json"


# ---------------------------------------------------------------- prepare (all ranks)


@dataclass
class PreparedData:
    train_blocks: np.ndarray  # shape: [num_train_blocks, seq_len + 1]
    valid_blocks: np.ndarray  # shape: [num_valid_blocks, seq_len + 1]
    tokenizer: PreTrainedTokenizerFast
    stats: dict[str, int]


def prepare_data(
    cfg: DataConfig, run_dir: str | Path, *, is_main: bool, barrier: Callable[[], None], min_valid_blocks: int = 1
) -> PreparedData:
    """The main process builds the tokenizer (run_dir/tokenizer) and the token caches; then, after
    barrier(), every process loads them from disk. A resumed run reuses run_dir/tokenizer."""
    run_dir = Path(run_dir)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else run_dir / "cache"
    if is_main:
        _build_on_main(cfg, run_dir, cache_dir)
    barrier()
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    blocks, meta = {}, {}
    for split in ("train", "valid"):
        npy, meta_path = _cache_paths(cfg, split, tokenizer, cache_dir)
        blocks[split], meta[split] = np.load(npy, mmap_mode="r"), json.loads(meta_path.read_text())
    blocks["valid"] = blocks["valid"][: cfg.max_valid_blocks]
    for split, needed in (("train", 1), ("valid", min_valid_blocks)):
        if len(blocks[split]) < needed:
            raise DataError(
                f"{_source_name(cfg, split)}: makes {len(blocks[split])} blocks of seq_len + 1 = "
                f"{cfg.seq_len + 1} tokens, need >= {needed}; use more text or a smaller seq_len"
            )
    stats = {"bad_bytes": meta["train"]["bad_bytes"] + meta["valid"]["bad_bytes"]}
    for split in ("train", "valid"):
        stats |= {
            f"n_{split}_stories": meta[split]["stories"],
            f"n_{split}_blocks": len(blocks[split]),
            f"n_{split}_tokens": int(blocks[split][:, 0].size if blocks[split].ndim == 3 else blocks[split].size),
        }
    return PreparedData(blocks["train"], blocks["valid"], tokenizer, stats)


def _build_on_main(cfg: DataConfig, run_dir: Path, cache_dir: Path) -> None:
    loaded: dict[str, tuple[StoryReader, int]] = {}

    def split_texts(split: str) -> tuple[StoryReader, int]:
        if split not in loaded:
            loaded[split] = _load_split(cfg, split)
        return loaded[split]

    num_proc = cfg.num_proc or default_num_proc()
    tok_dir = run_dir / "tokenizer"
    if not tok_dir.is_dir() and cfg.conversations:
        _save_chat_tokenizer(cfg, tok_dir)
    if not tok_dir.is_dir():
        start = time.perf_counter()
        reader = split_texts("train")[0] if trained_vocab_size(cfg.tokenizer) else None
        if reader is None:
            build_tokenizer(cfg.tokenizer, None, tok_dir)
        else:
            threads = one_thread_tokenizers() if num_proc == 1 else contextlib.nullcontext()
            with threads, progress(reader, f"read train for {cfg.tokenizer}", True) as stories:
                build_tokenizer(cfg.tokenizer, stories, tok_dir)
            log_phase(f"read train ({reader.stories:,} stories) for the tokenizer", reader.seconds)
            log_phase(
                f"train the {cfg.tokenizer} tokenizer (reading included)",
                time.perf_counter() - start,
                stories=reader.stories,
            )
    # Fingerprint the tokenizer as every rank will load it, so all ranks agree on the cache names.
    tokenizer = load_tokenizer(tok_dir)
    for split in ("train", "valid"):
        npy, meta_path = _cache_paths(cfg, split, tokenizer, cache_dir)
        if npy.exists() and meta_path.exists():
            continue
        npy.parent.mkdir(parents=True, exist_ok=True)
        if cfg.conversations:
            meta = _pack_conversation_split(cfg, split, tokenizer, npy)
        else:
            texts, bad = split_texts(split)
            pack_blocks(texts, tokenizer, cfg.seq_len, npy, num_proc=num_proc, label=split, show=True)
            meta = {"stories": texts.stories, "bad_bytes": bad}
        encoded = json.dumps(meta).encode()
        write_atomic(meta_path, lambda f, data=encoded: f.write(data))


def _save_chat_tokenizer(cfg: DataConfig, tok_dir: Path) -> None:
    """The run's tokenizer with the chat template its conversations are rendered with (--chat_template's, else
    its own), so every rank, the exports and `generate.py --chat` render them the same way."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    tokenizer.chat_template = chat_template(tokenizer, cfg.chat_template)
    write_dir_atomic(tok_dir, lambda tmp: _save_tokenizer(tokenizer, cfg.tokenizer, Path(tmp)))


def _pack_conversation_split(cfg: DataConfig, split: str, tokenizer, npy: Path) -> dict:
    """One split's conversations rendered, masked and packed into rows [R, 4, seq_len] (`packing.py`) at `npy`."""
    path = cfg.train_file if split == "train" else cfg.valid_file
    start = time.perf_counter()
    examples = load_examples(path, f"{split}_file", tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    rows, counts = pack_conversations(
        examples, cfg.seq_len, truncate=cfg.truncate_conversations, label=f"{split}_file {path}", pad_id=pad
    )
    write_atomic(npy, lambda f: np.save(f, rows))
    log_phase(f"render and pack {split} conversations", time.perf_counter() - start, tokens=int(rows[:, 0].size))
    return {"stories": counts["conversations"], "bad_bytes": 0, "packing": counts}


# ---------------------------------------------------------------- batches


class BlockSampler:
    """Deterministic, rank-sharded, resumable training batches of block indices.

    Each optimizer step takes the next global batch (micro_batch_size * grad_accum * world_size
    blocks) of a per-epoch permutation; the epoch tail that cannot fill a global batch is dropped,
    so every rank gets exactly micro_batch_size blocks per micro-step: expert-parallel all-to-all
    needs equal token counts across ranks (docs/design.md, DeepSpeed traps). The position is just the number of
    global steps consumed, so resuming in a new process continues exactly where it stopped.
    """

    def __init__(
        self, num_blocks: int, *, micro_batch_size: int, grad_accum: int, rank: int, world_size: int, seed: int
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, {world_size}), got {rank}")
        self.num_blocks, self.seed, self.rank = num_blocks, seed, rank
        self.shape = (grad_accum, world_size, micro_batch_size)  # one global batch
        self.global_batch = micro_batch_size * grad_accum * world_size
        if num_blocks < self.global_batch:
            raise DataError(
                f"train set: {num_blocks} blocks < one global batch of {self.global_batch} "
                f"(micro_batch_size {micro_batch_size} x grad_accum {grad_accum} x world_size "
                f"{world_size}); use a smaller batch or seq_len, or more data"
            )
        self.steps_per_epoch = num_blocks // self.global_batch
        self.step = 0
        self._epoch, self._perm = -1, np.empty(0, np.int64)

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def next_step(self) -> list[np.ndarray]:
        """grad_accum index arrays of micro_batch_size blocks each: this rank's share of the next step."""
        epoch, i = divmod(self.step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_blocks, generator=generator).numpy()
        batch = self._perm[i * self.global_batch : (i + 1) * self.global_batch].reshape(self.shape)
        self.step += 1
        return list(batch[:, self.rank])

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "num_blocks": self.num_blocks, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_blocks", "global_batch"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"data position: checkpoint has {key}={state[key]}, this run has "
                    f"{getattr(self, key)}; resume with the same data, seed and batch sizes"
                )
        self.step = state["step"]


def batch_tensors(blocks: np.ndarray, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
    """(input_ids, labels), int64, shape [len(idx), seq_len]; labels are already shifted by one. Packed
    conversation rows ([R, 4, seq_len]) give (input_ids, labels, position_ids, real) (`packing.packed_tensors`)."""
    if blocks.ndim == 3:
        return packed_tensors(blocks, idx)
    batch = torch.from_numpy(np.asarray(blocks[idx], dtype=np.int64))
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def validation_shard(
    num_blocks: int, *, rank: int, world_size: int, micro_batch_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """This rank's fixed validation micro-batches, as (block indices, real-row mask) pairs, unshuffled.

    Every block is in exactly one rank's shard, so the set evaluated is the same at any world
    size. Every rank still gets the same number of micro_batch_size-row batches, because the
    expert-parallel all-to-alls and the dropless capacity all-reduce need matched collectives:
    the slots past the last block repeat real blocks, with mask False, for `evaluate` to leave out.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, {world_size}), got {rank}")
    if num_blocks < 1:
        raise DataError("validation set: has no blocks; use more validation data or a smaller seq_len")
    per_step = world_size * micro_batch_size
    steps = -(-num_blocks // per_step)
    slots = np.arange(steps * per_step).reshape(steps, world_size, micro_batch_size)[:, rank]
    return [(s % num_blocks, s < num_blocks) for s in slots]
