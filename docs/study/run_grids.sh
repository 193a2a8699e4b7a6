#!/usr/bin/env bash
# The measured CPU study: experts and router grids at tiny scale, DeepSpeed EP=2 on 2 CPU ranks.
set -u
cd /work/main && . .venv/bin/activate
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
COMMON="--train_file ../shared/data/tinystories/train.txt --valid_file ../shared/data/tinystories/valid.txt --tokenizer train:4096 --cache_dir runs/study/cache --max_steps 300 --eval_every 50 --warmup_steps 30 --log_every 25"
for grid in experts router; do
  date +"%T start $grid"
  python launch/sweep.py --grid $grid --scale tiny --runs_dir runs/study --deepspeed ds_configs/cpu_ep2.json --num_gpus 2 -- $COMMON
  date +"%T end $grid"
done
