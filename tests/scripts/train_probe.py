"""Run under a launcher: the real trainer, with what each rank did recorded for the test to read.

    deepspeed --num_gpus 2 tests/scripts/train_probe.py OUT_DIR <launch/train.py arguments>

Trains through `moe_dist.train.cli.main`, as `launch/train.py` would, after wrapping three things:
`torch.distributed.all_reduce` (every collective sum of the engines, DeepSpeed's `deepspeed.comm`
included, goes through it), the engine's router-bias update, and, from the second step on, every
router's forward (a hook).
Each rank writes OUT_DIR/rank{R}.json with:
- `all_reduces`: the shape of every all-reduce of the run, in order;
- `steps`: per optimizer step, the all-reduces made inside the bias update, whether the step applied
  it, this rank's own selection counts per layer (before the sum), every router's bias after it, and
  how often the guarded optimizer's `step()` ran and the shapes of the all-reduces made inside it;
- `router_dtypes`: the dtypes seen at the routers from step 2 on (input, gate weights, loss);
- `first_router_weights`, `router_weights`: every router's weight after the first optimizer step
  and after training, as float64 lists.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moe_dist.model.routing import Router
from moe_dist.parallel.engines import TrainEngine
from moe_dist.parallel.optim import GuardedAdamW
from moe_dist.train.cli import main

shapes: list[list[int]] = []
steps: list[dict] = []
router_dtypes: set[str] = set()
trained: list[Router] = []  # the engine's routers, found at the first bias update
first_weights: list = []  # their weights after the first optimizer step

guard = {"calls": 0, "all_reduces": []}  # the guarded optimizer's step() in the current optimizer step

_all_reduce = dist.all_reduce
_update = TrainEngine.update_router_biases
_guard_step = GuardedAdamW.step


def counting_all_reduce(tensor, *args, **kwargs):
    shapes.append(list(tensor.shape))
    return _all_reduce(tensor, *args, **kwargs)


def counted_guard_step(self, closure=None):
    before = len(shapes)
    result = _guard_step(self, closure)
    guard["calls"] += 1
    guard["all_reduces"] += shapes[before:]
    return result


def recorded_update(self, apply: bool) -> None:
    if not trained:  # the dtypes are recorded from the second step on
        trained.extend(self.model.routers())
        for router in trained:
            router.register_forward_hook(record_dtypes)
    before = len(shapes)
    local_loads = [load.tolist() for load in self.model.router_loads()]
    _update(self, apply)
    if not first_weights:
        first_weights.extend(router_weights())
    steps.append(
        {
            "apply": apply,
            "all_reduces": shapes[before:],
            "local_loads": local_loads,
            "bias": [router.score_bias.tolist() for router in self.model.routers()],
            "guard_calls": guard["calls"],
            "guard_all_reduces": guard["all_reduces"],
        }
    )
    guard.update(calls=0, all_reduces=[])


def record_dtypes(router, inputs, routing) -> None:
    router_dtypes.update(
        {f"input:{inputs[0].dtype}", f"weight:{routing.weight_TK.dtype}", f"loss:{routing.loss.dtype}"}
    )


def router_weights() -> list:
    return [r.weight.detach().to(torch.float64).tolist() for r in trained]


if __name__ == "__main__":
    # The deepspeed launcher puts --local_rank=N first; the trainer finds its rank in the environment.
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_dir, train_args = Path(args[0]), args[1:]
    dist.all_reduce = counting_all_reduce
    TrainEngine.update_router_biases = recorded_update
    GuardedAdamW.step = counted_guard_step
    code = main(train_args)
    rank = int(os.environ.get("RANK", 0))
    (out_dir / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "exit": code,
                "all_reduces": shapes,
                "steps": steps,
                "router_dtypes": sorted(router_dtypes),
                "first_router_weights": first_weights,
                "router_weights": router_weights(),
            }
        )
    )
    sys.exit(code)
