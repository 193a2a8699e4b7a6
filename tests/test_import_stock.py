"""`--init_from` a stock transformers folder: every supported class is converted exactly, and what
cannot be is refused with one line before anything is built or written.

Each class is built from a small random config (tests/stock_models.py) and saved as a downloaded folder
looks. The converted model must give the stock class's fp32 logits (1e-4), the same greedy tokens, and, for
the MoE classes, the same training loss on a batch (dropless routing, router losses off): the loss our first
step trains on.
"""

import json
import shutil

import pytest
import torch
from launcher import DATA_ARGS
from stock_models import save_stock, tokenizer_for_tests

from moe_dist import MoEConfig
from moe_dist.convert.standard import MOE_FORMATS, STANDARD_FORMATS, standard_config
from moe_dist.convert.stock_import import check_import, converted_model, read_init_config
from moe_dist.train.cli import main as train_main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    tokenizer = tokenizer_for_tests(root / "tokenizer")
    return {fmt: save_stock(fmt, root / fmt, tokenizer) for fmt in STANDARD_FORMATS}


def load(folder):
    from transformers import AutoModelForCausalLM

    init = read_init_config(folder)
    config = MoEConfig(**init.fields)
    return (
        init,
        config,
        converted_model(init, config),
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
    )


def batch(vocab: int) -> torch.Tensor:
    return torch.randint(vocab, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("fmt", STANDARD_FORMATS)
def test_import_gives_the_stock_logits_and_greedy_tokens(folders, fmt):
    init, config, ours, stock = load(folders[fmt])
    assert init.fmt == fmt
    assert check_import(init, config) <= 1e-4
    ids = batch(config.vocab_size)
    with torch.no_grad():
        diff = ours(input_ids=ids, use_cache=False).logits - stock.eval()(input_ids=ids, use_cache=False).logits
    assert diff.abs().max() <= 1e-4
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(ours.generate(ids[:1, :8], **kwargs), stock.generate(ids[:1, :8], **kwargs))


def test_what_each_class_brings_is_carried_into_our_config(folders):
    fields = {fmt: read_init_config(folders[fmt]).fields for fmt in STANDARD_FORMATS}
    assert fields["gpt2"]["tie_word_embeddings"] and fields["llama"]["tie_word_embeddings"]
    assert fields["llama"]["rope_parameters"]["rope_type"] == "llama3"
    assert fields["qwen3"]["qk_norm"] == "head" and fields["qwen3"]["head_dim"] == 32
    assert fields["olmoe"]["qk_norm"] == "projection" and fields["olmoe"]["clip_qkv"] == 0.5
    assert fields["qwen3_moe"]["mlp_only_layers"] == [0] and not fields["qwen3_moe"]["norm_topk_prob"]
    assert fields["ernie4_5_moe"]["skip_first_moe"] == 1 and fields["ernie4_5_moe"]["num_shared_experts"] == 1
    for fmt in MOE_FORMATS:  # released MoEs route without capacity
        assert fields[fmt]["capacity_factor"] is None and fields[fmt]["num_local_experts"] == 4


@pytest.mark.parametrize("fmt", MOE_FORMATS)
def test_the_training_loss_of_the_imported_moe_is_the_stock_loss(folders, fmt):
    _, config, ours, stock = load(folders[fmt])
    ids = batch(config.vocab_size)
    ours.train()
    stock.train()
    assert ours(input_ids=ids, labels=ids).aux_loss == 0  # router losses off, as in the stock config
    torch.testing.assert_close(
        ours(input_ids=ids, labels=ids).loss, stock(input_ids=ids, labels=ids).loss, rtol=0, atol=1e-5
    )


# The released coefficients: Mixtral-8x7B, Qwen3-30B-A3B, OLMoE-1B-7B; ERNIE 4.5's is transformers' default.
RELEASED_AUX_COEF = {"mixtral": 0.02, "qwen3_moe": 0.001, "olmoe": 0.01, "ernie4_5_moe": 0.001}


@pytest.mark.parametrize("output_router_logits", [False, True])
@pytest.mark.parametrize("fmt", MOE_FORMATS)
def test_the_training_loss_is_the_stock_loss_with_the_released_router_loss(
    folders, tmp_path, fmt, output_router_logits
):
    """Released configs say output_router_logits: false (no balancing loss); true adds the stock formula, pooled
    over the layers, at the coefficient. Ours follows the folder; --router_aux_loss per_layer keeps our own."""
    folder = edited(
        folders, tmp_path, fmt, router_aux_loss_coef=RELEASED_AUX_COEF[fmt], output_router_logits=output_router_logits
    )
    _, config, ours, stock = load(folder)
    assert config.router_aux_loss == ("stock" if output_router_logits else "none")
    assert standard_config(config, fmt).output_router_logits == output_router_logits  # and back, on export
    ids = batch(config.vocab_size)
    ours.train()
    stock.train()
    theirs = stock(input_ids=ids, labels=ids)
    assert (theirs.aux_loss is not None) == output_router_logits
    assert (ours(input_ids=ids, labels=ids).aux_loss > 0) == output_router_logits
    torch.testing.assert_close(ours(input_ids=ids, labels=ids).loss, theirs.loss, rtol=0, atol=1e-5)
    # --router_aux_loss per_layer: ours, each layer's Switch loss summed
    per_layer = converted_model(
        read_init_config(folder), MoEConfig(**{**config.to_dict(), "router_aux_loss": "per_layer"})
    )
    aux = per_layer.train()(input_ids=ids, labels=ids).aux_loss
    layers = sum(stats["aux_loss"] for stats in per_layer.routing_stats().values())
    torch.testing.assert_close(aux, RELEASED_AUX_COEF[fmt] * layers)


def edited(folders, tmp_path, fmt: str, **changes):
    """A copy of the `fmt` folder with config.json fields changed."""
    folder = tmp_path / f"{fmt}-edited"
    shutil.copytree(folders[fmt], folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "fmt, changes, expected",
    [
        ("mixtral", {"sliding_window": 16}, "MixtralForCausalLM field sliding_window=16"),
        ("qwen3", {"use_sliding_window": True}, "Qwen3ForCausalLM field use_sliding_window=True"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
            "field rope_parameters.rope_type='dynamic'",
        ),
        ("llama", {"attention_bias": True}, "field attention_bias=True (with mlp_bias=False"),
        ("gpt2", {"activation_function": "relu"}, "GPT2LMHeadModel field activation_function='relu'"),
        ("ernie4_5_moe", {"use_bias": True}, "Ernie4_5_MoeForCausalLM field use_bias=True"),
        ("qwen3_moe", {"model_type": "deepseek_v3"}, "model_type='deepseek_v3' is not supported; supported: moe_dist"),
    ],
)
def test_a_field_our_model_cannot_reproduce_is_refused_with_one_line(folders, tmp_path, capsys, fmt, changes, expected):
    folder = edited(folders, tmp_path, fmt, **changes)
    out = tmp_path / "run"
    assert train_main([*DATA_ARGS, "--init_from", str(folder), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --init_from ") and expected in err[0], err
    assert not out.exists()


def test_a_checkpoint_without_safetensors_or_a_new_shape_is_refused(folders, tmp_path, capsys):
    folder = edited(folders, tmp_path, "olmoe")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert train_main([*DATA_ARGS, "--init_from", str(folder), "--output_dir", str(tmp_path / "a")]) == 2
    assert "only safetensors checkpoints are read" in capsys.readouterr().err
    assert (
        train_main(
            [
                *DATA_ARGS,
                "--init_from",
                str(folders["olmoe"]),
                "--num_experts",
                "8",
                "--output_dir",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert "cannot change the model's shape (['num_local_experts'])" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_released_gpt2_layout_imports(folders, tmp_path):
    """The `gpt2` folder people download was saved from the base model: no `transformer.` prefix, the causal
    masks `h.N.attn.bias` stored as tensors, and no `lm_head` (tied)."""
    from safetensors.torch import load_file, save_file

    folder = edited(folders, tmp_path, "gpt2")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    config = json.loads((folder / "config.json").read_text())
    n = config["n_positions"]
    for i in range(config["n_layer"]):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    assert "wte.weight" in tensors and not any(k.startswith(("transformer.", "lm_head")) for k in tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    init = read_init_config(folder)
    assert check_import(init, MoEConfig(**init.fields)) <= 1e-4


def test_a_run_recorded_before_the_router_loss_form_resumes_with_the_per_layer_loss(folders, tmp_path):
    from moe_dist.train.args import parse_args
    from moe_dist.train.plan import RUN_RECORD, check_run_folder, plan_run, run_record

    folder = edited(folders, tmp_path, "mixtral", router_aux_loss_coef=0.02)
    args = [*DATA_ARGS, "--init_from", str(folder), "--output_dir", str(tmp_path / "run")]
    plan = plan_run(*parse_args(args))
    assert plan.model_config.router_aux_loss == "none"  # a fresh import: the stock class's semantics
    record = run_record(plan, plan.model_config)
    assert record["model_config"]["router_aux_loss"] == "none"
    del record["model_config"]["router_aux_loss"]  # as run.json was written before the field
    plan.run_dir.mkdir()
    (plan.run_dir / RUN_RECORD).write_text(json.dumps(record))
    resumed = plan_run(*parse_args(args))
    assert resumed.model_config.router_aux_loss == "per_layer"
    check_run_folder(resumed, resumed.model_config)


def merges_only(folders, tmp_path):
    """The llama folder with its tokenizer as a BPE vocabulary and merges (vocab.json, merges.txt) only."""
    from transformers import AutoTokenizer

    folder = edited(folders, tmp_path, "llama")
    original = AutoTokenizer.from_pretrained(folder)
    (folder / "tokenizer.json").unlink()
    original.backend_tokenizer.model.save(str(folder))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "GPT2Tokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, original


def test_a_folder_whose_tokenizer_is_a_vocabulary_and_merges_trains_with_it(folders, tmp_path):
    from transformers import AutoTokenizer

    from moe_dist.train.args import parse_args
    from moe_dist.train.plan import plan_run

    folder, original = merges_only(folders, tmp_path)
    assert {"vocab.json", "merges.txt"} <= {p.name for p in folder.iterdir()} and not (
        folder / "tokenizer.json"
    ).exists()
    plan = plan_run(*parse_args([*DATA_ARGS[:4], "--init_from", str(folder), "--output_dir", str(tmp_path / "run")]))
    assert plan.data.tokenizer == str(folder)
    text = "Once upon a time there was a little dog."
    assert AutoTokenizer.from_pretrained(plan.data.tokenizer)(text)["input_ids"] == original(text)["input_ids"]


def sentencepiece_only(folders, tmp_path):
    """The llama folder with a sentencepiece `tokenizer.model` (a small unigram model, written with protobuf) and
    no tokenizer.json, as Llama 2-era folders ship."""
    from transformers.utils import sentencepiece_model_pb2_new as spm

    folder = edited(folders, tmp_path, "llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    model = spm.ModelProto()
    model.trainer_spec.model_type, model.trainer_spec.unk_id, model.trainer_spec.pad_id = 1, 0, -1
    model.trainer_spec.bos_id, model.trainer_spec.eos_id = 1, 2
    model.normalizer_spec.name, model.normalizer_spec.add_dummy_prefix = "identity", True
    letters = [(c, -5.0, 1) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?\u2581"]
    for piece, score, kind in [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), *letters, ("\u2581the", -2.0, 1)]:
        entry = model.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, kind
    (folder / "tokenizer.model").write_bytes(model.SerializeToString())
    tokenizer_config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def test_a_sentencepiece_only_folder_trains_with_its_tokenizer_or_says_why_not(folders, tmp_path, capsys):
    import importlib.util

    from transformers import AutoTokenizer

    from moe_dist.train.args import parse_args
    from moe_dist.train.plan import plan_run

    folder = sentencepiece_only(folders, tmp_path)
    args = [*DATA_ARGS[:4], "--init_from", str(folder), "--output_dir", str(tmp_path / "run")]
    if importlib.util.find_spec("sentencepiece") is None:
        assert train_main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "sentencepiece package" in err[0], err
        assert not (tmp_path / "run").exists()
    else:
        plan = plan_run(*parse_args(args))
        assert plan.data.tokenizer == str(folder)
        assert len(AutoTokenizer.from_pretrained(plan.data.tokenizer)) < 100  # the folder's, not GPT-2's 50,257


def instruct_folder(folders, tmp_path):
    """The llama folder as a Llama-3-Instruct one: three stop ids in config.json and generation_config.json,
    sampling defaults, and a tokenizer without a pad token."""
    folder = edited(folders, tmp_path, "llama", pad_token_id=None)
    config = json.loads((folder / "config.json").read_text())
    stops = [config["eos_token_id"], 3, 4]
    config["eos_token_id"] = stops
    (folder / "config.json").write_text(json.dumps(config))
    settings = dict(bos_token_id=config["bos_token_id"], eos_token_id=stops, do_sample=True, temperature=0.6, top_p=0.9)
    (folder / "generation_config.json").write_text(json.dumps(settings))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder, settings


def test_generation_settings_come_back_from_the_export_and_no_pad_is_invented(folders, tmp_path):
    from transformers import AutoTokenizer

    from moe_dist.export.cli import main as export_main

    folder, settings = instruct_folder(folders, tmp_path)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    run = tmp_path / "run"
    steps = ["--max_steps", "2", "--eval_every", "2", "--seq_len", "32", "--micro_batch_size", "2"]
    assert train_main([*DATA_ARGS[:4], *steps, "--init_from", str(folder), "--output_dir", str(run)]) == 0
    out = tmp_path / "llama-export"
    assert export_main([str(run), str(out), "--format", "llama"]) == 0
    for exported in (run / "hf", out):  # ours (native) and the stock class's
        generation = json.loads((exported / "generation_config.json").read_text())
        assert {k: generation.get(k) for k in settings} == settings and generation.get("pad_token_id") is None
        assert AutoTokenizer.from_pretrained(exported).pad_token is None
        config = json.loads((exported / "config.json").read_text())
        assert config["eos_token_id"] == settings["eos_token_id"] and config.get("pad_token_id") is None


def with_tensors(folder, extra: dict):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, **extra}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_what_does_not_change_the_function_is_accepted(folders, tmp_path):
    """A Mixtral window as long as the context (full attention); multi-token-prediction layers, config and
    `mtp*` tensors, which the stock class ignores on load; our own biased ERNIE export (no shared experts)."""
    mtp = {
        "model.mtp_block.0.mlp.up_proj.weight": torch.randn(8, 64),
        "model.mtp_linear_proj.0.weight": torch.randn(64, 128),
    }
    cases = [
        edited(folders, tmp_path, "mixtral", sliding_window=64),  # = max_position_embeddings
        with_tensors(edited(folders, tmp_path / "e", "ernie4_5_moe", num_nextn_predict_layers=1), mtp),
        with_tensors(edited(folders, tmp_path / "q", "qwen3_moe", num_nextn_predict_layers=1), mtp),
    ]
    biased = tmp_path / "ernie-biased"
    tokenizer = tokenizer_for_tests(tmp_path / "tok")
    save_stock("ernie4_5_moe", biased, tokenizer, use_bias=True, moe_num_shared_experts=0)
    for folder in [*cases, biased]:
        init = read_init_config(folder)
        assert check_import(init, MoEConfig(**init.fields)) <= 1e-4, folder
    assert read_init_config(biased).fields["bias"]


def test_olmoe_with_its_own_head_dim_is_refused_with_one_line(folders, tmp_path, capsys):
    folder = edited(folders, tmp_path, "olmoe", head_dim=32)
    out = tmp_path / "run"
    assert train_main([*DATA_ARGS, "--init_from", str(folder), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "OlmoeForCausalLM field head_dim=32" in err[0], err
    assert not out.exists()


def test_dropout_is_carried_and_can_be_turned_off(folders, tmp_path):
    from moe_dist.train.args import parse_args
    from moe_dist.train.plan import plan_run

    released = dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)  # GPT-2's
    for folder, expected in (
        (edited(folders, tmp_path, "gpt2", **released), (0.1, 0.1, 0.1)),
        (edited(folders, tmp_path, "llama", attention_dropout=0.1), (0.1, 0.0, 0.0)),
    ):
        init = read_init_config(folder)
        config = MoEConfig(**init.fields)
        assert (config.attention_dropout, config.resid_dropout, config.embd_dropout) == expected
        fmt = init.fmt
        stock = standard_config(config, fmt)
        back = (stock.attn_pdrop, stock.resid_pdrop, stock.embd_pdrop) if fmt == "gpt2" else stock.attention_dropout
        assert back == (expected if fmt == "gpt2" else 0.1)  # and back, on export
        model, ids = converted_model(init, config), batch(config.vocab_size)
        with torch.no_grad():
            assert not torch.equal(model.train()(input_ids=ids).logits, model(input_ids=ids).logits)  # training drops
            assert torch.equal(model.eval()(input_ids=ids).logits, model(input_ids=ids).logits)
        args = [*DATA_ARGS, "--init_from", str(folder), "--dropout", "off", "--output_dir", str(tmp_path / "run")]
        off = plan_run(*parse_args(args)).model_config
        assert off.attention_dropout == off.resid_dropout == off.embd_dropout == 0.0
