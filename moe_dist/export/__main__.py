"""`python -m moe_dist.export CHECKPOINT_OR_RUN OUT_DIR`: see `moe_dist.export`."""

import sys

from . import main

sys.exit(main())
