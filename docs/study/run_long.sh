#!/usr/bin/env bash
# Longer horizon for the dense vs E=8 question: 1200 steps (2.5M tokens) instead of 300.
# Run from anywhere: paths are relative to the repository root, two levels above this script.
# Data: the TinyStories sample bundled in data/tinystories/ (read as .gz; it is also the default
# when no data flag is given). The results stored in docs/study were made from an uncompressed
# copy of the same text (its SHA-256 sums are in data/tinystories/SOURCE.md).
set -u
cd "$(dirname "$0")/../.." || exit 1
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false

COMMON="--train_file data/tinystories/train.txt.gz --valid_file data/tinystories/valid.txt.gz --tokenizer train:4096 --cache_dir runs/study/cache --max_steps 1200 --eval_every 100 --warmup_steps 60 --log_every 50"
date +"%T start long"
python launch/sweep.py --grid experts --scale tiny --runs_dir runs/study/long --only dense,moe-e8-top1 --deepspeed ds_configs/cpu_ep2.json --num_gpus 2 -- $COMMON
date +"%T end long"
