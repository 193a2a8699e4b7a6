"""Behaviour of moe_dist.train.data: text loading, tokenizer, packing, caches, and rank-sharded batches."""

import gzip
import itertools
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from moe_dist.train.data import (
    BUNDLED_SAMPLE,
    SEPARATOR,
    BlockSampler,
    DataConfig,
    DataError,
    batch_tensors,
    build_tokenizer,
    bundled_sample,
    load_text_splits,
    load_tokenizer,
    pack_blocks,
    prepare_data,
    validation_shard,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TRAIN, VALID = FIXTURES / "stories.txt", FIXTURES / "stories_valid.txt"


@pytest.fixture(autouse=True)
def private_hf_cache(tmp_path, monkeypatch):
    """Keep the datasets cache of every test out of ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.fixture(scope="module")
def fixture_texts() -> list[str]:
    return [s.strip() for s in TRAIN.read_text(encoding="utf-8").split(SEPARATOR)]


@pytest.fixture(scope="module")
def tokenizer(fixture_texts):
    return build_tokenizer("train:512", fixture_texts, None)


def write_stories(path: Path, stories: list[str], newline: str = "\n") -> Path:
    path.write_text(f"\n{SEPARATOR}\n".join(stories) + "\n", encoding="utf-8", newline=newline)
    return path


def file_cfg(train: Path, valid: Path, tmp_path: Path, **kw) -> DataConfig:
    kw = {"tokenizer": "train:512", "seq_len": 32, "cache_dir": str(tmp_path / "cache")} | kw
    return DataConfig(train_file=str(train), valid_file=str(valid), **kw)


def no_barrier() -> None:
    pass


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("spec", ["train:abc", "train:100", "train:"])
def test_config_rejects_bad_train_tokenizer_spec(spec):
    with pytest.raises(DataError, match=r"tokenizer: 'train:N' needs an int N >= 257"):
        DataConfig(tokenizer=spec)


def test_config_rejects_short_seq_len():
    with pytest.raises(DataError, match=r"seq_len: must be an int >= 8"):
        DataConfig(seq_len=4)


def test_config_requires_train_and_valid_file_together():
    with pytest.raises(DataError, match=r"train_file/valid_file: give both or neither"):
        DataConfig(train_file=str(TRAIN))
    with pytest.raises(DataError, match=r"train_file/valid_file: give both or neither"):
        DataConfig(valid_file=str(VALID))


# ---------------------------------------------------------------- loading text


def test_fixture_corpus_loads_one_row_per_story(tmp_path):
    train, valid = (list(split) for split in load_text_splits(file_cfg(TRAIN, VALID, tmp_path)))
    assert (len(train), len(valid)) == (400, 40)
    assert all(SEPARATOR not in t and t == t.strip() for t in train)


def test_txt_splits_on_separator_lines_and_skips_empty_stories(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text(f"first\n{SEPARATOR}\n\n{SEPARATOR}\n   \n{SEPARATOR}\nsecond a\nsecond b\n{SEPARATOR}\n")
    train, _ = load_text_splits(file_cfg(path, path, tmp_path))
    assert list(train) == ["first", "second a\nsecond b"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_files_read_the_text_field(tmp_path, suffix):
    records = [{"text": "a cat sat.", "id": 1}, {"text": "", "id": 2}, {"text": "a dog ran.", "id": 3}]
    path = tmp_path / f"s{suffix}"
    path.write_text("\n".join(map(json.dumps, records)) if suffix == ".jsonl" else json.dumps(records))
    train, _ = load_text_splits(file_cfg(path, path, tmp_path))
    assert list(train) == ["a cat sat.", "a dog ran."]


def test_crlf_line_endings_become_lf(tmp_path):
    txt = write_stories(tmp_path / "s.txt", ["one\ntwo", "three"], newline="\r\n")
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text(json.dumps({"text": "one\r\ntwo"}))
    assert list(load_text_splits(file_cfg(txt, txt, tmp_path))[0]) == ["one\ntwo", "three"]
    assert list(load_text_splits(file_cfg(jsonl, jsonl, tmp_path))[0]) == ["one\ntwo"]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_bytes_are_replaced_and_reported(tmp_path, caplog, suffix):
    path = tmp_path / f"s{suffix}"
    body = b"a bad \xff\xfe story" if suffix == ".txt" else b'{"text": "a bad \xff\xfe story"}'
    path.write_bytes(body + b"\n")
    train, _ = load_text_splits(file_cfg(path, path, tmp_path))
    assert list(train) == ["a bad \ufffd\ufffd story"]
    assert "2 bytes are not valid UTF-8" in caplog.text


def test_bad_byte_count_reaches_prepare_data_stats(tmp_path):
    train = tmp_path / "train.txt"
    train.write_bytes(TRAIN.read_bytes().replace(b"Once upon", b"Once \xc3 upon", 3))
    data = prepare_data(file_cfg(train, VALID, tmp_path), tmp_path / "run", is_main=True, barrier=no_barrier)
    assert data.stats["bad_bytes"] == 3


def test_missing_file_raises_data_error(tmp_path):
    with pytest.raises(
        DataError,
        match=r"train_file: .*nope.txt does not exist; pass a file of kind .txt, .json and .jsonl, optionally .gz",
    ):
        load_text_splits(file_cfg(tmp_path / "nope.txt", VALID, tmp_path))


def test_directory_instead_of_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match=r"valid_file: .* is a directory, not a file"):
        load_text_splits(file_cfg(TRAIN, tmp_path, tmp_path))


def test_file_of_only_separators_raises_data_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text(f"{SEPARATOR}\n\n{SEPARATOR}\n")
    with pytest.raises(DataError, match=r"train_file .*empty.txt: no story found"):
        load_text_splits(file_cfg(path, VALID, tmp_path))


def test_unsupported_suffix_raises_data_error(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"train_file: .*s.csv has suffix '.csv'; valid are .txt, .json and .jsonl"):
        load_text_splits(file_cfg(path, VALID, tmp_path))


def test_json_without_text_field_raises_data_error(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"story": "hello"}))
    with pytest.raises(DataError, match=r"train_file: .*s.jsonl needs a 'text' field"):
        load_text_splits(file_cfg(path, VALID, tmp_path))


def test_malformed_json_raises_data_error(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "hello"\n')
    with pytest.raises(DataError, match=r"train_file: .*s.jsonl is not valid json"):
        load_text_splits(file_cfg(path, VALID, tmp_path))


def test_unreachable_hub_raises_data_error_suggesting_local_files(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"dataset 'roneneldan/TinyStories'.*no internet\? pass --train_file"):
        load_text_splits(DataConfig(dataset="roneneldan/TinyStories"))


# ---------------------------------------------------------------- tokenizer


def test_bpe_training_is_deterministic(fixture_texts, tokenizer):
    again = build_tokenizer("train:512", fixture_texts, None)
    assert len(tokenizer) == 512
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_trained_tokenizer_uses_separator_as_bos_eos_and_pad(tokenizer):
    sep_id = tokenizer.convert_tokens_to_ids(SEPARATOR)
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == sep_id


def test_trained_tokenizer_round_trips_text(tokenizer, fixture_texts):
    for text in [*fixture_texts, "Odd  spacing , here !\n\ttabs, é, 😀 and <b>tags</b>."]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_saved_tokenizer_reloads_with_same_encoding(tmp_path, fixture_texts):
    saved = build_tokenizer("train:300", fixture_texts, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.backend_tokenizer.to_str() == saved.backend_tokenizer.to_str()
    assert loaded.eos_token_id == saved.eos_token_id is not None
    assert not list(tmp_path.glob("tok.tmp-*"))


def test_loaded_tokenizer_without_pad_stays_without_and_generation_pads_with_eos(tmp_path, tokenizer):
    from transformers import PreTrainedTokenizerFast

    from moe_dist.generation import load_tokenizer_for_generation

    PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token=SEPARATOR).save_pretrained(
        tmp_path / "tok"
    )
    # A pad saved with the run would reach its exports, where the stock class makes that row its padding_idx.
    assert load_tokenizer(tmp_path / "tok").pad_token is None
    loaded = load_tokenizer_for_generation(tmp_path / "tok")  # a batch of prompts needs one; it is masked out
    assert loaded.pad_token_id == loaded.eos_token_id is not None


def test_unloadable_tokenizer_raises_data_error(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer: cannot load .*no internet\?\); pass a local path or train:N"):
        build_tokenizer(str(tmp_path / "missing"), None, None)  # neither a folder nor reachable on the hub
    with pytest.raises(DataError, match=r"tokenizer: cannot load .*the folder holds no readable tokenizer"):
        build_tokenizer(str(tmp_path), None, None)  # a folder without tokenizer files


# ---------------------------------------------------------------- packing


def expected_stream(tokenizer, stories: list[str]) -> list[int]:
    return [i for s in stories for i in tokenizer.encode(s, add_special_tokens=False) + [tokenizer.eos_token_id]]


def test_packing_appends_eos_after_every_story(tokenizer, fixture_texts):
    stories = fixture_texts[:20]
    blocks = pack_blocks(stories, tokenizer, 16)
    stream = expected_stream(tokenizer, stories)
    assert blocks.shape == (len(stream) // 17, 17)
    assert blocks.dtype == np.uint16
    np.testing.assert_array_equal(blocks.reshape(-1), stream[: blocks.size])
    assert (blocks == tokenizer.eos_token_id).sum() == stream[: blocks.size].count(tokenizer.eos_token_id) > 0


def test_packing_splits_a_long_story_over_several_blocks_and_drops_the_tail(tokenizer, fixture_texts):
    long_story = " ".join(fixture_texts[:30])
    blocks = pack_blocks([long_story], tokenizer, 8)
    stream = expected_stream(tokenizer, [long_story])
    assert len(blocks) == len(stream) // 9 > 10
    np.testing.assert_array_equal(blocks.reshape(-1), stream[: len(blocks) * 9])


def test_packing_uses_int32_for_vocabularies_past_uint16(tokenizer):
    class BigVocab:  # the same tokenizer, claiming a vocabulary that uint16 cannot index
        eos_token_id, backend_tokenizer = tokenizer.eos_token_id, tokenizer.backend_tokenizer

        def __len__(self):
            return 70_000

    blocks = pack_blocks(["a cat sat on the mat."] * 4, BigVocab(), 8)
    assert blocks.dtype == np.int32


def test_pack_blocks_writes_cache_and_trusts_it_next_time(tmp_path, tokenizer, fixture_texts):
    texts, cache = fixture_texts[:20], tmp_path / "c.npy"
    fresh = pack_blocks(texts, tokenizer, 16, cache)
    cached = pack_blocks(["different text"], tokenizer, 16, cache)
    np.testing.assert_array_equal(cached, fresh)
    assert isinstance(cached, np.memmap)
    assert [p.name for p in tmp_path.iterdir()] == ["c.npy"]  # no tmp file or folder left behind


# ---------------------------------------------------------------- prepare_data


def test_prepare_data_builds_tokenizer_blocks_and_stats(tmp_path):
    data = prepare_data(file_cfg(TRAIN, VALID, tmp_path), tmp_path / "run", is_main=True, barrier=no_barrier)
    assert (tmp_path / "run/tokenizer/tokenizer.json").is_file()
    assert data.train_blocks.shape[1] == data.valid_blocks.shape[1] == 33
    assert data.stats["n_train_stories"] == 400 and data.stats["n_valid_stories"] == 40
    assert data.stats["n_train_tokens"] == data.train_blocks.size and data.stats["bad_bytes"] == 0
    assert data.stats["n_valid_blocks"] == len(data.valid_blocks) > 0


def test_second_prepare_reuses_caches_without_rewriting(tmp_path):
    cfg, run = file_cfg(TRAIN, VALID, tmp_path), tmp_path / "run"
    first = prepare_data(cfg, run, is_main=True, barrier=no_barrier)
    files = sorted((tmp_path / "cache").glob("*-*.*")) + [run / "tokenizer/tokenizer.json"]
    mtimes = [os.stat(f).st_mtime_ns for f in files]
    second = prepare_data(cfg, run, is_main=True, barrier=no_barrier)
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes
    assert sorted((tmp_path / "cache").glob("*-*.*")) + [run / "tokenizer/tokenizer.json"] == files
    np.testing.assert_array_equal(second.train_blocks, first.train_blocks)


def test_changed_seq_len_or_source_file_gets_a_new_cache(tmp_path):
    train = tmp_path / "train.txt"
    train.write_bytes(TRAIN.read_bytes())
    run = tmp_path / "run"
    caches = lambda: {p.name for p in (tmp_path / "cache").glob("*.npy")}  # noqa: E731
    prepare_data(file_cfg(train, VALID, tmp_path), run, is_main=True, barrier=no_barrier)
    before = caches()
    prepare_data(file_cfg(train, VALID, tmp_path, seq_len=16), run, is_main=True, barrier=no_barrier)
    assert len(caches() - before) == 2
    before = caches()
    with open(train, "a") as f:
        f.write(f"{SEPARATOR}\nA new story about a frog.\n")
    data = prepare_data(file_cfg(train, VALID, tmp_path), run, is_main=True, barrier=no_barrier)
    assert [n.split("-")[0] for n in caches() - before] == ["train"]
    assert data.stats["n_train_stories"] == 401


def test_non_main_rank_loads_from_disk_what_main_built_before_the_barrier(tmp_path):
    cfg, run = file_cfg(TRAIN, VALID, tmp_path), tmp_path / "run"
    calls = []

    def barrier():  # stands in for the main rank finishing its build while this rank waits
        calls.append(prepare_data(cfg, run, is_main=True, barrier=no_barrier))

    data = prepare_data(cfg, run, is_main=False, barrier=barrier)
    assert len(calls) == 1
    np.testing.assert_array_equal(data.train_blocks, calls[0].train_blocks)
    assert data.stats == calls[0].stats


def test_resumed_run_reuses_its_saved_tokenizer(tmp_path):
    run = tmp_path / "run"
    prepare_data(file_cfg(TRAIN, VALID, tmp_path), run, is_main=True, barrier=no_barrier)
    resumed = prepare_data(
        file_cfg(TRAIN, VALID, tmp_path, tokenizer="train:300"), run, is_main=True, barrier=no_barrier
    )
    assert len(resumed.tokenizer) == 512


def test_max_valid_blocks_keeps_the_first_blocks(tmp_path):
    full = prepare_data(file_cfg(TRAIN, VALID, tmp_path), tmp_path / "run", is_main=True, barrier=no_barrier)
    cut = prepare_data(
        file_cfg(TRAIN, VALID, tmp_path, max_valid_blocks=5), tmp_path / "run", is_main=True, barrier=no_barrier
    )
    np.testing.assert_array_equal(cut.valid_blocks, full.valid_blocks[:5])


def test_corpus_too_small_for_one_block_raises_data_error(tmp_path):
    tiny = write_stories(tmp_path / "tiny.txt", ["A cat sat."])
    with pytest.raises(DataError, match=r"train_file .*tiny.txt: makes 0 blocks of seq_len \+ 1 = 257 tokens"):
        prepare_data(file_cfg(tiny, VALID, tmp_path, seq_len=256), tmp_path / "run", is_main=True, barrier=no_barrier)


def test_too_few_validation_blocks_raises_data_error(tmp_path):
    with pytest.raises(DataError, match=r"valid_file .*stories_valid.txt: makes \d+ blocks .* need >= 100000"):
        prepare_data(
            file_cfg(TRAIN, VALID, tmp_path),
            tmp_path / "run",
            is_main=True,
            barrier=no_barrier,
            min_valid_blocks=100_000,
        )


# ---------------------------------------------------------------- batches


def sampler(rank=0, world_size=2, seed=0, num_blocks=50, micro=3, accum=2) -> BlockSampler:
    return BlockSampler(
        num_blocks, micro_batch_size=micro, grad_accum=accum, rank=rank, world_size=world_size, seed=seed
    )


def test_sampler_ranks_are_disjoint_and_cover_the_global_batch():
    ranks = [sampler(rank=r, world_size=3) for r in range(3)]
    for _ in range(5):
        steps = [s.next_step() for s in ranks]
        for micro_batches in steps:
            assert len(micro_batches) == 2 and all(len(mb) == 3 for mb in micro_batches)
        taken = np.concatenate([np.concatenate(mbs) for mbs in steps])
        assert len(set(taken.tolist())) == 18  # disjoint: the whole global batch, nothing twice


def test_sampler_order_is_fixed_by_the_seed():
    def run(seed: int) -> list[list[int]]:
        s = sampler(seed=seed)
        return [mb.tolist() for _ in range(6) for mb in s.next_step()]

    assert run(7) == run(7)
    assert run(1) != run(2)


def test_sampler_epoch_uses_every_block_at_most_once_then_wraps_to_a_new_order():
    ranks = [sampler(rank=r) for r in range(2)]  # global batch 12, 50 blocks: 4 steps per epoch, tail of 2 dropped
    epochs = []
    for _ in range(2):
        epochs.append(np.concatenate([np.concatenate(s.next_step()) for _ in range(4) for s in ranks]))
    assert ranks[0].epoch == 2
    assert all(len(set(e.tolist())) == 48 for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])


def test_sampler_resumes_mid_epoch_with_the_same_following_indices():
    reference = sampler(rank=1)
    for _ in range(6):  # epoch 1, step 2
        reference.next_step()
    state = reference.state_dict()
    resumed = sampler(rank=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip, like a checkpoint
    for _ in range(7):  # runs past the next epoch boundary
        assert [mb.tolist() for mb in resumed.next_step()] == [mb.tolist() for mb in reference.next_step()]


def test_sampler_refuses_state_from_a_different_batch_shape():
    state = sampler(micro=3).state_dict()
    with pytest.raises(DataError, match=r"data position: checkpoint has global_batch=12, this run has 8"):
        sampler(micro=2).load_state_dict(state)


def test_sampler_rejects_train_set_smaller_than_a_global_batch():
    with pytest.raises(DataError, match=r"train set: 10 blocks < one global batch of 12 .*smaller batch or seq_len"):
        sampler(num_blocks=10)


def test_batch_tensors_shift_labels_by_one_token():
    blocks = np.arange(40, dtype=np.uint16).reshape(4, 10)
    inputs, labels = batch_tensors(blocks, np.array([2, 0]))
    assert inputs.dtype == labels.dtype == torch.int64 and inputs.shape == labels.shape == (2, 9)
    assert inputs[0].tolist() == list(range(20, 29)) and labels[0].tolist() == list(range(21, 30))
    assert inputs[1, 0] == 0 and labels[1, -1] == 9


@pytest.mark.parametrize("num_blocks, world_size, micro", [(23, 3, 2), (13, 2, 4), (18, 3, 2), (1, 4, 3), (5, 2, 3)])
def test_validation_shard_covers_every_block_once_in_equal_batches_on_every_rank(num_blocks, world_size, micro):
    shards = [
        validation_shard(num_blocks, rank=r, world_size=world_size, micro_batch_size=micro) for r in range(world_size)
    ]
    steps = -(-num_blocks // (world_size * micro))
    assert [len(s) for s in shards] == [steps] * world_size  # same forward count, same shape on every rank
    assert all(idx.shape == real.shape == (micro,) and real.dtype == bool for s in shards for idx, real in s)
    real_idx = [i for s in shards for idx, real in s for i in idx[real].tolist()]
    assert sorted(real_idx) == list(range(num_blocks))  # every block exactly once
    pads = [i for s in shards for idx, real in s for i in idx[~real].tolist()]
    assert len(pads) == steps * world_size * micro - num_blocks and all(0 <= i < num_blocks for i in pads)
    again = validation_shard(num_blocks, rank=world_size - 1, world_size=world_size, micro_batch_size=micro)
    assert [(i.tolist(), r.tolist()) for i, r in again] == [(i.tolist(), r.tolist()) for i, r in shards[-1]]


def test_validation_shard_pads_only_the_tail():
    shards = [validation_shard(13, rank=r, world_size=2, micro_batch_size=4) for r in range(2)]
    assert [(i.tolist(), r.all()) for i, r in shards[0]] == [([0, 1, 2, 3], True), ([8, 9, 10, 11], True)]
    assert [r.tolist() for _, r in shards[1]] == [[True] * 4, [True, False, False, False]]
    assert shards[1][1][0][0] == 12
    # One process: the whole set in order, and 3 padded rows in the last batch.
    single = validation_shard(13, rank=0, world_size=1, micro_batch_size=4)
    assert np.concatenate([i for i, _ in single])[:13].tolist() == list(range(13))
    assert [r.sum() for _, r in single] == [4, 4, 4, 1]


def test_validation_shard_needs_a_block():
    with pytest.raises(DataError, match=r"validation set: has no blocks"):
        validation_shard(0, rank=0, world_size=2, micro_batch_size=3)


def test_evaluate_leaves_padded_rows_out_of_every_sum(make_config):
    from moe_dist import MoEForCausalLM
    from moe_dist.train.evaluation import evaluate

    torch.manual_seed(0)
    model = MoEForCausalLM(make_config(vocab_size=64))
    blocks = torch.randint(0, 64, (5, 17), generator=torch.Generator().manual_seed(1)).numpy()
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.from_numpy(blocks[:, :-1]).long()).logits.double()
    labels = torch.from_numpy(blocks[:, 1:]).long()
    plain = {
        "loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item(),
        "top1_acc": (logits.argmax(-1) == labels).double().mean().item(),
    }
    for micro in (1, 2, 4, 5):  # 0, 1, 3 and 0 padded rows
        result = evaluate(
            model, blocks, validation_shard(5, rank=0, world_size=1, micro_batch_size=micro), device=torch.device("cpu")
        )
        assert result["loss"] == pytest.approx(plain["loss"], abs=1e-6)
        assert result["top1_acc"] == pytest.approx(plain["top1_acc"], abs=1e-9)


@pytest.mark.multirank
def test_validation_loss_is_the_same_at_world_size_1_and_2(tmp_path):
    """The same weights, one process vs. 2 ranks (experts replicated and sharded): every block counts."""
    from launcher import ROOT, check, deepspeed, leftover_shm

    out = tmp_path / "result.json"
    proc = check(deepspeed(ROOT / "tests" / "scripts" / "valid_world_size.py", [str(out)], timeout=240))
    assert leftover_shm(proc) == []
    results = json.loads(out.read_text())
    assert set(results) == {f"ep{ep}-{n}blocks-micro4" for ep in (1, 2) for n in (13, 3)}
    for name, r in results.items():
        assert all(abs(loss - r["world1"]) <= 1e-6 for loss in r["world2"]), (name, r)
        assert abs(r["world1"] - r["whole_set"]) <= 1e-6, (name, r)
        if r["tail_dropped"] is not None:  # dropping the tail would show at this tolerance
            assert abs(r["tail_dropped"] - r["whole_set"]) > 1e-4, (name, r)


# ---------------------------------------------------------------- real sample


def test_bundled_sample_is_read_from_gzip_with_every_story(tmp_path):
    # The offline default: the compressed TinyStories sample in data/, with its licence beside it.
    assert "CDLA-Sharing-1.0" in (BUNDLED_SAMPLE / "SOURCE.md").read_text()
    train_path, valid_path = bundled_sample()
    train, valid = (
        list(s) for s in load_text_splits(file_cfg(train_path, valid_path, tmp_path, tokenizer="train:2048"))
    )
    assert (len(train), len(valid)) == (8231, 433)  # the counts in SOURCE.md
    assert all(text and SEPARATOR not in text for text in valid)


def test_no_data_flag_plans_the_bundled_sample_and_a_hub_name_plans_the_hub(tmp_path):
    from moe_dist.train.args import parse_args
    from moe_dist.train.plan import plan_run

    default = plan_run(*parse_args(["--output_dir", str(tmp_path / "a"), "--tokenizer", "train:512"])).data
    assert (default.dataset, default.train_file, default.valid_file) == (None, *bundled_sample())
    hub = plan_run(*parse_args(["--output_dir", str(tmp_path / "b"), "--dataset", "roneneldan/TinyStories"])).data
    assert (hub.dataset, hub.train_file) == ("roneneldan/TinyStories", None)
    with pytest.raises(DataError, match="contradict"):
        plan_run(
            *parse_args(
                [
                    "--output_dir",
                    str(tmp_path / "c"),
                    "--dataset",
                    "x",
                    "--train_file",
                    str(TRAIN),
                    "--valid_file",
                    str(VALID),
                ]
            )
        )


def test_a_gzip_file_and_its_plain_text_give_the_same_stories(tmp_path):
    plain = write_stories(tmp_path / "s.txt", ["First story.", "Second story,\nline two."])
    with gzip.open(tmp_path / "s.txt.gz", "wb") as f:
        f.write(plain.read_bytes())
    from_plain = list(load_text_splits(file_cfg(plain, plain, tmp_path / "a"))[0])
    from_gz = list(load_text_splits(file_cfg(tmp_path / "s.txt.gz", tmp_path / "s.txt.gz", tmp_path / "b"))[0])
    assert from_gz == from_plain == ["First story.", "Second story,\nline two."]


def test_trained_tokenizer_on_real_tinystories_gives_sane_tokens_per_story(tmp_path):
    cfg = file_cfg(*bundled_sample(), tmp_path, tokenizer="train:2048")
    train, _ = load_text_splits(cfg)
    stories = list(itertools.islice(train, 500))
    tokenizer = build_tokenizer(cfg.tokenizer, stories, None)
    blocks = pack_blocks(stories, tokenizer, 128)
    assert 100 <= blocks.size / len(stories) <= 400
    assert tokenizer.decode(tokenizer.encode(stories[0])) == stories[0]


def hostile_corpus(path: Path) -> Path:
    """CRLF endings, empty stories, invalid UTF-8 and one story many blocks long, in one file."""
    stories = TRAIN.read_text().split(f"{SEPARATOR}\n")
    huge = " ".join(stories[:60]).replace("\n", " ")
    corpus = f"{SEPARATOR}\n".join(stories[60:200] + ["", "   ", huge])
    raw = corpus.replace("\n", "\r\n").encode() + f"\n{SEPARATOR}\nA caf".encode() + b"\xe9 in \xff\xfe town.\n"
    path.write_bytes(raw)
    return path


def test_blocks_are_bitwise_the_same_at_any_num_proc_and_one_cache_serves_both(tmp_path, monkeypatch):
    from moe_dist.train import data_prep

    monkeypatch.setattr(data_prep, "CHUNK_STORIES", 100)  # ~43 chunks: the workers' queue fills and drains
    train = tmp_path / "train.txt"
    train.write_bytes(b"".join([hostile_corpus(tmp_path / "h.txt").read_bytes()] * 30))
    prepared = {
        n: prepare_data(
            file_cfg(train, VALID, tmp_path / f"p{n}", num_proc=n),
            tmp_path / f"run{n}",
            is_main=True,
            barrier=no_barrier,
        )
        for n in (1, 2)
    }
    for split in ("train_blocks", "valid_blocks"):
        assert np.array_equal(getattr(prepared[1], split), getattr(prepared[2], split))
    assert prepared[1].stats == prepared[2].stats and prepared[1].stats["n_train_stories"] > 4000
    assert prepared[1].stats["bad_bytes"] == 30 * 3
    # The cache made at num_proc=1 is the one num_proc=2 finds: nothing is tokenized again.
    cache = tmp_path / "p1" / "cache"
    before = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    again = prepare_data(
        file_cfg(train, VALID, tmp_path / "p1", num_proc=2), tmp_path / "run1", is_main=True, barrier=no_barrier
    )
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == before
    assert np.array_equal(again.train_blocks, prepared[1].train_blocks)


def test_a_hub_dataset_streams_through_the_same_story_reader(tmp_path, tokenizer):
    from moe_dist.train.data_prep import StoryReader

    table = datasets.Dataset.from_dict({"text": ["one\r\ntwo", f"three{SEPARATOR}four", "", None]})
    reader = StoryReader(dataset=table, label="dataset 'x' split 'train'")
    assert list(reader) == ["one\ntwo", "three", "four"] and reader.stories == 3
    blocks = pack_blocks(reader, tokenizer, 8, num_proc=2)
    np.testing.assert_array_equal(blocks, pack_blocks(["one\ntwo", "three", "four"], tokenizer, 8))
