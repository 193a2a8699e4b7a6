"""Run under `deepspeed --num_gpus 2`: `launch/generate.py --etp_size 2` for several exports in one launch.

argv: OUT_DIR. OUT_DIR/calls.json is a list of argument lists, one `main` call each; call i
writes OUT_DIR/i.json (rank 0). The process group is started here, once, by the function `main`
itself uses, so each call finds it up (and leaves it up) instead of paying a launch per export.
"""

import json
import runpy
import sys
from pathlib import Path

import torch

from moe_dist.parallel.process_group import shutdown_distributed
from moe_dist.parallel.sliced_experts import start_process_group

# launch/ is not a package on the path of a script run from tests/scripts/: load the CLI from its file.
main = runpy.run_path(str(Path(__file__).resolve().parents[2] / "launch" / "generate.py"))["main"]
out_dir = Path(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
calls = json.loads((out_dir / "calls.json").read_text())  # a file: the launcher re-quotes its arguments
start_process_group(torch.device("cpu"))
for i, args in enumerate(calls):
    code = main([*args, "--etp_size", "2", "--device", "cpu", "--json", str(out_dir / f"{i}.json")])
    if code:
        sys.exit(code)
shutdown_distributed()
