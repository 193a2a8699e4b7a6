"""Planning: the command line's dataclasses, the plan, and `finalize` settling the vocabulary."""

import pytest
from launcher import DATA_ARGS

from moe_dist.parallel.ds_config import ConfigError
from moe_dist.train.args import parse_args
from moe_dist.train.plan import finalize, plan_run


class Tokenizer:
    """What `finalize` reads of a tokenizer."""

    def __init__(self, n: int):
        self.n, self.bos_token_id, self.eos_token_id, self.pad_token_id = n, 0, 0, 1

    def __len__(self):
        return self.n


def plan(tmp_path, *args):
    return plan_run(*parse_args([*DATA_ARGS, *args, "--output_dir", str(tmp_path / "run")]))


def test_short_cli_names_set_the_hf_config_fields(tmp_path):
    config = plan(
        tmp_path,
        "--num_experts",
        "4",
        "--top_k",
        "2",
        "--router_jitter",
        "0.1",
        "--aux_loss_coef",
        "0.02",
        "--z_loss_coef",
        "0.001",
        "--bias_update_rate",
        "0.003",
    ).model_config
    assert (config.num_local_experts, config.num_experts_per_tok, config.router_jitter_noise) == (4, 2, 0.1)
    assert (config.router_aux_loss_coef, config.router_z_loss_coef, config.router_bias_update_rate) == (
        0.02,
        0.001,
        0.003,
    )


def test_data_flags_parse_into_the_data_config_and_the_plan_settles_it(tmp_path):
    p = plan(tmp_path, "--model", "tiny-moe")
    assert p.data.tokenizer == "train:512"
    assert p.data.seq_len == p.model_config.max_position_embeddings  # no --seq_len: the model's context


def test_finalize_rounds_the_vocabulary_up_to_64_and_leaves_the_plan_alone(tmp_path):
    p = plan(tmp_path)
    planned = p.model_config.to_dict()
    config = finalize(p, Tokenizer(500))
    assert (config.vocab_size, config.bos_token_id, config.pad_token_id) == (512, 0, 1)
    assert p.model_config.to_dict() == planned


def test_finalize_checks_a_fixed_vocabulary(tmp_path):
    p = plan(tmp_path, "--vocab_size", "512")
    assert finalize(p, Tokenizer(512)).vocab_size == 512
    with pytest.raises(ConfigError, match="the tokenizer has 600 tokens but the model's vocab_size is 512"):
        finalize(p, Tokenizer(600))
