"""Greedy continuation of the quick-start model: with the KV cache (generate's default), without it,
through pipeline("text-generation"), and as written by launch/generate.py (its --json).

    python launch/generate.py --model_path runs/quickstart --prompt "Once upon a time" --prompt "Lily wanted to" \
        --temperature 0 --max_new_tokens 60 --json docs/quickstart/generate_greedy.json
    python docs/quickstart/check_generation.py runs/quickstart/hf docs/quickstart/generate_greedy.json \
        > docs/quickstart/generation_check.json
"""

import json
import sys

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import moe_dist  # noqa: F401

hf, cli_json = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(hf).eval()
tok = AutoTokenizer.from_pretrained(hf, padding_side="left")
cli = {s["prompt"]: s["text"] for s in json.load(open(cli_json))["samples"]}
prompts = list(cli)
batch = tok(prompts, return_tensors="pt", padding=True)
res = {"transformers": transformers.__version__, "prompts": prompts}
for use_cache in (True, False):
    out = model.generate(
        **batch, max_new_tokens=60, do_sample=False, use_cache=use_cache, pad_token_id=tok.pad_token_id
    )
    res[f"batch_use_cache_{use_cache}"] = tok.batch_decode(out, skip_special_tokens=True)
pipe = pipeline("text-generation", model=hf, tokenizer=hf, device="cpu")
res["pipeline"] = [pipe(p, max_new_tokens=60, do_sample=False)[0]["generated_text"] for p in prompts]
res["launch_generate"] = [cli[p] for p in prompts]
ref = res["batch_use_cache_False"]
res["all_equal_no_cache_greedy"] = all(res[k] == ref for k in ("batch_use_cache_True", "pipeline", "launch_generate"))
print(json.dumps(res, indent=1))
