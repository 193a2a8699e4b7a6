"""The run-folder check in one process: a stand-in engine plays rank 0 of two (see test_cpu_standins for real nodes)."""

import pytest

from moe_dist.train.shared_folder import MARKERS, UnsharedRunFolder, check_run_folder_shared


class Rank0Of2:
    """Rank 0 of a world of 2; `peer` runs in place of the barrier, as rank 1 would meanwhile."""

    rank, world_size, is_main = 0, 2, True

    def __init__(self, peer=lambda: None):
        self.peer, self.nonce, self.closed = peer, None, False

    def broadcast_int(self, value: int) -> int:
        self.nonce = value if self.nonce is None else self.nonce
        return value

    def barrier(self) -> None:
        self.peer()

    def close(self) -> None:
        self.closed = True


def test_a_folder_every_rank_marks_passes_and_is_left_clean(tmp_path):
    engine = Rank0Of2()
    rank1 = tmp_path / MARKERS / "rank1"
    # Rank 1 writes its marker before the first barrier and removes it before the second.
    engine.peer = lambda: rank1.unlink() if rank1.exists() else rank1.write_text(str(engine.nonce))
    check_run_folder_shared(tmp_path, engine)
    assert list(tmp_path.iterdir()) == [] and not engine.closed


@pytest.mark.parametrize("stale", [False, True])
def test_a_missing_or_stale_marker_names_the_rank(tmp_path, stale, monkeypatch):
    monkeypatch.setattr("moe_dist.train.shared_folder.PATIENCE_S", 0.0)
    if stale:  # left by an earlier launch into the same folder: another nonce
        (tmp_path / MARKERS).mkdir()
        (tmp_path / MARKERS / "rank1").write_text("12345")
    with pytest.raises(
        UnsharedRunFolder,
        match=r"is not shared by every rank: rank 0 cannot see ranks \[1\]; "
        r"put it on storage every node sees",
    ):
        check_run_folder_shared(tmp_path, engine := Rank0Of2())
    # Every rank knows the verdict, so the process group ends before any rank exits.
    assert engine.closed


def test_one_process_writes_nothing(tmp_path):
    class One(Rank0Of2):
        world_size = 1

    check_run_folder_shared(tmp_path / "run", One())
    assert not (tmp_path / "run").exists()
