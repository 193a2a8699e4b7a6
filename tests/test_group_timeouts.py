"""Every process group times out after the `--dist_timeout` watchdog, so the watchdog's message
(which names the stuck rank) always ends a hung job first.

DeepSpeed makes its expert groups, and inside `deepspeed.initialize` its data-parallel copy of the world
group, with `new_group(ranks)` and no timeout, and torch's `new_group(timeout=None)` takes the backend's
constant (NCCL 10 min, gloo 30 min), not the default group's: the engine sets them itself, after
initialize. Read under the real 2-rank launcher, on gloo, with EP and with ETP.
"""

import json
from pathlib import Path

import pytest
from launcher import CPU_EP2, DATA_ARGS, ROOT, check, deepspeed

from moe_dist.parallel.process_group import WATCHDOG_MARGIN_S

pytestmark = pytest.mark.multirank

SCRIPT = ROOT / "tests" / "scripts" / "group_timeouts.py"


@pytest.mark.parametrize("moe", [{"ep_size": 2}, {"ep_size": 1, "etp_size": 2}], ids=["ep2", "etp2"])
def test_every_group_the_engine_reaches_times_out_after_the_dist_timeout_watchdog(tmp_path, moe):
    dist_timeout = 2400  # not torch's 1800 s gloo default, so an untouched group would show
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({**json.loads(Path(CPU_EP2).read_text()), "moe": moe}))
    check(
        deepspeed(
            SCRIPT,
            [
                str(tmp_path),
                "--deepspeed",
                str(config),
                "--model",
                "tiny-moe",
                *DATA_ARGS,
                "--max_steps",
                "1",
                "--eval_every",
                "1",
                "--dist_timeout",
                str(dist_timeout),
                "--output_dir",
                str(tmp_path / "run"),
            ],
        )
    )
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["exit"] == 0
        groups = seen["groups"]
        assert {"world", "deepspeed_data_parallel"} <= set(groups), sorted(groups)
        assert any(name.startswith("expert:") for name in groups), sorted(groups)
        assert any(name.startswith("etp_group:") for name in groups) == ("etp_size" in moe), sorted(groups)
        assert groups == {name: dist_timeout + WATCHDOG_MARGIN_S for name in groups}, groups
