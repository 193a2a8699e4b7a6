"""Checkpoint -> a folder the stock transformers class loads with no custom code, checked for exactness.

Order, so that a refusal leaves nothing behind: read the checkpoint, refuse a config the class cannot
represent (`standard.unrepresentable`), map the weights to the class's on-disk names and layouts
(`standard_keys.key_pairs`, the table `--init_from` reads the other way), compute our fp32 reference logits,
then write into a staging folder beside OUT: config, weights (sharded as `save_pretrained` shards them,
`shard_writer`), tokenizer, generation_config.json, and the fp32 logits check in a fresh interpreter
(`stock_logits.py`, which also refuses a missing or unexpected weight). Only when the check passes is the model
card written and the folder swapped in for OUT (`native.write_export_dir`).

The weights are read a decoder layer at a time (`reader.CheckpointReader`), for the reference (our model's own
forward with one layer in memory at a time, `convert.stock_import.streamed_logits`) as for the shards
(`shard_writer`, a tensor at a time), so no step holds the whole model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import GenerationConfig

from ..checkpoint.formats import ExportError
from ..convert.standard import CLASS_NAMES, MOE_FORMATS, TOLERANCE, standard_config, unrepresentable
from ..convert.standard_keys import Pair, key_pairs
from ..convert.stock_import import streamed_logits
from ..model.configuration import MoEConfig
from ..model.modeling import MoEForCausalLM
from .card import model_card
from .native import DTYPES, MAX_SHARD_SIZE, check_export_dir, read_config, shard_size, write_export_dir
from .reader import CheckpointReader
from .shard_writer import Planned, write_shards

_STOCK_LOGITS = Path(__file__).with_name("stock_logits.py")


def export_standard(
    ckpt: str | Path,
    out_dir: str | Path,
    fmt: str,
    *,
    tokenizer_dir: str | Path | None = None,
    dtype: str = "fp32",
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> float:
    """Write `out_dir` loadable by the stock class of `fmt`; returns the measured max |logit difference|."""
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    check_export_dir(out_dir)
    ours_config = read_config(ckpt)
    reason = unrepresentable(ours_config, fmt)
    if reason is not None:
        raise ExportError(reason)
    reader = CheckpointReader(ckpt, ours_config, DTYPES[dtype])
    with torch.device("meta"):
        model = MoEForCausalLM(ours_config).to(DTYPES[dtype])  # shapes and counts only: the weights stream
    _check_selection_bias(reader, model, fmt)
    pairs, tensors = disk_plan(model, fmt)
    config = standard_config(ours_config, fmt)
    config.architectures, config.dtype = [CLASS_NAMES[fmt]], model.dtype
    tokenizer = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = torch.randint(
        ours_config.vocab_size,
        (2, min(16, ours_config.max_position_embeddings)),
        generator=torch.Generator().manual_seed(0),
    )
    try:  # our model on exactly the exported weights (a bf16 export: the rounded ones), computed in fp32
        ours = streamed_logits(ours_config, reader, ids)
    except ValueError as e:
        raise ExportError(f"{ckpt}: weights do not match its config.json ({e})") from None
    diff = float("nan")

    def write(staging: Path) -> None:
        nonlocal diff
        staging.mkdir(parents=True)
        config.save_pretrained(staging)
        _generation_config(ours_config, tokenizer, tokenizer_dir).save_pretrained(staging)
        write_shards(tensors, staging, shard_size(str(max_shard_size)), lambda t: pairs[t.name].read(reader))
        reader.close()
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        diff = stock_logits_diff(staging, CLASS_NAMES[fmt], ids, ours)
        if not diff <= TOLERANCE:  # also refuses NaN
            raise ExportError(
                f"{CLASS_NAMES[fmt]} does not reproduce the model: max |logit difference| "
                f"{diff:.3g} > {TOLERANCE:g} in fp32; export with --format native"
            )
        (staging / "README.md").write_text(model_card(ckpt, model, fmt, CLASS_NAMES[fmt], diff))

    write_export_dir(out_dir, write)
    return diff


def _check_selection_bias(reader: CheckpointReader, model: MoEForCausalLM, fmt: str) -> None:
    """Refuse a non-zero aux-loss-free selection bias for a class that has no place for it."""
    if fmt not in MOE_FORMATS or fmt == "ernie4_5_moe":
        return
    for name in model.state_dict():
        if name.endswith(".router.score_bias") and reader.has(name) and bool(reader.read(name).any()):
            raise ExportError(
                f"{name} is non-zero (an aux-loss-free selection bias) and cannot be exported "
                f"as {fmt}; formats that represent it: ernie4_5_moe, native"
            )
    reader.close()


class _DiskTensor:
    """One tensor of the stock class's on-disk layout: made from ours by its pair's transform."""

    def __init__(self, pair: Pair, dtype: torch.dtype):
        self.pair, self.dtype = pair, dtype

    def make(self, ours: list[torch.Tensor]) -> torch.Tensor:
        tensor = self.pair.to_disk(ours)
        return (tensor.to(self.dtype) if not self.pair.ours else tensor).contiguous()

    def read(self, reader: CheckpointReader) -> torch.Tensor:
        return self.make([reader.read(k) for k in self.pair.ours])


def disk_plan(model: MoEForCausalLM, fmt: str) -> tuple[dict[str, _DiskTensor], list[Planned]]:
    """Our weights under the stock class's on-disk names and layouts: each disk tensor's transform, with its dtype
    and shape found by running the transform on `model`'s meta tensors (in the export dtype)."""
    state = model.state_dict()
    pairs = {pair.disk: _DiskTensor(pair, model.dtype) for pair in key_pairs(model.config, fmt)}
    planned = []
    for disk, tensor in pairs.items():
        shaped = tensor.make([state[k] for k in tensor.pair.ours])
        planned.append(Planned(disk, shaped.dtype, tuple(shaped.shape)))
    return pairs, planned


def _generation_config(config: MoEConfig, tokenizer, tokenizer_dir) -> GenerationConfig:
    # The started-from folder's settings (stop-id lists, sampling defaults), kept beside the run's tokenizer.
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(tokenizer_dir)
    # Else the tokenizer's special tokens win: they are what `generate` must stop on.
    source = tokenizer if tokenizer is not None else config
    return GenerationConfig(
        bos_token_id=source.bos_token_id, eos_token_id=source.eos_token_id, pad_token_id=source.pad_token_id
    )


def without_moe_dist(environ: dict) -> dict:
    """`environ` for a process that loads an export as a user without our package would: PYTHONPATH keeps
    only the entries that hold no `moe_dist`. The others stay: on the lent GPU machine transformers itself
    comes from a wheel kit on PYTHONPATH (tools/gpu_run.sh), and the image's own release is older."""
    env = {k: v for k, v in environ.items() if k != "PYTHONPATH"}
    keep = [
        str(Path(p).resolve())
        for p in environ.get("PYTHONPATH", "").split(os.pathsep)
        if p and not (Path(p) / "moe_dist" / "__init__.py").exists()
    ]
    if keep:
        env["PYTHONPATH"] = os.pathsep.join(keep)
    return env


def stock_logits_diff(folder: Path, class_name: str, ids: torch.Tensor, ours: torch.Tensor) -> float:
    """Max |logits(stock class, fresh interpreter) - ours| on `ids`."""
    with tempfile.TemporaryDirectory() as tmp:
        ids_path, logits_path = Path(tmp) / "ids.pt", Path(tmp) / "logits.pt"
        torch.save(ids, ids_path)
        # -s: no user site; an empty working folder, offline, and no PYTHONPATH entry that holds moe_dist.
        # stock_logits.py fails if moe_dist got imported.
        env = without_moe_dist(os.environ)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        # Absolute: the check runs in another folder, where a relative OUT would read as a hub name.
        proc = subprocess.run(
            [
                sys.executable,
                "-s",
                str(_STOCK_LOGITS),
                str(Path(folder).resolve()),
                class_name,
                str(ids_path),
                str(logits_path),
            ],
            check=False,
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ExportError(f"the stock {class_name} cannot load the export (exit {proc.returncode}): {last}")
        theirs = torch.load(logits_path, weights_only=True)
    return (theirs - ours).abs().max().item()
