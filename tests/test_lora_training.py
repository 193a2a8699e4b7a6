"""LoRA through the real entry points: EP 2 x ETP 2 on 4 CPU ranks trains the adapters one process trains, with the
base bitwise unchanged and no optimizer state for it; a resume at EP 2 on 2 ranks continues; the export folds the
adapters; bad LoRA input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from launcher import DATA_ARGS, ROOT, TRAIN, check, deepspeed, metrics, python, truncate_run
from safetensors.torch import load_file

from moe_dist.checkpoint.formats import load_hf_state_dict, load_zero_shard, zero_shards
from moe_dist.convert.sources import AdaptedSource
from moe_dist.export.cli import main as export_main
from moe_dist.model.configuration import MoEConfig
from moe_dist.model.lora import TARGETS, LoRAConfig, adapter_parameters, apply_lora, fold_adapters, init_adapters
from moe_dist.model.modeling import MoEForCausalLM
from moe_dist.train.cli import main
from moe_dist.train.plan import lora_targets_of

CPU_ETP = ROOT / "ds_configs" / "cpu_ep2_etp2.json"  # micro-batch 4 per rank, ZeRO-2: a global batch of 16
STEPS = 10
# lr 5e-4: at 1e-3 one expert's down_proj A ended 1.05e-5 from one process (measured), fp32 sums in another order
# blown up by Adam in a near-zero gradient; the losses agreed within 1e-5 either way.
LORA = ["--lora_rank", "4", "--lora_alpha", "8"]
ARGS = [
    "--model",
    "tiny-moe",
    *DATA_ARGS,
    "--seq_len",
    "32",
    "--max_valid_blocks",
    "16",
    "--max_steps",
    str(STEPS),
    "--eval_every",
    "100",
    "--save_every",
    "5",
    "--log_every",
    "1",
    "--lr",
    "5e-4",
    "--warmup_steps",
    "0",
    "--min_lr_ratio",
    "1.0",
    *LORA,
]


def _ds(tmp_path, **changes) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**json.loads(CPU_ETP.read_text()), **changes}))
    return str(path)


def _adapters(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same global batch on one process: micro-batch 4 x accumulation 4 (one micro-batch per rank of EP 2 x
    ETP 2), so the per-micro-batch capacity and aux loss agree."""
    tmp = tmp_path_factory.mktemp("one_process")
    ds = _ds(tmp, gradient_accumulation_steps=4, moe={"ep_size": 1})
    check(python(TRAIN, ["--deepspeed", ds, *ARGS, "--output_dir", str(tmp / "run")], timeout=600))
    return tmp / "run"


@pytest.fixture(scope="module")
def ep2_etp2(tmp_path_factory):
    run = tmp_path_factory.mktemp("ep2_etp2") / "run"
    check(deepspeed(TRAIN, ["--deepspeed", str(CPU_ETP), *ARGS, "--output_dir", str(run)], ranks=4, timeout=600))
    return run


def _step(run, step: int):
    return run / "checkpoints" / f"step{step:08d}"


@pytest.mark.multirank
def test_ep2_etp2_trains_the_adapters_of_one_process(one_process, ep2_etp2):
    a, b = metrics(one_process), metrics(ep2_etp2)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert all(abs(a[s]["loss"] - b[s]["loss"]) <= 1e-5 for s in b), [(a[s]["loss"], b[s]["loss"]) for s in b]
    want, got = (_adapters(load_hf_state_dict(_step(r, STEPS))) for r in (one_process, ep2_etp2))
    assert want.keys() == got.keys() and any(".experts.7.down_proj.lora_B" in k for k in got)
    assert all((want[k] - got[k]).abs().max() <= 1e-5 for k in want)
    assert all(got[k].abs().max() > 0 for k in got if k.endswith("lora_B"))  # every adapter trained
    # The run's hf/ holds the folded weights, the same from both layouts.
    hf_a, hf_b = (load_file(r / "hf" / "model.safetensors") for r in (one_process, ep2_etp2))
    assert hf_a.keys() == hf_b.keys() and not _adapters(hf_b)
    assert all((hf_a[k] - hf_b[k]).abs().max() <= 1e-5 for k in hf_a)


@pytest.mark.multirank
def test_the_base_is_bitwise_unchanged_and_has_no_optimizer_state(ep2_etp2):
    ckpt = _step(ep2_etp2, STEPS)
    state = load_hf_state_dict(ckpt)
    transformers.set_seed(0)  # the trainer's init: --seed 0 on every rank
    start = MoEForCausalLM(MoEConfig.from_pretrained(ckpt)).state_dict()
    trained = {k for k in state if k.endswith((".lora_A", ".lora_B", ".router.weight"))}
    assert set(state) - trained <= set(start)
    assert all(torch.equal(state[k], start[k]) for k in set(state) - trained)
    assert all(not torch.equal(state[k], start[k]) for k in state if k.endswith(".router.weight"))
    # ZeRO-2 partitions what the optimizer holds: the adapters and the routers, nothing of the base.
    held = {name for shard in zero_shards(ckpt) for m in load_zero_shard(shard)["param_slice_mappings"] for name in m}
    assert held and all(n.endswith((".lora_A", ".lora_B", ".router.weight")) for n in held), sorted(held)[:5]
    exported = load_file(ep2_etp2 / "hf" / "model.safetensors")
    folded = fold_adapters(state, 8 / 4)
    assert all(torch.equal(exported[k], folded[k]) for k in exported)


@pytest.mark.multirank
def test_a_resume_at_ep2_on_2_ranks_continues_as_one_process(one_process, ep2_etp2, tmp_path):
    """ETP 2 -> 1 on another world size goes through the portable state (slices joined, Adam moments of the
    adapters carried); 2 ranks x micro-batch 4 x accumulation 2 keep the global batch."""
    run = tmp_path / "run"
    truncate_run(ep2_etp2, run, keep_step=5)
    ds = _ds(tmp_path, gradient_accumulation_steps=2, moe={"ep_size": 2})
    proc = check(deepspeed(TRAIN, ["--deepspeed", ds, *ARGS, "--output_dir", str(run)], ranks=2, timeout=600))
    assert "resharded step00000005" in proc.stderr and "optimizer state carried over" in proc.stderr
    a, b = metrics(one_process), metrics(run)
    assert all(abs(a[s]["loss"] - b[s]["loss"]) <= 1e-5 for s in range(6, STEPS + 1))
    want, got = (_adapters(load_hf_state_dict(_step(r, STEPS))) for r in (one_process, run))
    assert want.keys() == got.keys() and all((want[k] - got[k]).abs().max() <= 1e-5 for k in want)


def test_adapters_start_alike_built_in_memory_or_filled_after_sharding():
    """`--init_from` builds on the meta device and fills after sharding: each factor still starts from (seed, its
    key), as in a model built in memory, whatever the build order."""
    config = MoEConfig.from_preset("tiny-moe", vocab_size=128, num_shared_experts=1, skip_first_moe=1)
    torch.manual_seed(1)
    whole = apply_lora(MoEForCausalLM(config), LoRAConfig(rank=4, alpha=8.0))
    init_adapters(whole, seed=3)
    base = {k: v for k, v in whole.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}

    class Base:
        has, read = base.__contains__, base.__getitem__

    with torch.device("meta"):
        filled = apply_lora(MoEForCausalLM(config), LoRAConfig(rank=4, alpha=8.0))
    filled.load_weights(AdaptedSource(Base(), {n: p.shape for n, p in adapter_parameters(filled)}, seed=3))
    got = dict(adapter_parameters(filled))
    assert len(got) > 50 and all(torch.equal(p, got[n]) for n, p in adapter_parameters(whole))
    assert (
        len({float(p[0, 0].detach()) for n, p in got.items() if n.endswith("lora_A")}) == len(got) // 2
    )  # no two alike


def _refused(capsys, argv: list[str], run) -> str:
    before = sorted(p.relative_to(run) for p in run.rglob("*")) if run.exists() else None
    code = main([*argv, "--output_dir", str(run)])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(errors) == 1, errors
    assert (sorted(p.relative_to(run) for p in run.rglob("*")) if run.exists() else None) == before
    return errors[0]


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--lora_rank", "0"], "--lora_rank=0 is invalid: must be >= 1"),
        (["--lora_rank", "-3"], "--lora_rank=-3 is invalid: must be >= 1"),
        (["--lora_rank", "4", "--lora_targets", "experts,router"], "--lora_targets='experts,router' is invalid"),
        (["--lora_alpha", "16"], "--lora_alpha: LoRA needs --lora_rank"),
        (["--lora_rank", "4", "--lora_dropout", "1"], "--lora_dropout=1 is invalid: must be in [0, 1)"),
        (["--lora_rank", "4", "--lora_targets", "mlp"], "it has nothing for mlp; valid targets here are attention"),
    ],
)
def test_bad_lora_flags_are_one_line_before_any_work(capsys, tmp_path, flags, expected):
    error = _refused(capsys, ["--model", "tiny-moe", "--max_steps", "1", *flags], tmp_path / "run")
    assert expected in error, error
    assert "valid" in error or "needs" in error or "must be" in error


def test_lora_on_a_run_without_it_and_a_changed_rank_are_refused(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    record = {"engine": "accelerate", "preset": "tiny-moe", "model_config": MoEConfig.from_preset("tiny-moe").to_dict()}
    (run / "run.json").write_text(json.dumps(record))  # a record from before LoRA: full fine-tuning
    error = _refused(capsys, ["--model", "tiny-moe", "--max_steps", "1", *LORA], run)
    assert "trained without LoRA" in error and "asks with LoRA rank 4" in error, error
    (run / "run.json").write_text(json.dumps({**record, "lora": LoRAConfig(rank=8, alpha=8.0).record()}))
    error = _refused(capsys, ["--model", "tiny-moe", "--max_steps", "1", *LORA], run)
    assert "with LoRA rank 8" in error and "the same --lora_* flags" in error, error


@pytest.mark.multirank
def test_export_needs_merge_for_a_lora_run_and_refuses_it_without_one(capsys, one_process, tmp_path):
    ckpt = _step(one_process, STEPS)
    assert export_main([str(ckpt), str(tmp_path / "a")]) == 2 and not (tmp_path / "a").exists()
    assert "--merge" in capsys.readouterr().err
    plain = tmp_path / "plain"
    shutil.copytree(ckpt, plain)
    (plain / "lora.json").unlink()
    assert export_main([str(plain), str(tmp_path / "b"), "--merge"]) == 2 and not (tmp_path / "b").exists()
    assert "holds no LoRA adapters" in capsys.readouterr().err
    assert export_main([str(ckpt), str(tmp_path / "c"), "--merge", "--dtype", "bf16"]) == 0
    folded = fold_adapters(load_hf_state_dict(ckpt), 8 / 4)
    got = load_file(tmp_path / "c" / "model.safetensors")
    assert all(torch.equal(got[k], folded[k].to(got[k].dtype)) for k in got)  # folded in fp32, then rounded


@pytest.mark.multirank
def test_experts_only_with_a_frozen_router_trains_under_deepspeed(tmp_path):
    """No trainable non-expert parameter: DeepSpeed drops the empty groups from the optimizer, and the schedule
    must have been built without them too. The routers stay bitwise as they started."""
    run = tmp_path / "run"
    args = [*ARGS, "--max_steps", "2", "--save_every", "2", "--lora_targets", "experts", "--freeze_router", "true"]
    check(python(TRAIN, ["--deepspeed", _ds(tmp_path, moe={"ep_size": 1}), *args, "--output_dir", str(run)]))
    state = load_hf_state_dict(_step(run, 2))
    transformers.set_seed(0)
    start = MoEForCausalLM(MoEConfig.from_pretrained(_step(run, 2))).state_dict()
    assert all(torch.equal(state[k], start[k]) for k in state if not k.endswith((".lora_A", ".lora_B")))
    assert all(".experts." in k for k in _adapters(state))


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["etp2-2ranks", "accelerate"])
def test_etp2_and_accelerate_train_the_adapters_of_one_process(one_process, tmp_path, layout):
    """EP 1 x ETP 2 on 2 ranks (accumulation 2), and the accelerate engine on one process (micro-batch 4 x
    accumulation 4, capacity 1.0 as the DeepSpeed path routes): the losses and adapters of one DeepSpeed process."""
    run = tmp_path / "run"
    if layout == "accelerate":
        engine = ["--micro_batch_size", "4", "--grad_accum", "4", "--capacity_factor", "1.0"]
        check(python(TRAIN, [*ARGS, *engine, "--output_dir", str(run)], timeout=600))
    else:
        ds = _ds(tmp_path, gradient_accumulation_steps=2, moe={"ep_size": 1, "etp_size": 2})
        check(deepspeed(TRAIN, ["--deepspeed", ds, *ARGS, "--output_dir", str(run)], ranks=2, timeout=600))
    a, b = metrics(one_process), metrics(run)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert all(abs(a[s]["loss"] - b[s]["loss"]) <= 1e-5 for s in b), [(a[s]["loss"], b[s]["loss"]) for s in b]
    want, got = (_adapters(load_hf_state_dict(_step(r, STEPS))) for r in (one_process, run))
    assert want.keys() == got.keys() and all((want[k] - got[k]).abs().max() <= 1e-5 for k in want)


@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("tiny-moe", {}),
        ("tiny-moe", dict(num_shared_experts=1, skip_first_moe=1)),
        ("tiny-modern", dict(moe_every=2)),
        ("tiny-dense", {}),
        ("ernie-tiny", {}),
    ],
)
def test_the_planner_names_the_targets_apply_lora_finds(preset, overrides):
    config = MoEConfig.from_preset(preset, **overrides)
    found = []
    for target in TARGETS:
        with torch.device("meta"):
            model = apply_lora(MoEForCausalLM(config), LoRAConfig(rank=1, alpha=1.0, targets=(target,)))
        found += [target] if any(True for _ in adapter_parameters(model)) else []
    assert lora_targets_of(config) == tuple(found)
