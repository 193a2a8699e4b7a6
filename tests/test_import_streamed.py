"""The import check in bounded memory (moe_dist/convert/stock_stream.py): each side runs its own forward with one
decoder layer materialised at a time, and gives exactly the logits of the whole model.

Real stock folders (tests/stock_models.py), real safetensors; the stock side is compared with `from_pretrained`.
"""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from stock_models import save_stock, tokenizer_for_tests

from moe_dist.checkpoint.formats import ExportError
from moe_dist.convert.standard import STANDARD_FORMATS
from moe_dist.convert.stock_import import check_import, converted_model, init_config, read_init_config
from moe_dist.convert.stock_stream import stock_logits, stream_logits


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    tokenizer = tokenizer_for_tests(root / "tokenizer")
    return {fmt: save_stock(fmt, root / fmt, tokenizer) for fmt in STANDARD_FORMATS}


def ids(vocab: int) -> torch.Tensor:
    return torch.randint(vocab, (2, 16), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("fmt", STANDARD_FORMATS)
def test_the_streamed_stock_forward_is_the_whole_class_and_ours_matches_it(folders, fmt):
    whole = transformers.AutoModelForCausalLM.from_pretrained(folders[fmt], dtype=torch.float32).eval()
    batch = ids(whole.config.vocab_size)
    with torch.no_grad():
        expected = whole(input_ids=batch, use_cache=False).logits
    assert torch.equal(stock_logits(folders[fmt], batch, type(whole).__name__), expected)
    init = read_init_config(folders[fmt])
    assert check_import(init, init_config(init)) <= 1e-4


def test_a_layer_is_materialised_only_while_it_runs(folders):
    whole = transformers.AutoModelForCausalLM.from_pretrained(folders["mixtral"], dtype=torch.float32).eval()
    batch = ids(whole.config.vocab_size)
    with torch.no_grad():
        expected = whole(input_ids=batch, use_cache=False).logits
    layers = whole.model.layers
    saved = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]
    layers.to("meta")
    held = []

    def load(i, layer):
        layer.to_empty(device="cpu").load_state_dict(saved[i])
        held.append([not next(m.parameters()).is_meta for m in layers])

    assert torch.equal(stream_logits(whole, layers, load, batch), expected)
    assert held == [[i == j for j in range(len(layers))] for i in range(len(layers))]
    assert all(p.is_meta for p in layers.parameters())  # and freed once it has run


def test_a_sharded_stock_folder_is_checked_layer_by_layer(folders, tmp_path):
    stock = transformers.AutoModelForCausalLM.from_pretrained(folders["qwen3_moe"], dtype=torch.float32)
    stock.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    (tmp_path / "sharded" / "config.json").write_text((folders["qwen3_moe"] / "config.json").read_text())
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    init = read_init_config(tmp_path / "sharded")
    assert check_import(init, init_config(init)) <= 1e-4
    ours = converted_model(init, init_config(init))  # the whole-model form still agrees with the streamed one
    batch = ids(ours.config.vocab_size)
    with torch.no_grad():
        whole = ours(input_ids=batch, use_cache=False).logits
    assert (stock_logits(tmp_path / "sharded", batch) - whole).abs().max() <= 1e-4


def test_a_stock_tensor_the_folder_lacks_is_one_line(folders, tmp_path):
    folder = tmp_path / "mixtral"
    folder.mkdir()
    for f in folders["mixtral"].iterdir():
        if f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.post_attention_layernorm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    init = read_init_config(folder)
    with pytest.raises(ExportError) as e:
        check_import(init, init_config(init))
    message = str(e.value)
    assert len(message.splitlines()) == 1 and "model.layers.1.post_attention_layernorm.weight" in message


@pytest.mark.parametrize(
    "change, said",
    [("extra", "has no place for the folder's tensor 'model.layers.0.extra.weight'"), ("missing", "holds no tensor")],
)
def test_the_exporters_stock_check_streams_without_moe_dist_and_refuses_a_folder_off_its_class(
    folders, tmp_path, change, said
):
    from moe_dist.export.standard_export import stock_logits_diff

    whole = transformers.AutoModelForCausalLM.from_pretrained(folders["mixtral"], dtype=torch.float32).eval()
    batch = ids(whole.config.vocab_size)
    with torch.no_grad():
        expected = whole(input_ids=batch, use_cache=False).logits
    # The same class on the same weights, in another interpreter: its matmuls may split their sums over threads
    # differently (7e-7 seen in CI), so the bound is a float32 rounding one, far under the exporter's TOLERANCE.
    assert stock_logits_diff(folders["mixtral"], "MixtralForCausalLM", batch, expected) <= 1e-5
    folder = tmp_path / "mixtral"
    folder.mkdir()
    (folder / "config.json").write_text((folders["mixtral"] / "config.json").read_text())
    weights = load_file(folders["mixtral"] / "model.safetensors")
    if change == "extra":
        weights["model.layers.0.extra.weight"] = torch.zeros(2)
    else:
        del weights["model.layers.2.input_layernorm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError) as e:
        stock_logits_diff(folder, "MixtralForCausalLM", batch, expected)
    assert said in str(e.value) and len(str(e.value).splitlines()) == 1
