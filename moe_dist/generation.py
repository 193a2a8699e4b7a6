"""Exported model -> text: find the folder, load model and tokenizer, check the prompts fit, `generate`, decode.

Sampling is transformers' own `model.generate` with a `GenerationConfig`: no hand-written loop,
so top-k/top-p/repetition penalty/KV cache behave exactly as they do for any HF model. Prompts
of different lengths share a batch through left padding plus an attention mask; `generate`
then derives each row's position ids from the mask, so a prompt continues the same way alone
or next to a longer one.

Chat (`--chat`): each prompt is one user message, rendered by the folder's chat template through the
assistant's header; generation stops on the folder's stop ids and on the template's end-of-turn marker, which a
tokenizer without that token (ChatML on GPT-2) writes as plain text, and the reply is what comes before it.

Every bad input (no model in the folder, a prompt longer than the context, no GPU for
`--device cuda`, an impossible setting) raises `GenerationError` with a one-line message, before
any model is loaded where that is possible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .train.conversations import chat_template, end_marker
from .train.data import SEPARATOR, DataError, load_tokenizer

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class GenerationError(ValueError):
    """Bad generation input. The message is one line naming the flag or path and what is valid."""


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    prompt: str
    continuation: str  # the new tokens only, decoded without special tokens
    num_new_tokens: int  # up to and including the stop token when the model stopped
    new_token_ids: list[int]  # those tokens

    @property
    def text(self) -> str:
        return self.prompt + self.continuation

    def to_json(self) -> dict:
        return {**asdict(self), "text": self.text}


# ---------------------------------------------------------------- inputs


def resolve_model_dir(path: str | Path) -> Path:
    """An exported HF folder, or a run folder whose `hf/` holds one; checked for config, weights, tokenizer."""
    path = Path(path)
    if not path.is_dir():
        raise GenerationError(f"--model_path {path}: {'is not a folder' if path.exists() else 'does not exist'}")
    model_dir = next((d for d in (path, path / "hf") if (d / "config.json").is_file()), None)
    if model_dir is None:
        raise GenerationError(
            f"--model_path {path}: no model here (no config.json in it or in its hf/); pass an "
            f"exported hf/ folder or a finished run folder, or export a checkpoint first "
            f"(python -m moe_dist.export CHECKPOINT OUT_DIR)"
        )
    if not any((model_dir / f).is_file() for f in WEIGHT_FILES):
        raise GenerationError(
            f"--model_path {model_dir}: config.json but no weights (expected one of {', '.join(WEIGHT_FILES)})"
        )
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise GenerationError(
            f"--model_path {model_dir}: no tokenizer files (expected {' or '.join(TOKENIZER_FILES)}"
            f"); export with --tokenizer"
        )
    return model_dir


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a text file: split on `<|endoftext|>` lines when the file has any (multi-line
    prompts, the training-file format), otherwise one prompt per non-empty line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GenerationError(f"--prompt_file {path}: cannot read it ({type(e).__name__})") from None
    lines = text.splitlines()
    if any(line.strip() == SEPARATOR for line in lines):
        prompts, current = [], []
        for line in [*lines, SEPARATOR]:
            if line.strip() == SEPARATOR:
                prompts.append("\n".join(current).strip("\n"))
                current = []
            else:
                current.append(line)
    else:
        prompts = lines
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise GenerationError(f"--prompt_file {path}: holds no prompt")
    return prompts


def resolve_device(spec: str) -> torch.device:
    """auto (cuda when visible, else cpu), cpu, cuda or cuda:N; a GPU that is not there is an error, not a fallback."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise GenerationError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = (
                f"this torch ({torch.__version__}) is built without CUDA"
                if torch.version.cuda is None
                else "torch sees no CUDA GPU (check the driver and CUDA_VISIBLE_DEVICES)"
            )
            raise GenerationError(f"--device {spec}: {why}; use --device cpu or auto")
        if device.index is not None and device.index >= count:
            raise GenerationError(f"--device {spec}: only {count} GPU(s) visible, valid indices 0..{count - 1}")
    return device


def build_generation_config(
    tokenizer,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    num_samples: int,
    eos_token_id: int | list[int] | None = None,
    stop_strings: list[str] | None = None,
):
    """The `GenerationConfig`: temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off. It stops on
    `eos_token_id` (default: the tokenizer's eos) and on `stop_strings`."""
    from transformers import GenerationConfig

    for name, value, ok, valid in (
        ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, ">= 1"),
        ("temperature", temperature, temperature >= 0, ">= 0 (0 = greedy)"),
        ("top_k", top_k, top_k >= 0, ">= 0 (0 = off)"),
        ("top_p", top_p, 0 < top_p <= 1, "in (0, 1] (1 = off)"),
        ("repetition_penalty", repetition_penalty, repetition_penalty > 0, "> 0 (1 = off)"),
        ("num_samples", num_samples, num_samples >= 1, ">= 1"),
    ):
        if not ok:
            raise GenerationError(f"--{name} {value}: must be {valid}")
    ids = dict(
        eos_token_id=tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        stop_strings=stop_strings,
    )
    if temperature == 0:
        if num_samples > 1:
            raise GenerationError(
                f"--num_samples {num_samples}: greedy decoding (--temperature 0) gives one "
                f"answer per prompt; sample with --temperature > 0"
            )
        return GenerationConfig(
            do_sample=False, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty, **ids
        )
    return GenerationConfig(
        do_sample=True,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        num_return_sequences=num_samples,
        **ids,
    )


def chat_prompts(tokenizer, messages: list[str], system: str | None) -> tuple[list[str], str]:
    """`--chat`: each message as a user turn (after a system turn when `system` is given) rendered by the
    tokenizer's chat template with the generation prompt, and the template's end-of-turn marker."""
    try:
        template = chat_template(tokenizer, None)
    except DataError:
        raise GenerationError(
            f"--chat: the tokenizer in {tokenizer.name_or_path} has no chat template; a run trained on "
            f"conversations saves its template with its tokenizer, or drop --chat"
        ) from None
    head = [{"role": "system", "content": system}] if system is not None else []
    try:
        marker = end_marker(tokenizer, template)
        texts = [
            tokenizer.apply_chat_template(
                [*head, {"role": "user", "content": m}],
                chat_template=template,
                tokenize=False,
                add_generation_prompt=True,
            )
            for m in messages
        ]
    except DataError as e:
        raise GenerationError(f"--chat: {e}") from None
    except Exception as e:  # a template is code: raise_exception gives jinja2's TemplateError, a bug any error
        first = (str(e).strip().splitlines() or [""])[0]
        raise GenerationError(f"--chat: the chat template refused the message ({type(e).__name__}: {first})") from None
    return texts, marker


def stop_ids(model_dir: Path, tokenizer) -> int | list[int] | None:
    """What generation stops on: `generation_config.json`'s eos_token_id (an id, or a list such as Llama 3's end
    of text and end of turn), else the tokenizer's eos."""
    from transformers import GenerationConfig
    from transformers.utils import GENERATION_CONFIG_NAME

    if not (model_dir / GENERATION_CONFIG_NAME).is_file():
        return tokenizer.eos_token_id
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except (OSError, ValueError) as e:
        raise _load_error(model_dir, e) from None
    return tokenizer.eos_token_id if eos is None else eos


# ---------------------------------------------------------------- model


def load_tokenizer_for_generation(model_dir: Path):
    """The folder's tokenizer, left-padded (a batch's new tokens then line up at the right), pad = eos if unset."""
    try:
        tokenizer = load_tokenizer(model_dir)
    except DataError as e:
        raise GenerationError(str(e)) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # batching needs one; masked out, so any id does, and none is saved
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: Path, device: torch.device):
    """`AutoModelForCausalLM.from_pretrained`: importing this module imported moe_dist, whose
    `__init__` registered MoEForCausalLM with the Auto classes, so no trust_remote_code is needed."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    except (OSError, ValueError, SafetensorError) as e:  # the last: a truncated or corrupted weights file
        raise _load_error(model_dir, e) from None
    return model.to(device).eval()


def context_length(model_dir: Path) -> int | None:
    """The model's context from config.json (`max_position_embeddings`, as lm-eval-harness reads it)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise _load_error(model_dir, e) from None
    return getattr(config, "max_position_embeddings", None)


def _load_error(model_dir: Path, e: Exception) -> GenerationError:
    # transformers' messages run over several lines; the first names the problem.
    first = (str(e).strip().splitlines() or [""])[0]
    return GenerationError(f"--model_path {model_dir}: cannot load the model ({type(e).__name__}: {first})")


def fit_to_context(prompt_lengths: list[int], context: int | None, max_new_tokens: int) -> tuple[int, str | None]:
    """New tokens that fit: (max_new_tokens, None), or a clamped count and the warning to print.

    A prompt that leaves no room is an error. Otherwise we clamp rather than refuse: learned
    position embeddings have no row past the context (an index error deep inside the model), and
    a RoPE model was never trained past it either, so both stop at the context.
    """
    if context is None:
        return max_new_tokens, None
    longest = max(prompt_lengths)
    if longest >= context:
        which = prompt_lengths.index(longest) + 1
        raise GenerationError(
            f"prompt {which} is {longest} tokens; the model's context is {context} tokens "
            f"(max_position_embeddings), which leaves no room to generate: shorten it"
        )
    room = context - longest
    if max_new_tokens <= room:
        return max_new_tokens, None
    return room, (
        f"warning: the longest prompt is {longest} tokens and the context is {context}: "
        f"--max_new_tokens {max_new_tokens} clamped to {room}"
    )


# ---------------------------------------------------------------- generation


def prompt_lengths(tokenizer, prompts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(_model_text(tokenizer, prompts), add_special_tokens=False)["input_ids"]]


def _model_text(tokenizer, prompts: list[str]) -> list[str]:
    # An empty prompt starts from the story separator, as every story does in the packed training data.
    start = tokenizer.bos_token or tokenizer.eos_token
    return [p or start for p in prompts]


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[str], generation_config, *, seed: int, batch_size: int = 8
) -> list[Sample]:
    """`generation_config.num_return_sequences` samples per prompt, `batch_size` prompts per `generate` call.

    The seed is set once before the first batch: the same seed, prompts and batch size give the
    same text on the same device.
    """
    from transformers import set_seed

    set_seed(seed)
    n = generation_config.num_return_sequences or 1
    samples = []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first : first + batch_size]
        enc = tokenizer(
            _model_text(tokenizer, batch),
            add_special_tokens=False,
            padding=True,
            return_tensors="pt",
            return_token_type_ids=False,
        ).to(model.device)
        # Stop strings are matched on the tokenizer's strings of the ids, so generate needs the tokenizer.
        out = model.generate(**enc, generation_config=generation_config, tokenizer=tokenizer)
        new_tokens = out[:, enc["input_ids"].shape[1] :]  # shape: (len(batch) * n, new)
        for row, ids in enumerate(new_tokens.tolist()):
            ids = _until_eos(ids, generation_config.eos_token_id)
            samples.append(
                Sample(
                    prompt_index=first + row // n,
                    sample_index=row % n,
                    prompt=batch[row // n],
                    continuation=_until_stop_string(
                        tokenizer.decode(ids, skip_special_tokens=True), generation_config.stop_strings
                    ),
                    num_new_tokens=len(ids),
                    new_token_ids=ids,
                )
            )
    return samples


def _until_eos(ids: list[int], eos: int | list[int] | None) -> list[int]:
    # Rows that stop early are padded with pad = eos up to the batch's longest row; cut after the first stop id.
    stops = set(eos) if isinstance(eos, list) else {eos}
    return next((ids[: i + 1] for i, t in enumerate(ids) if t in stops), ids)


def _until_stop_string(text: str, stop_strings: list[str] | None) -> str:
    # A plain-text end-of-turn marker ends the reply and is no part of it.
    cuts = [text.index(s) for s in stop_strings or [] if s in text]
    return text[: min(cuts)] if cuts else text
