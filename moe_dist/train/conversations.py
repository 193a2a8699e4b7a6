"""Conversations → token ids and the mask of what the model is trained to write: the fine-tuning data path.

Formats (`.jsonl`, optionally `.jsonl.gz`, one record per line, blank lines skipped, other keys ignored):

- `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`, with at least one
  assistant turn;
- `{"prompt": "...", "completion": "..."}`, read as `[user: prompt, assistant: completion]`.

Rendering: the chat template (`--chat_template FILE`, else the tokenizer's own) renders the whole conversation
once; that text, tokenized without added special tokens (templates write their own BOS), is `input_ids`.

The mask (`supervised`) is True on the tokens of each assistant turn's *body*: what the template writes for the
turn after its role header (its reasoning block as the template writes it, e.g. Qwen3's `<think>…</think>`, then
the content), through the turn's end-of-turn marker. No `{% generation %}` tags are needed; the rule is:

1. the end-of-turn marker comes from a probe conversation `[user, assistant]`: the first whitespace-delimited
   word the template writes after the assistant's content, cut after its first added/special token
   (`<|im_end|>`, `<|eot_id|>`, `</s>`); a tokenizer that lacks the template's marker tokens (ChatML on GPT-2)
   keeps the whole word, so the marker is learnt as plain text;
2. turn i's body starts where the rendering of `messages[:i]` with the generation prompt ends, when that
   rendering is a prefix of the whole text (the header is then exactly the generation prompt); otherwise (the
   first turn, or a generation prompt unlike the history's headers, e.g. one that opens a `<think>` block) at
   the turn's visible content;
3. it ends after the first marker past that start (and past where the two renderings part), and the text
   before that marker, whitespace aside, must end with the turn's visible content: the content after any
   `</think>`, stripped (reasoning templates move or drop that block, and some trim the content);
4. a token is supervised when its characters overlap a body: transformers' own rule for
   `return_assistant_tokens_mask`, so on a template with generation tags both masks agree.

A conversation the template refuses, or whose rendering breaks the rule (content missing, no marker after
it, bodies out of order), is refused with one line naming its line number.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data_prep import DataError, open_bytes

ROLES = ("system", "user", "assistant")
_FORMATS = 'one JSON object per line with "messages" (a list of {"role", "content"}), or "prompt" and "completion"'
_PROBE = ("moe-dist probe question", "moe-dist probe answer")
_TEMPLATE_SOURCES = "pass --chat_template FILE (data/conversations/chatml.jinja is a ChatML template)"


@dataclass(frozen=True)
class Example:
    input_ids: np.ndarray  # int64: the template's rendering of the whole conversation, tokenized
    supervised: np.ndarray  # bool, same length: True exactly on the assistant turns' bodies


def is_conversation_file(path: str | Path) -> bool:
    """A `.jsonl` or `.jsonl.gz` whose first non-empty record holds "messages", or "prompt" and "completion"."""
    if not str(path).lower().removesuffix(".gz").endswith(".jsonl") or not Path(path).is_file():
        return False
    try:
        with open_bytes(path) as f:
            line = next((line for line in f if line.strip()), b"")
        record = json.loads(line) if line else None
    except (OSError, EOFError, zlib.error, ValueError, RecursionError):  # unreadable: the text path says why
        return False
    return isinstance(record, dict) and ("messages" in record or {"prompt", "completion"} <= record.keys())


def _numbered_records(path: str | Path, field: str):
    """(line number, record) for every non-empty line, each parsed as JSON."""
    where = f"{field}: {path}"
    if not Path(path).is_file():
        raise DataError(f"{where} does not exist or is not a file; pass a .jsonl or .jsonl.gz file")
    try:
        with open_bytes(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
                    why = getattr(e, "msg", type(e).__name__)
                    raise DataError(f"{where} line {number} is not valid JSON ({why}); valid: {_FORMATS}") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip raises all three, by how the stream is broken
        raise DataError(f"{where} cannot be read to its end ({type(e).__name__}: {e})") from None


def _messages(record, where: str) -> list[dict]:
    """The record's messages ({"role", "content"} only), validated; `where` names the file and line."""
    if isinstance(record, dict) and "messages" not in record and {"prompt", "completion"} <= record.keys():
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise DataError(f"{where}: {key!r} is {record[key]!r:.40}; it must be a string")
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    if not isinstance(record, dict) or "messages" not in record:
        found = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
        raise DataError(
            f'{where} has neither "messages" nor "prompt" and "completion" (has {found}); valid: {_FORMATS}'
        )
    turns = record["messages"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    messages = []
    for k, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise DataError(f'{where}: message {k} is a {type(turn).__name__}, not a {{"role", "content"}} object')
        if turn.get("role") not in ROLES:
            raise DataError(f"{where}: message {k} has role {turn.get('role')!r:.40}; valid roles: {', '.join(ROLES)}")
        if not isinstance(turn.get("content"), str):
            content = turn.get("content")
            raise DataError(f"{where}: message {k} ({turn['role']}) has content {content!r:.40}; it must be a string")
        messages.append({"role": turn["role"], "content": turn["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing in it would be trained on")
    return messages


def _read_numbered(path: str | Path, field: str) -> list[tuple[int, list[dict]]]:
    conversations = [(n, _messages(r, f"{field}: {path} line {n}")) for n, r in _numbered_records(path, field)]
    if not conversations:
        raise DataError(f"{field}: {path} holds no conversation (it is empty or blank); valid: {_FORMATS}")
    return conversations


def read_conversations(path: str | Path, field: str) -> list[list[dict]]:
    """Every record's messages, in file order; `DataError` (one line: field, path, line number) on bad input."""
    return [messages for _, messages in _read_numbered(path, field)]


def chat_template(tokenizer, template_file: str | None) -> str:
    """The Jinja chat template: `template_file` (--chat_template) wins, else the tokenizer's own."""
    if template_file is not None:
        if not Path(template_file).is_file():
            raise DataError(
                f"chat_template: {template_file} does not exist or is not a file; pass a Jinja template file"
            )
        text = Path(template_file).read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"chat_template: {template_file} is empty; pass a Jinja template file")
        return text
    own = tokenizer.chat_template
    if isinstance(own, dict):  # a tokenizer may hold several named templates; "default" is what chat uses
        own = own.get("default")
    if not own:
        raise DataError(
            f"chat_template: no chat template anywhere: tokenizer {tokenizer.name_or_path!r} has none and no "
            f"--chat_template was given; {_TEMPLATE_SOURCES}"
        )
    return own


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200]


def _render_text(tokenizer, template: str, messages: list[dict], generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # a template is code: raise_exception gives jinja2's TemplateError, a bug any error
        raise DataError(f"the chat template refused the conversation ({type(e).__name__}: {_one_line(e)})") from None


def end_marker(tokenizer, template: str) -> str:
    """What the template writes after an assistant's content to end the turn (rule 1 of the module docstring)."""
    probe = [{"role": "user", "content": _PROBE[0]}, {"role": "assistant", "content": _PROBE[1]}]
    text = _render_text(tokenizer, template, probe)
    if _PROBE[1] not in text:
        raise DataError(f"chat_template: the template does not write an assistant's content as given ({text[-80:]!r})")
    word = re.match(r"\s*\S+", text[text.rindex(_PROBE[1]) + len(_PROBE[1]) :])
    if word is None:
        raise DataError(
            "chat_template: the template writes nothing after an assistant's content: no end-of-turn marker"
        )
    word = word.group()
    found = [(word.index(t), -len(t), t) for t in tokenizer.get_added_vocab() if t and t in word]
    if not found:
        return word
    at, _, token = min(found)
    return word[: at + len(token)]


def _visible(content: str) -> str:
    # Reasoning templates (Qwen3, DeepSeek-R1) move a leading <think> block out of the content, or drop it, and
    # some templates trim the content (Llama 3's `| trim`): what is left is written as it is.
    return content.split("</think>")[-1].strip()


def _turn_span(tokenizer, template: str, messages: list[dict], i: int, text: str, after: int, marker: str):
    """[start, end) of assistant turn i's body in `text`, beginning at or after `after` (rules 2 and 3)."""
    header = _render_text(tokenizer, template, messages[:i], generation_prompt=True) if i else ""
    fits = i > 0 and text.startswith(header) and len(header) >= after
    search_from = len(header) if fits else max(after, len(os.path.commonprefix([header, text])))
    visible = _visible(messages[i]["content"])
    at = text.find(marker, search_from)
    # The content may itself appear earlier (in the reasoning, or a user turn): it must end right before the marker.
    body = text[search_from:at].rstrip() if at >= 0 else ""
    if at < 0 or not body.endswith(visible):
        raise DataError(
            f"message {i + 1} (assistant): the template's rendering does not end its content with the end-of-turn "
            f"marker {marker!r} (does the content hold that marker, or does the template rewrite the content?)"
        )
    return search_from + (0 if fits else len(body) - len(visible)), at + len(marker)


def _assistant_spans(tokenizer, template: str, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """[start, end) of every assistant body in `text`, in order (rules 1 to 3)."""
    marker, spans = end_marker(tokenizer, template), []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            after = spans[-1][1] if spans else 0
            spans.append(_turn_span(tokenizer, template, messages, i, text, after, marker))
    return spans


def render(tokenizer, template: str, messages: list[dict]) -> Example:
    """One conversation's tokens and supervised mask (the rule of the module docstring)."""
    text = _render_text(tokenizer, template, messages)
    spans = _assistant_spans(tokenizer, template, messages, text)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    supervised = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:
        supervised |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
    return Example(np.asarray(encoded["input_ids"], dtype=np.int64), supervised)


def load_examples(path: str | Path, field: str, tokenizer, template_file: str | None = None) -> list[Example]:
    """Every conversation of `path` rendered, in file order; `DataError` naming the line of one that fails."""
    template = chat_template(tokenizer, template_file)
    examples = []
    for number, messages in _read_numbered(path, field):
        try:
            examples.append(render(tokenizer, template, messages))
        except DataError as e:
            raise DataError(f"{field}: {path} line {number}: {e}") from None
    return examples
