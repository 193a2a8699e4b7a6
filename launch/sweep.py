"""Run one of the seed experiment grids, one `launch/train.py` run per point, resumably.

    python launch/sweep.py --grid experts --scale tiny --runs_dir runs -- \\
        --train_file train.txt --valid_file valid.txt --tokenizer train:4096 --max_steps 300
    python launch/sweep.py --grid router --scale seed --runs_dir runs --deepspeed ds_configs/ep4.json --num_gpus 4 \\
        -- --max_steps 2000 ...

Grids (see moe_dist/analysis/sweep.py): experts (dense, E=4/8/16 top-1), router (jitter x capacity factor),
strategy (top-1/2 vs random-1/2), balance (none, aux loss, aux-loss-free bias, + z-loss).
Each point trains into RUNS_DIR/GRID/NAME; the commands go to RUNS_DIR/GRID/sweep.json. Re-running
the same command skips finished runs (summary.json exists) and resumes the others. Arguments after
`--` go to every run. Exit status 1 when any run failed (the failures are listed), 2 on a bad sweep command.
"""

import argparse
import os
import sys

from moe_dist.analysis.sweep import GRIDS, SCALES, Launcher, SweepError, grid_points, run_sweep


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", required=True, choices=list(GRIDS))
    p.add_argument("--scale", default="tiny", choices=SCALES, help="tiny-* presets (CPU) or the seed-* presets")
    p.add_argument("--runs_dir", required=True, help="grid folders go here: RUNS_DIR/GRID/RUN")
    p.add_argument(
        "--deepspeed",
        metavar="JSON",
        help="train through `deepspeed --num_gpus N` with this config; "
        "without it each run is `python launch/train.py` (accelerate)",
    )
    p.add_argument("--num_gpus", type=int, default=None, help="ranks per run (with --deepspeed; default 1)")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run just this point of the grid (repeatable, or comma-separated)",
    )
    p.add_argument("--dry_run", action="store_true", help="print the plan and the commands, start nothing")
    p.add_argument("--list", action="store_true", help="print the grid's run names and flags, then exit")
    args = p.parse_args(ours)
    if args.num_gpus is not None and not args.deepspeed:
        p.error("--num_gpus needs --deepspeed (without it each run is one python process)")
    if args.deepspeed and not os.path.isfile(args.deepspeed):
        p.error(f"--deepspeed {args.deepspeed}: no such file")
    if args.num_gpus is not None and args.num_gpus < 1:
        p.error("--num_gpus must be >= 1")
    args.only = [name for item in args.only for name in item.split(",") if name]
    return args, extra


def main(argv: list[str]) -> int:
    args, extra = parse(argv)
    try:
        if args.list:
            for point in grid_points(args.grid, args.scale, args.only):
                print(f"{point.name:32s} {' '.join(point.args)}")
            return 0
        launcher = Launcher(args.deepspeed, args.num_gpus or 1)
        failures = run_sweep(
            args.grid, args.scale, args.runs_dir, launcher=launcher, extra=extra, only=args.only, dry_run=args.dry_run
        )
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if failures:
        print(f"[sweep] {len(failures)} run(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
