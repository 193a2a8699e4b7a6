"""The data preparation as it was before it streamed and tokenized on every core (commit 653ea5b), timed for
docs/bench/bench_data_before.json.

    git worktree add /tmp/oldtree 653ea5b
    python docs/bench/bench_data_before.py CORPUS OUT_DIR   # CORPUS: the bundled training sample x 40
"""

import json
import resource
import sys
import time

sys.path.insert(0, "/tmp/oldtree")
import moe_dist
from moe_dist.train.data import DataConfig, prepare_data

assert moe_dist.__file__.startswith("/tmp/oldtree"), moe_dist.__file__
corpus = sys.argv[1]
cfg = DataConfig(
    train_file=corpus,
    valid_file="/tmp/oldtree/tests/fixtures/stories_valid.txt",
    tokenizer="train:4096",
    seq_len=128,
    cache_dir=sys.argv[2] + "/cache",
)
t = time.perf_counter()
prepare_data(cfg, sys.argv[2] + "/run", is_main=True, barrier=lambda: None)
print(
    json.dumps(
        {"seconds": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    )
)
