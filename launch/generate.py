"""Generate text with an exported model (`run/hf`, or the run folder itself).

    python launch/generate.py --model_path runs/quickstart --prompt "Once upon a time" --num_samples 3
    python launch/generate.py --model_path runs/quickstart/hf --prompt_file prompts.txt --temperature 0 \\
        --max_new_tokens 200 --json samples.json

    deepspeed --num_gpus 2 launch/generate.py --etp_size 2 --model_path runs/quickstart --temperature 0
    python launch/generate.py --model_path runs/sft --chat --system "You write short stories." \\
        --prompt "Tell me a story about a dog."

--temperature 0 is greedy; top_k 0 and top_p 1 are off. A prompt file holds one prompt per line, or
multi-line prompts separated by `<|endoftext|>` lines. No prompt at all samples unconditionally.
`--chat` takes each prompt as a user message (after `--system`'s turn, if given), renders it with the
folder's chat template up to the assistant's header, stops on the stop ids of its generation_config.json and
on the template's end-of-turn marker, and prints only the reply (--json keeps the rendered prompt).
`--etp_size T`, launched on T ranks, slices every expert over them, each rank loading only its
slice (moe_dist.parallel.sliced_experts); rank 0 prints and writes --json. The default, 1, runs
one whole model per process.
Bad input (no model, --chat on a folder without a chat template, a prompt longer than the context, no GPU
for --device cuda, an --etp_size that does not divide the expert width or differs from the number of ranks)
exits with status 2 and one line; prompt + --max_new_tokens beyond the context is clamped with a warning.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from moe_dist import output_guard
from moe_dist.analysis.bench import is_our_json
from moe_dist.generation import (
    GenerationError,
    build_generation_config,
    chat_prompts,
    context_length,
    fit_to_context,
    generate,
    load_model,
    load_tokenizer_for_generation,
    prompt_lengths,
    read_prompt_file,
    resolve_device,
    resolve_model_dir,
    stop_ids,
)
from moe_dist.parallel.process_group import shutdown_distributed
from moe_dist.parallel.sliced_experts import (
    SlicedExpertsError,
    check_etp_size,
    load_sliced_model,
    start_process_group,
)

SAMPLES = "generate"  # the output kind of --json (output_guard)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True, help="exported hf/ folder, or a run folder (uses its hf/)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    p.add_argument("--prompt_file", help="one prompt per line, or prompts separated by <|endoftext|> lines")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="CTRL-style; 1 = off")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per generate() call")
    p.add_argument("--json", help="also write prompts, samples and settings to this JSON file")
    p.add_argument("--chat", action="store_true", help="each prompt is a user message, rendered by the chat template")
    p.add_argument("--system", help="with --chat: a system message before each user message")
    p.add_argument(
        "--etp_size",
        type=int,
        default=1,
        help="slice every expert over this many ranks (launch them with deepspeed --num_gpus T); 1 = off",
    )
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    _quiet_transformers()
    sliced = args.etp_size != 1
    rank = int(os.environ.get("RANK", "0")) if sliced else 0  # --etp_size 1: every process prints, as ever
    started = False
    try:
        prompts = (args.prompt + (read_prompt_file(args.prompt_file) if args.prompt_file else [])) or [""]
        model_dir = resolve_model_dir(args.model_path)
        device = _rank_device(resolve_device(args.device)) if sliced else resolve_device(args.device)
        context = context_length(model_dir)  # also the config's own errors, before the --etp_size check reads it
        check_etp_size(model_dir, args.etp_size, int(os.environ.get("WORLD_SIZE", "1")))
        if args.system is not None and not args.chat:
            raise GenerationError("--system: only with --chat")
        tokenizer = load_tokenizer_for_generation(model_dir)
        texts, marker = chat_prompts(tokenizer, prompts, args.system) if args.chat else (prompts, None)
        max_new_tokens, warning = fit_to_context(prompt_lengths(tokenizer, texts), context, args.max_new_tokens)
        config = build_generation_config(
            tokenizer,
            max_new_tokens=max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            num_samples=args.num_samples,
            eos_token_id=stop_ids(model_dir, tokenizer),
            stop_strings=[marker] if marker else None,
        )
        if args.batch_size < 1:
            raise GenerationError(f"--batch_size {args.batch_size}: must be >= 1")
        if args.json and not Path(args.json).parent.is_dir():  # found out now, not after generating
            raise GenerationError(f"--json {args.json}: folder {Path(args.json).parent} does not exist")
        if args.json:  # and never over a file we did not write
            output_guard.check(
                Path(args.json).parent,
                SAMPLES,
                [Path(args.json).name],
                what="--json",
                legacy=lambda d: is_our_json(d / Path(args.json).name, ("samples", "settings")),
            )
        if sliced:  # every check above ran before any process group
            started = start_process_group(device)
            model = load_sliced_model(model_dir, rank, args.etp_size, device)
        else:
            model = load_model(model_dir, device)
    except (GenerationError, SlicedExpertsError, output_guard.OutputRefused) as e:
        # Every rank prints: the checks see the same input on every rank, except a rank's own GPU.
        print(f"error: {e}", file=sys.stderr)
        return 2
    if warning and rank == 0:
        print(warning, file=sys.stderr)
    # Sliced, every rank decodes the same tokens (same logits after the all-reduce, same seed).
    samples = generate(model, tokenizer, texts, config, seed=args.seed, batch_size=args.batch_size)
    if started:
        shutdown_distributed()
    if rank != 0:
        return 0
    for s in samples:
        if args.chat:  # the reply alone: the rendered prompt is the template's, not the user's
            print(s.continuation)
            continue
        print(
            f"=== prompt {s.prompt_index + 1}/{len(prompts)}, sample {s.sample_index + 1}/{args.num_samples}"
            f" ({s.num_new_tokens} new tokens) ===\n{s.text}\n"
        )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "local_rank"}
        record = {
            "model_dir": str(model_dir),
            "device": str(device),
            "settings": settings,
            "max_new_tokens_used": max_new_tokens,
            "samples": [s.to_json() for s in samples],
        }
        output_guard.record(Path(args.json).parent, SAMPLES, [Path(args.json).name])
        Path(args.json).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return 0


def _rank_device(device):
    """A sliced rank's device: its own GPU (LOCAL_RANK from the launcher) unless --device names one."""
    import torch

    if device.type != "cuda" or device.index is not None:
        return device
    local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= count:
        raise GenerationError(
            f"--device {device}: rank {local_rank} on this host needs GPU {local_rank}, but only "
            f"{count} are visible; launch at most {count} ranks per host"
        )
    return torch.device("cuda", local_rank)


def _quiet_transformers() -> None:
    # Progress bars and load-time notices would interleave with the samples on the terminal.
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
