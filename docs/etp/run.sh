#!/usr/bin/env bash
# The measured EP-vs-ETP comparison behind README "Expert tensor parallelism": tiny-moe on 4 CPU ranks,
# EP 4 vs EP 2 x ETP 2 vs EP 1 x ETP 4, same model, same batch (4 x 128 tokens per rank), interleaved.
# Run from the repository root with the package installed: bash docs/etp/run.sh
# Writes docs/etp/compare/ (memory.json, report.md, memory.png), docs/etp/collectives/ (alltoall.json,
# report.md, alltoall.png) and docs/etp/run.txt (the commands, the machine, the load average).
set -euo pipefail
log=docs/etp/run.txt
compare=(python tools/profile_memory.py --preset tiny-moe --vocab_size 512 --seq_len 128 --ds_configs
         --measure docs/etp/ds_ep4.json docs/etp/ds_ep2_etp2.json docs/etp/ds_ep1_etp4.json
         --max_steps 2 --timed_steps 6 --rounds 3 --output_dir docs/etp/compare)
collectives=(deepspeed --num_gpus 4 tools/profile_alltoall.py --deepspeed docs/etp/ds_ep2_etp2.json --model tiny-moe
             --vocab_size 512 --seq_len 128 --sizes 4K 64K 1M 4M --warmup 3 --repeats 10 --warmup_steps 2 --steps 5
             --out docs/etp/collectives)
{
  echo "machine: this workplace's CPU machine, AMD EPYC, 2 logical CPUs, 24 GiB, torch 2.13.0+cpu, deepspeed 0.19.8"
  echo "(shared: other jobs ran on the same 2 cores; the load average below says how busy it was)"
  echo "python $(python -c 'import sys; print(sys.version.split()[0])'), $(python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1)"
  echo "start: $(date -u +%FT%TZ); $(uptime)"
  echo
  echo "\$ ${compare[*]}"
} > "$log"
"${compare[@]}" >> "$log" 2>&1
echo "after the comparison: $(uptime)" >> "$log"
echo >> "$log"
echo "\$ DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 ${collectives[*]}" >> "$log"
DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 "${collectives[@]}" > docs/etp/collectives.log 2>&1
sed -n '/^# Expert collectives profile/,$p' docs/etp/collectives.log | grep -v "^\[20" >> "$log"
rm docs/etp/collectives.log
echo "end: $(date -u +%FT%TZ); load average at the end: $(uptime)" >> "$log"
