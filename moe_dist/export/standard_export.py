"""Checkpoint -> a folder the stock transformers class loads with no custom code, checked for exactness.

Order, so that a refusal leaves nothing behind: read the checkpoint, refuse a config the class cannot
represent (`standard.unrepresentable`), map the weights to the class's on-disk names and layouts
(`standard_keys.key_pairs`, the table `--init_from` reads the other way), then write into a staging folder
beside OUT: config, weights (sharded as `save_pretrained` shards them, `native.save_sharded`), tokenizer,
generation_config.json, and the fp32 logits check in a fresh interpreter (`stock_logits.py`, which also
refuses a missing or unexpected weight). Only when the check passes is the model card written and the folder
swapped in for OUT (`native.write_export_dir`).
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
from ..convert.standard_keys import key_pairs
from ..model.modeling import MoEForCausalLM
from .card import model_card
from .native import MAX_SHARD_SIZE, build_model, check_export_dir, save_sharded, shard_size, write_export_dir

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
    model = build_model(ckpt, dtype)
    reason = unrepresentable(model.config, fmt)
    if reason is not None:
        raise ExportError(reason)
    tensors = disk_state(model, fmt)
    config = standard_config(model.config, fmt)
    config.architectures, config.dtype = [CLASS_NAMES[fmt]], model.dtype
    tokenizer = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = torch.randint(
        model.config.vocab_size,
        (2, min(16, model.config.max_position_embeddings)),
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        ours = _fp32_reference(model)(input_ids=ids, use_cache=False).logits
    diff = float("nan")

    def write(staging: Path) -> None:
        nonlocal diff
        staging.mkdir(parents=True)
        config.save_pretrained(staging)
        _generation_config(model, tokenizer, tokenizer_dir).save_pretrained(staging)
        save_sharded(tensors, staging, shard_size(str(max_shard_size)))
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


def disk_state(model: MoEForCausalLM, fmt: str) -> dict[str, torch.Tensor]:
    """Our weights under the stock class's on-disk names and layouts; a weight it has no place for must be zero."""
    state = model.state_dict()
    if fmt in MOE_FORMATS and fmt != "ernie4_5_moe":
        nonzero = [k for k, v in state.items() if k.endswith(".router.score_bias") and bool(v.any())]
        if nonzero:
            raise ExportError(
                f"{nonzero[0]} is non-zero (an aux-loss-free selection bias) and cannot be exported "
                f"as {fmt}; formats that represent it: ernie4_5_moe, native"
            )
    out = {}
    for pair in key_pairs(model.config, fmt):
        tensor = pair.to_disk([state[k] for k in pair.ours])
        out[pair.disk] = (tensor.to(model.dtype) if not pair.ours else tensor).contiguous()
    return out


def _fp32_reference(model: MoEForCausalLM) -> MoEForCausalLM:
    """Our model on exactly the exported weights (a bf16 export: the rounded ones), computed in fp32.

    Rebuilt rather than cast: casting to bf16 also rounded the RoPE frequencies (a buffer, not exported),
    which the stock class recomputes in fp32.
    """
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return model
    reference = MoEForCausalLM(model.config)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=True)
    return reference.eval()


def _generation_config(model: MoEForCausalLM, tokenizer, tokenizer_dir) -> GenerationConfig:
    # The started-from folder's settings (stop-id lists, sampling defaults), kept beside the run's tokenizer.
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(tokenizer_dir)
    # Else the tokenizer's special tokens win: they are what `generate` must stop on.
    source = tokenizer if tokenizer is not None else model.config
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
