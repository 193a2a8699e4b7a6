#!/usr/bin/env bash
# Sparse upcycling study, on the bundled TinyStories sample, 2 CPU ranks (DeepSpeed EP=2).
# For each block style (GPT-2: tiny-dense; modern: tiny-modern with no experts, its dense twin):
#   dense          N steps from scratch (trains the train:4096 tokenizer every later run reuses)
#   dense-cont     M more steps from dense/hf (fresh optimizer and warmup, as the upcycled runs)
#   up-top1        dense/hf upcycled to E=8, top-1, gate = softmax probability (not renormalised), M steps
#   up-top2        dense/hf upcycled to E=8, top-2 renormalised (the dense function at step 0), M steps
#   up-top2-g2     as up-top2, fine-grained: each copy split in 2 (16 experts of half the width, top-4), M steps
#   scratch        the MoE from scratch for N + M steps: GPT-2, up-top1's (tiny-moe: E=8 top-1, experts as wide as
#                  the dense FFN, but without its biases); modern, up-top2's (E=8 top-2 renormalised, width 352)
# Every run: the same tokenizer, seed 0 (the same data order), dropless routing, lr 1e-3 with 30 warmup steps.
# Run from anywhere; results in runs/upcycling, report: python docs/upcycling/make_report.py runs/upcycling docs/upcycling
# ONLY="up-top2-g2" (names above, space-separated) runs just those arms, into the folders the others left.
set -eu
cd "$(dirname "$0")/../.." || exit 1
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
N=${N:-300}
M=${M:-300}
R=runs/upcycling
DATA="--train_file data/tinystories/train.txt.gz --valid_file data/tinystories/valid.txt.gz --cache_dir runs/upcycling/cache --eval_every 50 --log_every 50 --warmup_steps 30 --seed 0"
train() { deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/cpu_ep2.json $DATA "$@"; }
ONLY=${ONLY:-}
want() { if [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; then date +"%T $style $1"; else return 1; fi; }

for style in gpt2 modern; do
  if [ "$style" = gpt2 ]; then dense_model="--model tiny-dense"; scratch="--model tiny-moe --top_k 1 --norm_topk_prob false"
  else dense_model="--model tiny-modern --num_experts 0"; scratch="--model tiny-modern --top_k 2 --norm_topk_prob true --moe_intermediate_size 352"; fi
  D=$R/$style
  if want dense; then train $dense_model --tokenizer train:4096 --max_steps $N --output_dir $D/dense; fi
  if want dense-cont; then train --init_from $D/dense/hf --max_steps $M --output_dir $D/dense-cont; fi
  if want up-top1; then
    train --init_from $D/dense/hf --upcycle_experts 8 --top_k 1 --norm_topk_prob false --dropless --max_steps $M --output_dir $D/up-top1; fi
  if want up-top2; then
    train --init_from $D/dense/hf --upcycle_experts 8 --top_k 2 --norm_topk_prob true --dropless --max_steps $M --output_dir $D/up-top2; fi
  if want up-top2-g2; then
    train --init_from $D/dense/hf --upcycle_experts 8 --upcycle_granularity 2 --top_k 2 --norm_topk_prob true --dropless \
      --max_steps $M --output_dir $D/up-top2-g2; fi
  if want scratch; then train $scratch --dropless --tokenizer $D/dense/tokenizer --max_steps $((N + M)) --output_dir $D/scratch; fi
done
date +"%T end"
