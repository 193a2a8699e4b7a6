"""Train an MoE language model.

    deepspeed --num_gpus 4 launch/train.py --deepspeed ds_configs/ep4.json --model seed-moe-e8 --output_dir runs/e8
    python launch/train.py --model tiny-moe --train_file train.txt --valid_file valid.txt --tokenizer train:4096 \\
        --output_dir runs/tiny            # one device, through accelerate (also: accelerate launch ...)

Re-running the same command resumes from --output_dir. Bad input exits with status 2 and one line.
"""

import sys

from moe_dist.train.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
