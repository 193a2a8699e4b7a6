"""Training: command line to checked plan (before any process group), data, the loop, evaluation,
checkpoints, metrics and logs, and the watchdog."""
