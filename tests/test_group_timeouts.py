"""Every process group times out after the `--dist_timeout` watchdog, so the watchdog's message
(which names the stuck rank) always ends a hung job first (issue 12).

DeepSpeed makes its expert groups with `new_group(ranks)` and no timeout, and torch's
`new_group(timeout=None)` takes the backend's constant (NCCL 10 min, gloo 30 min), not the default
group's: the engine sets them itself. Read under the real 2-rank launcher, on gloo.
"""
import json

import pytest
from launcher import CPU_EP2, DATA_ARGS, ROOT, check, deepspeed

from moe_dist.parallel.process_group import WATCHDOG_MARGIN_S

pytestmark = pytest.mark.multirank

SCRIPT = ROOT / "tests" / "scripts" / "group_timeouts.py"


def test_expert_groups_time_out_after_the_dist_timeout_watchdog(tmp_path):
    dist_timeout = 2400  # not torch's 1800 s gloo default, so an untouched group would show
    check(deepspeed(SCRIPT, [str(tmp_path), "--deepspeed", CPU_EP2, "--model", "tiny-moe", *DATA_ARGS,
                             "--max_steps", "1", "--eval_every", "1",
                             "--dist_timeout", str(dist_timeout), "--output_dir", str(tmp_path / "run")]))
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["exit"] == 0
        assert seen["default"] == dist_timeout + WATCHDOG_MARGIN_S
        assert seen["expert"] and seen["expert"] == [dist_timeout + WATCHDOG_MARGIN_S] * len(seen["expert"])
