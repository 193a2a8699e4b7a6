"""Seeded fuzzing of what a user hands the trainer: malformed config.json contents, safetensors headers, JSONL
lines and flag values, each bad by construction, run against the planner in-process (`plan_run(*parse_args(argv))`:
what `launch/train.py` runs before any process group, model or output exists).

Every case must be refused with one of the types the command line reports as one line (`cli.PLAN_ERRORS`), on one
line, naming the file or the flag it broke, with nothing written; a case the planner accepts, or any other
exception, fails the test with its seed. The materials are two small folders (our export and a stock Llama) and
the test corpus; each case writes only the one file it breaks, beside links to the rest.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from launcher import DATA_ARGS, FIXTURES
from stock_models import save_stock, tokenizer_for_tests

from moe_dist import MoEConfig, MoEForCausalLM
from moe_dist.train.args import parse_args
from moe_dist.train.cli import PLAN_ERRORS
from moe_dist.train.plan import plan_run

CASES = 1000
_SHAPE = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{"native": our export of a tiny dense model, "llama": a stock folder}, each with the test tokenizer."""
    root = tmp_path_factory.mktemp("fuzz_sources")
    tokenizer = tokenizer_for_tests(root / "tokenizer")
    torch.manual_seed(0)
    MoEForCausalLM(MoEConfig.from_preset("tiny-dense", vocab_size=len(tokenizer), **_SHAPE)).save_pretrained(
        root / "native"
    )
    tokenizer.save_pretrained(root / "native")
    return {"native": root / "native", "llama": save_stock("llama", root / "llama", tokenizer)}


# ---- the generators: each returns (command-line arguments, what the refusal must name) --------------------------

_NOT_AN_INT = ["abc", "", "1.5", "nan", "inf", "1e3", "--", "0x10"]
_NOT_A_FLOAT = ["nan", "inf", "-inf", "abc", "", "1e999"]
_TOO_BIG = "the model does not fit in memory"  # what a size no machine holds is refused with


def _ints(low: int, high: int | None = 2**63 - 1, *, size: bool = False):
    """Bad values of an int flag valid in [low, high] (None: any larger value is fine too); with `size`, also one
    that no memory holds."""

    def bad(rng: random.Random) -> str:
        choices = [rng.choice(_NOT_AN_INT), str(low - rng.randint(1, 10**6))]
        return rng.choice(
            choices
            + ([str(high + rng.randint(1, 10**6))] if high is not None else [])
            + ([str(10**12)] if size else [])
        )

    return bad


def _floats(low: float, high: float | None = None, *, open_low: bool = False, open_high: bool = False):
    """Bad values of a float flag valid from low to high (inf when None), each end open or closed."""

    def bad(rng: random.Random) -> str:
        choices = [rng.choice(_NOT_A_FLOAT), repr(low - rng.uniform(1e-6, 1e6))] + ([repr(low)] if open_low else [])
        if high is not None:
            choices += [repr(high + rng.uniform(1e-6, 1e6))] + ([repr(high)] if open_high else [])
        return rng.choice(choices)

    return bad


# flag -> (the name its refusal gives, its bad values), for tiny-moe (8 experts, 4 layers, 128 positions) on the
# test corpus with a train:512 tokenizer.
FLAGS = {
    "--max_steps": ("max_steps", _ints(1)),
    "--eval_every": ("eval_every", _ints(1)),
    "--save_every": ("save_every", _ints(1)),
    "--log_every": ("log_every", _ints(1)),
    "--keep_last": ("keep_last", _ints(1)),
    "--max_bad_steps": ("max_bad_steps", _ints(1)),
    "--early_stopping_patience": ("early_stopping_patience", _ints(0)),
    "--warmup_steps": ("warmup_steps", _ints(0)),
    "--seed": ("seed", _ints(0, 2**32 - 1)),
    "--dist_timeout": ("dist_timeout", _ints(1, 86399999999940)),
    "--local_rank": ("local_rank", _ints(-1)),
    "--micro_batch_size": ("micro_batch_size", _ints(1, size=True)),
    "--grad_accum": ("grad_accum", _ints(1)),
    "--seq_len": ("seq_len", _ints(8, 128)),
    # Any number of validation blocks is a valid limit; --num_proc above the CPUs is capped with a warning.
    "--max_valid_blocks": ("max_valid_blocks", _ints(1, None)),
    "--num_proc": ("num_proc", _ints(1, None)),
    "--num_experts": ("num_local_experts", _ints(2, 2**31 - 1)),
    "--top_k": ("num_experts_per_tok", _ints(1, 8)),
    "--moe_intermediate_size": ("moe_intermediate_size", _ints(1, size=True)),
    "--moe_every": ("moe_every", _ints(1)),
    "--skip_first_moe": ("skip_first_moe", _ints(0, 3)),
    "--num_shared_experts": ("num_shared_experts", _ints(0, size=True)),
    "--vocab_size": ("vocab_size", lambda rng: rng.choice([_ints(1, size=True)(rng), str(rng.randint(1, 511))])),
    "--lr": ("lr", _floats(0)),
    "--min_lr_ratio": ("min_lr_ratio", _floats(0, 1)),
    "--weight_decay": ("weight_decay", _floats(0)),
    "--beta1": ("beta1", _floats(0, 1, open_high=True)),
    "--beta2": ("beta2", _floats(0, 1, open_high=True)),
    "--adam_eps": ("adam_eps", _floats(0, open_low=True)),
    "--grad_clip": ("grad_clip", _floats(0)),
    "--gpu_mem_gib": ("gpu_mem_gib", _floats(0, open_low=True)),
    "--capacity_factor": ("capacity_factor", _floats(0, open_low=True)),
    "--router_jitter": ("router_jitter_noise", _floats(0, 1, open_high=True)),
    "--aux_loss_coef": ("router_aux_loss_coef", _floats(0)),
    "--z_loss_coef": ("router_z_loss_coef", _floats(0)),
    "--bias_update_rate": ("router_bias_update_rate", _floats(0)),
}
# With --init_from a dense export of FFN width 128 and --upcycle_experts 4 (unless the flag is that one).
UPCYCLE_FLAGS = {
    "--upcycle_experts": ("upcycle_experts", _ints(2, 2**31 - 1)),
    "--upcycle_noise": ("upcycle_noise", _floats(0, 1)),
    "--upcycle_reinit": ("upcycle_reinit", _floats(0, 1, open_high=True)),
    "--upcycle_granularity": ("upcycle_granularity", lambda rng: rng.choice([_ints(1)(rng), "3", "256"])),
}


def bad_flag(rng: random.Random, tmp: Path, sources: dict) -> tuple[list[str], tuple[str, ...]]:
    """One flag given a value outside what it allows (as --flag=value, so "-inf" stays a value)."""
    flag = rng.choice(sorted(FLAGS) + sorted(UPCYCLE_FLAGS))
    name, bad = FLAGS.get(flag) or UPCYCLE_FLAGS[flag]
    args = [f"{flag}={bad(rng)}"]
    if flag in UPCYCLE_FLAGS:
        args += [
            "--init_from",
            str(sources["native"]),
            *([] if flag == "--upcycle_experts" else ["--upcycle_experts", "4"]),
        ]
    return args, (name, flag[2:], _TOO_BIG)


def _linked_copy(source: Path, folder: Path, skip: str) -> Path:
    """`folder` with a link to every file of `source` but `skip`, which the caller writes."""
    folder.mkdir()
    for path in source.iterdir():
        if path.name != skip:
            (folder / path.name).symlink_to(path)
    return folder


_NATIVE_FIELDS = {
    "hidden_size": "int",
    "num_hidden_layers": "int",
    "num_attention_heads": "int",
    "vocab_size": "int",
    "intermediate_size": "int",
    "max_position_embeddings": "int",
    "norm_eps": "float",
    "initializer_range": "float",
    "num_local_experts": "int",
    "bias": "bool",
    "hidden_act": "choice",
    "norm_type": "choice",
    "router_aux_loss_coef": "float",
    "capacity_factor": "float",
    "rope_parameters": "dict",
}
_LLAMA_FIELDS = {
    "hidden_size": "int",
    "num_hidden_layers": "int",
    "num_attention_heads": "int",
    "num_key_value_heads": "int",
    "intermediate_size": "int",
    "vocab_size": "int",
    "max_position_embeddings": "int",
    "rms_norm_eps": "float",
    "tie_word_embeddings": "bool",
    "hidden_act": "choice",
    "rope_parameters": "dict",
}


def _wrong_value(rng: random.Random, kind: str):
    """A JSON value that a field of `kind` cannot take."""
    others = {
        "int": ["64", [64], {"n": 64}, 2.5, True, -rng.randint(1, 99)],
        "float": ["1e-5", [1e-5], float("nan"), float("inf"), -float("inf"), True],
        "bool": ["yes", 1, [True], {"on": True}],
        "choice": ["relu6", 7, [None], ""],
        "dict": ["rope", [1, 2], 3.5, True],
    }[kind]
    return rng.choice(others)


def bad_config(rng: random.Random, tmp: Path, sources: dict) -> tuple[list[str], str]:
    fmt = rng.choice(["native", "llama"])
    folder = _linked_copy(sources[fmt], tmp / fmt, skip="config.json")
    text = (sources[fmt] / "config.json").read_text()
    kind = rng.randrange(5)
    if kind == 0:  # the file cut short
        content = text[: rng.randrange(len(text) - 1)].encode()
    elif kind == 1:  # JSON, but not an object
        content = json.dumps(rng.choice([[1, 2], 3, "config", None, True, [json.loads(text)]])).encode()
    elif kind == 2:  # bytes that are not UTF-8 somewhere inside
        cut = rng.randrange(len(text))
        content = text[:cut].encode() + bytes([rng.randint(0x80, 0xFF)]) + text[cut:].encode()
    elif kind == 3:  # one field of the wrong type or out of its range
        fields = _NATIVE_FIELDS if fmt == "native" else _LLAMA_FIELDS
        field = rng.choice(sorted(fields))
        content = json.dumps({**json.loads(text), field: _wrong_value(rng, fields[field])}).encode()
    else:  # a size of the right type that the weights do not have
        config = json.loads(text)
        field = rng.choice(["hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"])
        # Fewer layers than a stock folder holds is what its own class loads too (the rest ignored): not bad there.
        low = config[field] + 1 if (fmt, field) == ("llama", "num_hidden_layers") else max(1, config[field] - 8)
        config[field] = rng.choice([v for v in range(low, config[field] + 9) if v != config[field]])
        content = json.dumps(config).encode()
    (folder / "config.json").write_bytes(content)
    return ["--init_from", str(folder)], (str(folder),)


def _header(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _with_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _broken_safetensors(rng: random.Random, blob: bytes) -> bytes:
    header, data = _header(blob)
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[name]
    kind = rng.randrange(7)
    if kind == 0:
        return blob[: rng.randrange(len(blob))]  # truncated anywhere, the header included
    if kind == 1:
        return struct.pack("<Q", rng.randrange(len(blob), 2**64)) + blob[8:]  # a header longer than the file
    if kind == 2:
        n = struct.unpack("<Q", blob[:8])[0]
        return blob[:8] + bytes(rng.randrange(256) for _ in range(n)) + data  # the header's JSON is noise
    if kind == 3:
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[begin, end + rng.randint(1, 64)], [end, begin], [begin, len(data) + 8]])
    elif kind == 4:
        entry["dtype"] = rng.choice(["F99", "float32", 7, None])
    elif kind == 5:
        entry["shape"] = rng.choice([[*entry["shape"], 2], [-1], "shape", [1.5]])
    else:
        return blob + bytes(rng.randint(1, 64))  # bytes after the last tensor
    return _with_header(header, data)


def _broken_index(rng: random.Random, folder: Path, blob: bytes) -> None:
    """`folder` as one shard and an index; the index is broken, or names what is not there."""
    shard = "model-00001-of-00001.safetensors"
    (folder / shard).write_bytes(blob)
    keys = sorted(k for k in _header(blob)[0] if k != "__metadata__")
    weight_map = dict.fromkeys(keys, shard)
    kind = rng.randrange(5)
    if kind == 0:
        text = json.dumps({"weight_map": weight_map})
        content = text[: rng.randrange(len(text) - 1)]
    elif kind == 1:
        content = json.dumps(rng.choice([{"metadata": {}}, {"weight_map": keys}, [weight_map], "index"]))
    elif kind == 2:
        content = json.dumps({"weight_map": {**weight_map, rng.choice(keys): rng.choice([3, None, [shard]])}})
    elif kind == 3:
        content = json.dumps({"weight_map": {**weight_map, rng.choice(keys): "model-00002-of-00002.safetensors"}})
    else:
        content = json.dumps({"weight_map": {**weight_map, "model.layers.99.extra.weight": shard}})
    (folder / "model.safetensors.index.json").write_text(content)


def bad_safetensors(rng: random.Random, tmp: Path, sources: dict) -> tuple[list[str], str]:
    fmt = rng.choice(["native", "llama"])
    folder = _linked_copy(sources[fmt], tmp / fmt, skip="model.safetensors")
    blob = (sources[fmt] / "model.safetensors").read_bytes()
    if rng.random() < 0.7:
        (folder / "model.safetensors").write_bytes(_broken_safetensors(rng, blob))
    else:
        _broken_index(rng, folder, blob)
    return ["--init_from", str(folder)], (str(folder),)


_STORIES = [s.strip() for s in (FIXTURES / "stories.txt").read_text().split("<|endoftext|>") if s.strip()][:60]


def _bad_record(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return json.dumps({rng.choice(["body", "Text", "content", ""]): rng.choice(_STORIES)})
    if kind == 1:
        return json.dumps({"text": rng.choice([5, 2.5, True, ["a story"], {"text": "nested"}])})
    if kind == 2:
        line = json.dumps({"text": rng.choice(_STORIES)})
        return line[: rng.randrange(1, len(line) - 1)]  # cut short
    if kind == 3:
        return json.dumps(rng.choice([[1], 7, "a story", None, True]))  # JSON, not a record
    if kind == 4:
        return "[" * rng.randint(10**4, 10**5)  # nested deeper than the parser follows
    return "".join(rng.choice("abcxyz {}:,\"'") for _ in range(rng.randint(1, 80))).replace("\n", " ") + "\x00"


def bad_jsonl(rng: random.Random, tmp: Path, sources: dict) -> tuple[list[str], str]:
    lines = [json.dumps({"text": s}) for s in rng.sample(_STORIES, rng.randint(1, 20))]
    lines.insert(rng.randint(0, len(lines)), _bad_record(rng))
    name = rng.choice(["train.jsonl", "train.json", "train.jsonl.gz"])
    if name == "train.json" and rng.random() < 0.5:  # one JSON array of the records
        content = f"[{', '.join(lines)}]".encode()
    else:
        content = ("\n".join(lines) + rng.choice(["", "\n"])).encode()
    if name.endswith(".gz"):
        content = gzip.compress(content)
        if rng.random() < 0.3:
            content = content[: rng.randrange(len(content) - 1)]  # the gzip stream cut short, whatever the lines
    path = tmp / name
    path.write_bytes(content)
    return [
        "--train_file",
        str(path),
        "--valid_file",
        str(FIXTURES / "stories_valid.txt"),
        "--tokenizer",
        "train:512",
    ], (str(path),)


GENERATORS = (bad_flag, bad_config, bad_safetensors, bad_jsonl)


def outcome(argv: list[str], out: Path) -> tuple[str | None, str]:
    """(None, the refusal) when the planner refused `argv` as it should: one line of a refusal type, nothing
    written; else (what went wrong, "")."""
    try:
        plan_run(*parse_args([*argv, "--output_dir", str(out)]))
    except PLAN_ERRORS as e:
        if "\n" in str(e):
            return f"a refusal of more than one line: {e!r}", ""
        return (None, str(e)) if not out.exists() else (f"refused, but {out} was written", "")
    except Exception as e:  # noqa: BLE001 - any other exception is what this test looks for
        return f"{type(e).__name__}: {e}", ""
    return "accepted", ""


def test_the_planner_refuses_every_malformed_input_with_one_line(sources, tmp_path, capsys):
    assert outcome([*DATA_ARGS], tmp_path / "sanity")[0] == "accepted"  # the base every case breaks is valid
    failures, start = [], time.perf_counter()
    for seed in range(CASES):
        rng = random.Random(seed)
        generate = GENERATORS[seed % len(GENERATORS)]
        case = tmp_path / f"case{seed}"
        case.mkdir()
        args, names = generate(rng, case, sources)
        problem, message = outcome([*([] if generate is bad_jsonl else DATA_ARGS), *args], case / "run")
        if problem is None and not any(name in message for name in names):
            problem = f"the refusal names none of {names}: {message}"
        if problem:
            failures.append(f"seed {seed} ({generate.__name__}, {[a[:80] for a in args]}): {problem}")
        shutil.rmtree(case)
    seconds = time.perf_counter() - start
    capsys.readouterr()  # the planner's warnings (a capped --num_proc)
    with capsys.disabled():
        print(
            f"\nfuzz: {CASES} seeded cases in {seconds:.1f} s ({1000 * seconds / CASES:.0f} ms each), "
            f"{len(failures)} failed"
        )
    assert not failures, "\n".join(failures[:20])
