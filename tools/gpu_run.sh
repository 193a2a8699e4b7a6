#!/usr/bin/env bash
# The lent GPU machine's one command (docs/gpu/README.md): install the wheel kit that tools/gpu_kit.py
# built into SITE, offline and beside the image's own packages, then run tools/gpu_check.py with the
# rest of the arguments. CI runs it as it is, with --dry-run, in a venv that mirrors the image.
#   bash tools/gpu_run.sh KIT SITE [gpu_check.py arguments]
set -euo pipefail
kit=$1
site=$(mkdir -p "$2" && cd "$2" && pwd)  # absolute: the check's commands run from other folders too
shift 2
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$kit"/*.whl
# The kit's packages before the image's (its transformers replaces the image's older one); the
# checkout itself is the moe_dist package; the launcher `deepspeed` is a script of the kit.
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
exec python3 tools/gpu_check.py "$@"
