"""The watchdog's heartbeat file is written at most once per second, whatever the step rate (a write
per step would be an RPC per rank per step on NFS or Lustre), and still shows the latest beat."""

import time

from moe_dist.train.watchdog import Watchdog


def test_a_thousand_beats_a_second_make_at_most_one_write_a_second(tmp_path):
    dog = Watchdog(timeout_s=600, heartbeat_dir=tmp_path, rank=3, write_every_s=0.25)
    start = time.monotonic()
    step = 0
    while time.monotonic() - start < 1.0:
        step += 1
        dog.beat(step)
        time.sleep(0.001)
    time.sleep(0.6)  # two more polls: the last beat reaches the file
    elapsed = time.monotonic() - start
    assert step > 500
    assert 1 <= dog.writes <= elapsed / 0.25 + 1, (dog.writes, elapsed)
    written_step, phase, _ = (tmp_path / "rank00003").read_text().split()
    assert (int(written_step), phase) == (step, "train")


def test_an_idle_rank_writes_nothing_more(tmp_path):
    dog = Watchdog(timeout_s=600, heartbeat_dir=tmp_path, rank=0, write_every_s=0.05)
    dog.beat(7, "eval")
    time.sleep(0.5)
    assert dog.writes == 1 and (tmp_path / "rank00000").read_text().startswith("7 eval ")
