"""Conversations → tokens and the assistant mask (moe_dist/train/conversations.py), and tools/inspect_data.py.

The mask is held against five template styles written here after the released ones (ChatML/Qwen3 with its
<think> blocks, Llama 3, Mistral/Mixtral [INST], ChatML with a default system prompt, ChatML with
{% generation %} tags): on generated conversations the supervised tokens decode to exactly each assistant
turn's body as the template writes it, and with generation tags the mask is transformers' own.
"""

import gzip
import json
import random
import subprocess
import sys

import numpy as np
import pytest
from launcher import ROOT

from moe_dist.train.conversations import (
    chat_template,
    is_conversation_file,
    load_examples,
    read_conversations,
    render,
)
from moe_dist.train.data import load_tokenizer
from moe_dist.train.data_prep import DataError

SPECIALS = [
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "[INST]",
    "[/INST]",
]
WORDS = (
    "the cat sat on a mat and then dog ran far away, little Lily saw big red ball. café naïve 42 7 why? yes! no".split()
)
CONVERSATIONS = 1000

# Qwen3's template as released, less tools: an assistant turn after the last user turn gets its reasoning in a
# <think> block (an empty one when it is the last turn); earlier turns' reasoning is dropped.
QWEN3 = """{%- set ns = namespace(last_query_index=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if message.role == 'user' or message.role == 'system' %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
            {{- content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

LLAMA3 = """{%- for message in messages %}
    {%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'
        + message['content'] | trim + '<|eot_id|>' %}
    {%- if loop.index0 == 0 %}{%- set content = '<|begin_of_text|>' + content %}{%- endif %}
    {{- content }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}
{%- else %}{%- set loop_messages = messages %}{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' and loop.first and system_message is defined %}
        {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- else %}{{- message['content'] + eos_token }}{%- endif %}
{%- endfor %}"""

DEFAULT_SYSTEM = """{%- if messages[0]['role'] != 'system' %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

GENERATION_TAGS = """{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}
    {%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""


def _qwen3_body(messages, i):
    content, reasoning = messages[i]["content"], ""
    if "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.split("</think>")[-1].lstrip("\n")
    last_query = max(k for k, m in enumerate(messages) if m["role"] == "user")
    if i > last_query and (i == len(messages) - 1 or reasoning):
        return "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n") + "<|im_end|>"
    return content + "<|im_end|>"


# Each style: the template, and what it writes as assistant turn i's body (content through end-of-turn marker).
STYLES = {
    "qwen3": (QWEN3, _qwen3_body),
    "llama3": (LLAMA3, lambda messages, i: messages[i]["content"].strip() + "<|eot_id|>"),
    "mistral": (MISTRAL, lambda messages, i: messages[i]["content"] + "</s>"),
    "default_system": (DEFAULT_SYSTEM, lambda messages, i: messages[i]["content"] + "<|im_end|>"),
    "generation_tags": (GENERATION_TAGS, lambda messages, i: messages[i]["content"] + "<|im_end|>"),
}


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE trained here on the test's words, with every template's markers as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    rng = random.Random(0)
    bpe.train_from_iterator((" ".join(rng.choices(WORDS, k=30)) for _ in range(500)), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )
    tok.add_tokens(SPECIALS, special_tokens=True)
    return tok


def _text(rng: random.Random) -> str:
    words = rng.choices(WORDS, k=rng.randint(1, 12))
    return "".join(w + rng.choice([" ", " ", " ", "\n"]) for w in words[:-1]) + words[-1]


def _conversation(rng: random.Random, style: str) -> list[dict]:
    """Random words and turn counts, an optional system turn, sometimes a user turn left unanswered."""
    messages = [{"role": "system", "content": _text(rng)}] if rng.random() < 0.4 else []
    for _ in range(rng.randint(1, 4)):
        reply = "" if rng.random() < 0.05 else _text(rng)
        if style == "qwen3" and rng.random() < 0.5:
            reply = f"<think>\n{_text(rng)}\n</think>\n\n{reply}"
        messages += [{"role": "user", "content": _text(rng)}, {"role": "assistant", "content": reply}]
    if rng.random() < 0.1:
        messages.append({"role": "user", "content": _text(rng)})
    return messages


def _runs(mask: np.ndarray) -> list[slice]:
    """The maximal runs of True in `mask`."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [slice(a, b) for a, b in zip(edges[::2], edges[1::2])]


@pytest.mark.parametrize("style", sorted(STYLES))
def test_supervised_tokens_are_each_assistant_body_and_its_marker(tokenizer, style):
    template, body = STYLES[style]
    rng, mismatches = random.Random(style), []
    for _ in range(CONVERSATIONS):
        messages = _conversation(rng, style)
        example = render(tokenizer, template, messages)
        assert example.input_ids.dtype == np.int64 and example.supervised.dtype == bool
        assert example.input_ids.shape == example.supervised.shape
        got = [tokenizer.decode(example.input_ids[run]) for run in _runs(example.supervised)]
        want = [body(messages, i) for i, m in enumerate(messages) if m["role"] == "assistant"]
        if got != want:
            mismatches.append((messages, got, want))
    assert not mismatches, f"{len(mismatches)} of {CONVERSATIONS} differ; first: {mismatches[0]}"


def test_the_mask_is_transformers_own_on_a_template_with_generation_tags(tokenizer):
    rng = random.Random(1)
    for _ in range(CONVERSATIONS):
        messages = _conversation(rng, "generation_tags")
        ours = render(tokenizer, GENERATION_TAGS, messages)
        theirs = tokenizer.apply_chat_template(
            messages, chat_template=GENERATION_TAGS, return_assistant_tokens_mask=True, return_dict=True
        )
        assert ours.input_ids.tolist() == theirs["input_ids"]
        assert ours.supervised.astype(int).tolist() == theirs["assistant_masks"]


def test_qwen3_drops_earlier_reasoning_and_supervises_the_last_think_block(tokenizer):
    messages = [
        {"role": "user", "content": "why"},
        {"role": "assistant", "content": "<think>\nold thought\n</think>\n\nfirst"},
        {"role": "user", "content": "and"},
        {"role": "assistant", "content": "second"},
    ]
    example = render(tokenizer, QWEN3, messages)
    text = tokenizer.decode(example.input_ids)
    assert "old thought" not in text
    got = [tokenizer.decode(example.input_ids[run]) for run in _runs(example.supervised)]
    assert got == ["first<|im_end|>", "<think>\n\n</think>\n\nsecond<|im_end|>"]


def _write(path, lines) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]})


@pytest.mark.parametrize(
    "bad, says",
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"text": "a story"}), 'neither "messages" nor "prompt" and "completion"'),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "valid roles: system, user, assistant"),
        (json.dumps({"messages": [{"role": "user", "content": 3}]}), "has content 3; it must be a string"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "has no assistant turn"),
        (json.dumps({"prompt": "hi", "completion": None}), "'completion' is None; it must be a string"),
        (json.dumps({"messages": []}), "non-empty list"),
    ],
)
def test_bad_records_are_refused_with_one_line_naming_field_path_and_line(tmp_path, bad, says):
    path = _write(tmp_path / "c.jsonl", [GOOD, "", bad])
    with pytest.raises(DataError) as e:
        read_conversations(path, "train_file")
    message = str(e.value)
    assert message.startswith(f"train_file: {path} line 3") and says in message and "\n" not in message


def test_an_empty_file_is_refused(tmp_path):
    path = _write(tmp_path / "c.jsonl", ["", "  "])
    with pytest.raises(DataError, match="holds no conversation"):
        read_conversations(path, "valid_file")


def test_a_conversation_the_template_refuses_names_its_line(tokenizer, tmp_path):
    two_users = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    two_users["messages"].append({"role": "assistant", "content": "c"})
    path = _write(tmp_path / "c.jsonl", [GOOD, json.dumps(two_users)])
    template = tmp_path / "mistral.jinja"
    template.write_text(MISTRAL)
    with pytest.raises(DataError) as e:
        load_examples(path, "train_file", tokenizer, str(template))
    assert str(e.value).startswith(f"train_file: {path} line 2: the chat template refused")
    assert "roles must alternate" in str(e.value) and "\n" not in str(e.value)


def test_prompt_and_completion_are_a_user_and_an_assistant_turn(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"prompt": "Once", "completion": "upon a time", "id": 7}) + "\n")
    assert read_conversations(str(path), "train_file") == [
        [{"role": "user", "content": "Once"}, {"role": "assistant", "content": "upon a time"}]
    ]


def test_is_conversation_file(tmp_path):
    plain = _write(tmp_path / "plain.jsonl", ["", json.dumps({"text": "a story"})])
    chat = _write(tmp_path / "chat.jsonl", ["", GOOD])
    pairs = _write(tmp_path / "pairs.jsonl", [json.dumps({"prompt": "a", "completion": "b"})])
    text = _write(tmp_path / "chat.txt", [GOOD])
    with gzip.open(tmp_path / "chat.jsonl.gz", "wt") as f:
        f.write(GOOD + "\n")
    assert [is_conversation_file(p) for p in (plain, chat, pairs, text, tmp_path / "chat.jsonl.gz")] == [
        False,
        True,
        True,
        False,
        True,
    ]
    assert not is_conversation_file(tmp_path / "missing.jsonl")


def test_the_template_file_wins_and_no_template_anywhere_is_refused(tokenizer, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(LLAMA3)
    tokenizer.chat_template = QWEN3
    try:
        assert chat_template(tokenizer, str(template)) == LLAMA3
        assert chat_template(tokenizer, None) == QWEN3
    finally:
        tokenizer.chat_template = None
    with pytest.raises(DataError, match="no chat template anywhere.*--chat_template"):
        chat_template(tokenizer, None)


SAMPLE = ROOT / "data" / "conversations"


def test_the_sample_loads_with_gpt2_and_the_chatml_template():
    gpt2 = load_tokenizer("gpt2")
    for split, count in (("train", 1500), ("valid", 100)):
        path = SAMPLE / f"{split}.jsonl"
        assert is_conversation_file(path)
        examples = load_examples(path, f"{split}_file", gpt2, str(SAMPLE / "chatml.jinja"))
        assert len(examples) == count and all(e.supervised.any() for e in examples)
    messages = read_conversations(SAMPLE / "valid.jsonl", "valid_file")[0]
    first = examples[0]
    got = [gpt2.decode(first.input_ids[run]) for run in _runs(first.supervised)]
    assert got == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]


def _inspect(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "inspect_data.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_inspect_data_writes_every_example_and_marks_the_supervised_part(tmp_path):
    out = tmp_path / "examples.json"
    proc = _inspect(
        "--train_file",
        str(SAMPLE / "valid.jsonl"),
        "--tokenizer",
        "gpt2",
        "--chat_template",
        str(SAMPLE / "chatml.jinja"),
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    examples = json.loads(out.read_text())["examples"]
    assert len(examples) == 100
    assert all(len(e["input_ids"]) == len(e["supervised"]) and set(e["supervised"]) == {0, 1} for e in examples)
    assert "[[" in proc.stdout and "<|im_end|>]]" in proc.stdout


def test_inspect_data_refuses_a_bad_file_with_one_line_and_exit_2(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [GOOD, json.dumps({"messages": [{"role": "robot", "content": "x"}]})])
    proc = _inspect(
        "--train_file", bad, "--chat_template", str(SAMPLE / "chatml.jinja"), "--json", "x.json", cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "line 2" in proc.stderr and "role 'robot'" in proc.stderr


# DeepSeek-R1's way: the generation prompt opens a <think> block that history turns do not have, so the rendering
# of the turns before an answer, with the generation prompt, is no prefix of the whole conversation.
THINK_PROMPT = """{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"""


def test_a_generation_prompt_that_is_no_prefix_supervises_from_the_content(tokenizer):
    messages = [
        {"role": "assistant", "content": "cat"},  # first: nothing renders before it
        {"role": "user", "content": "cat"},  # the same words before the answer are not taken for it
        {"role": "assistant", "content": "cat"},
    ]
    example = render(tokenizer, THINK_PROMPT, messages)
    got = [tokenizer.decode(example.input_ids[run]) for run in _runs(example.supervised)]
    assert got == ["cat<|im_end|>", "cat<|im_end|>"]
