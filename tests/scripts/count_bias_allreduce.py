"""Run under a 2-rank launcher: the real trainer, with every `torch.distributed.all_reduce` counted.

    deepspeed --num_gpus 2 tests/scripts/count_bias_allreduce.py OUT_DIR <launch/train.py arguments>

Wraps `torch.distributed.all_reduce` (every collective sum of the engines, DeepSpeed's
`deepspeed.comm` included, goes through it) and the engine's router-bias update, then trains
through `moe_dist.train.cli.main`, as `launch/train.py` would. Each rank writes OUT_DIR/rank{R}.json:
the shape of every all-reduce of the run, and per optimizer step the all-reduces made inside the
bias update, whether the step applied it, and every router's bias after it.
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from moe_dist.parallel.engines import TrainEngine
from moe_dist.train.cli import main

shapes: list[list[int]] = []  # every all-reduce of the run, in order
steps: list[dict] = []

_all_reduce = dist.all_reduce
_update = TrainEngine.update_router_biases


def counting_all_reduce(tensor, *args, **kwargs):
    shapes.append(list(tensor.shape))
    return _all_reduce(tensor, *args, **kwargs)


def recorded_update(self, apply: bool) -> None:
    before = len(shapes)
    _update(self, apply)
    steps.append({"apply": apply, "all_reduces": shapes[before:],
                  "bias": [router.score_bias.tolist() for router in self.model.routers()]})


if __name__ == "__main__":
    # The deepspeed launcher puts --local_rank=N first; the trainer finds its rank in the environment.
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_dir, train_args = Path(args[0]), args[1:]
    dist.all_reduce = counting_all_reduce
    TrainEngine.update_router_biases = recorded_update
    code = main(train_args)
    rank = int(os.environ.get("RANK", 0))
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"exit": code, "all_reduces": shapes, "steps": steps}))
    sys.exit(code)
