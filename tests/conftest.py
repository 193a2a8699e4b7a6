"""Shared test helpers: the repository on sys.path, the xdist split, and a factory for CPU-sized model configs."""

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Plain `pytest` puts neither the repository root nor tests/ (for `launcher`) on sys.path
# when the test file sits in a subfolder such as tests/faults/.
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share two cores: one torch thread each, or a worker's OpenMP threads spin
    # against the other worker's (the launched ranks get OMP_NUM_THREADS=1 from tests/launcher.py).
    torch.set_num_threads(1)


@functools.cache
def _one_unit(test_file: str) -> bool:
    """Whether a test file runs on one worker: it launches ranks, or its module fixtures build shared runs."""
    text = (ROOT / test_file).read_text()
    return "mark.multirank" in text or 'scope="module"' in text


def pytest_collection_modifyitems(items):
    """The files that are one unit of work first: the long units start at once on both workers and
    the single tests fill the gaps at the end, rather than one worker finishing a long file alone."""
    items.sort(key=lambda item: not _one_unit(item.nodeid.split("::")[0]))


def pytest_xdist_make_scheduler(config, log):
    """Under xdist with `--dist loadgroup` (the README's command) each test file that launches ranks
    (marked `multirank`) or builds shared runs in module fixtures is one unit of work: its launches run
    one at a time on one worker, beside at most one other launch on the other worker, and its module
    fixtures run once. Other tests are spread one by one. xdist's own loadgroup reads `xdist_group`
    marks into the test ids, which pytest 9.2's ids no longer take; the controller sees only ids, so
    the files are told apart by their text."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneUnitPerFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return path if _one_unit(path) else nodeid

    return OneUnitPerFile(config, log)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module that decodes tiny models: that is ~1 ms of work per token, so
    OpenMP hand-offs dominate (on a loaded 2-core machine 160 tokens took 15 s with 2 threads and
    0.4 s with 1). Launched subprocesses get OMP_NUM_THREADS=1 from tests/launcher.py."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A preset shrunk to a few thousand parameters per layer: every test model is built in milliseconds.
TINY_SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)


@pytest.fixture
def make_config():
    """`make_config(preset="tiny-moe", **overrides)`: the preset at TINY_SHAPE, then the overrides."""
    from moe_dist import MoEConfig

    def make(preset: str = "tiny-moe", **overrides):
        shape = dict(TINY_SHAPE)
        if preset in ("tiny-modern", "modern-moe"):
            shape.update(num_key_value_heads=2, moe_intermediate_size=64)
        return MoEConfig.from_preset(preset, **{**shape, **overrides})

    return make


def _made_once(tmp_path_factory, name: str, make) -> Path:
    """`<shared>/<name>/run`, made by `make(run_dir)` once per test session: under xdist the first
    worker to ask builds it under a file lock and the other worker reuses it (a session fixture
    alone is per worker, so each would train its own copy)."""
    from filelock import FileLock  # a dependency of torch

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's base folder, above the workers' own
    run_dir, done = shared / name / "run", shared / name / "done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            make(run_dir)
            done.touch()
    return run_dir


@pytest.fixture(scope="session")
def ep2_run(tmp_path_factory):
    """One uninterrupted 24-step EP=2 DeepSpeed run (2 CPU ranks), shared by every test that reads it."""
    from launcher import EP2_ARGS, TRAIN, check, deepspeed

    return _made_once(
        tmp_path_factory, "ep2", lambda run_dir: check(deepspeed(TRAIN, [*EP2_ARGS, "--output_dir", str(run_dir)]))
    )


@pytest.fixture(scope="session")
def accel_run(tmp_path_factory):
    """One uninterrupted 24-step single-process run through accelerate (no DeepSpeed engine)."""
    from launcher import ACCEL_ARGS, TRAIN, check, python

    return _made_once(
        tmp_path_factory, "accel", lambda run_dir: check(python(TRAIN, [*ACCEL_ARGS, "--output_dir", str(run_dir)]))
    )
