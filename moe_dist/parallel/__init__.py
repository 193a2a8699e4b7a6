"""Parallelism on DeepSpeed and accelerate: expert parallelism, the engines behind one interface,
the optimizer and schedule, portable (resharding) state and DeepSpeed-config checks."""
