"""`python -m moe_dist.export CHECKPOINT_OR_RUN OUT_DIR`: see `moe_dist.export.cli`."""

import sys

from .cli import main

sys.exit(main())
