#!/usr/bin/env bash
# Longer horizon for the dense vs E=8 question: 1200 steps (2.5M tokens) instead of 300.
set -u
cd /work/main && . .venv/bin/activate
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false

COMMON="--train_file ../shared/data/tinystories/train.txt --valid_file ../shared/data/tinystories/valid.txt --tokenizer train:4096 --cache_dir runs/study/cache --max_steps 1200 --eval_every 100 --warmup_steps 60 --log_every 50"
date +"%T start long"
python launch/sweep.py --grid experts --scale tiny --runs_dir runs/study/long --only dense,moe-e8-top1 --deepspeed ds_configs/cpu_ep2.json --num_gpus 2 -- $COMMON
date +"%T end long"
