"""Run under a 2-rank launcher: the real trainer, recording every process group's timeout.

    deepspeed --num_gpus 2 tests/scripts/group_timeouts.py OUT_DIR <launch/train.py arguments>

Wraps the DeepSpeed engine's `_shard` (where the MoE layers make DeepSpeed's expert groups) and
reads, right after it, the timeout of the default group and of every expert and expert-data-parallel
group this rank belongs to. Each rank writes OUT_DIR/rank{R}.json: {"exit", "default", "expert": [...]}.
The timeout is read from the gloo backend's options (`options._timeout`), which is what CPU ranks use.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moe_dist.parallel.engines import DeepSpeedEngine
from moe_dist.train.cli import main

seen: dict = {}
_shard = DeepSpeedEngine._shard


def timeout_s(group) -> float:
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def recorded_shard(self, model):
    from deepspeed.utils import groups

    model = _shard(self, model)
    made = [*groups._get_expert_parallel_group_dict().values(), *groups._get_expert_data_parallel_group_dict().values()]
    seen.update(default=timeout_s(dist.group.WORLD), expert=[timeout_s(g) for g in made])
    return model


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_dir, train_args = Path(args[0]), args[1:]
    DeepSpeedEngine._shard = recorded_shard
    code = main(train_args)
    rank = int(os.environ.get("RANK", 0))
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"exit": code, **seen}))
    sys.exit(code)
