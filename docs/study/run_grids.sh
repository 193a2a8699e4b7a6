#!/usr/bin/env bash
# The measured CPU study: experts and router grids at tiny scale, DeepSpeed EP=2 on 2 CPU ranks.
# Run from anywhere: paths are relative to the repository root, two levels above this script.
# Data: the TinyStories sample bundled in data/tinystories/ (read as .gz; it is also the default
# when no data flag is given). The results stored in docs/study were made from an uncompressed
# copy of the same text (its SHA-256 sums are in data/tinystories/SOURCE.md).
set -u
cd "$(dirname "$0")/../.." || exit 1
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
COMMON="--train_file data/tinystories/train.txt.gz --valid_file data/tinystories/valid.txt.gz --tokenizer train:4096 --cache_dir runs/study/cache --max_steps 300 --eval_every 50 --warmup_steps 30 --log_every 25"
for grid in experts router; do
  date +"%T start $grid"
  python launch/sweep.py --grid $grid --scale tiny --runs_dir runs/study --deepspeed ds_configs/cpu_ep2.json --num_gpus 2 -- $COMMON
  date +"%T end $grid"
done
