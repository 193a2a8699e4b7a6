"""Run under a launcher: the real trainer, recording every process group's timeout once the engine is built.

    deepspeed --num_gpus 2 tests/scripts/group_timeouts.py OUT_DIR <launch/train.py arguments>

Wraps the DeepSpeed engine's `_wrap` (`deepspeed.initialize`, after the MoE layers made the expert
groups) and reads, right after it, the timeout of every group the engine can reach: the world group,
DeepSpeed's data-parallel copy of it (ZeRO's non-expert reduce and gather), each expert and
expert-data-parallel group, and under ETP the slice and all-to-all groups. Each rank writes
OUT_DIR/rank{R}.json: {"exit", "groups": {name: seconds}}. The timeout is read from the gloo backend's
options (`options._timeout`), which is what CPU ranks use.
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
_wrap = DeepSpeedEngine._wrap


def timeout_s(group) -> float:
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def recorded_wrap(self, model):
    from deepspeed.utils import groups

    _wrap(self, model)
    reachable = {"world": dist.group.WORLD, "deepspeed_data_parallel": groups._get_data_parallel_group()}
    reachable.update({f"expert:{k}": g for k, g in groups._get_expert_parallel_group_dict().items()})
    reachable.update({f"expert_data:{k}": g for k, g in groups._get_expert_data_parallel_group_dict().items()})
    for name, module in self.model.named_modules():
        for attr in ("etp_group", "ep_group"):
            if getattr(module, attr, None) is not None:
                reachable[f"{attr}:{name}"] = getattr(module, attr)
    seen.update(groups={name: timeout_s(g) for name, g in reachable.items()})


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_dir, train_args = Path(args[0]), args[1:]
    DeepSpeedEngine._wrap = recorded_wrap
    code = main(train_args)
    rank = int(os.environ.get("RANK", 0))
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"exit": code, **seen}))
    sys.exit(code)
