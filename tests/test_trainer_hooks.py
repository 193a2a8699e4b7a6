"""The loop's named events and their hooks (fault injection), and the checkpoint's trainer_state.json."""

import json

import pytest
from launcher import FIXTURES

from moe_dist.train.faults import Fault, InjectedFault, hooks_from_env
from moe_dist.train.hooks import Hooks
from moe_dist.train.state import TRAINER_STATE, ReportTotals, TrainerState, read_trainer_state, write_trainer_state


def record(events):
    return lambda event: events.append((event.name, event.n, event.rank))


def test_a_fault_acts_only_at_its_event_step_and_rank(monkeypatch):
    monkeypatch.setenv("MOE_DIST_FAULT", "raise@before_step:5:1")
    assert hooks_from_env() == [Fault("raise", "before_step", 5, 1)]
    on_rank = {rank: Hooks(hooks_from_env(), rank=rank, model=None) for rank in (0, 1)}
    on_rank[0].fire("before_step", 5)
    on_rank[1].fire("before_step", 4)
    on_rank[1].fire("after_step", 5)
    with pytest.raises(InjectedFault, match="before_step, step 5, rank 1"):
        on_rank[1].fire("before_step", 5)


def test_no_fault_variable_means_no_hook(monkeypatch):
    monkeypatch.delenv("MOE_DIST_FAULT", raising=False)
    assert hooks_from_env() == []


@pytest.mark.parametrize(
    "spec,why", [("explode@after_step:3", "action must be one of"), ("exit@after_stpe:3", "event must be one of")]
)
def test_a_misspelt_fault_is_refused_rather_than_never_firing(monkeypatch, spec, why):
    monkeypatch.setenv("MOE_DIST_FAULT", spec)
    with pytest.raises(ValueError, match=why):
        hooks_from_env()


class FakeCheckpointEngine:
    def __init__(self):
        self.written = []

    def save(self, state_dict, path):
        self.written.append(path)


def test_save_file_events_count_the_files_of_each_save():
    events, writer = [], FakeCheckpointEngine()
    hooks = Hooks([record(events)], rank=1, model=None)
    hooks.watch_saved_files(writer)
    for step, files in ((8, 3), (12, 2)):
        hooks.fire("save_begin", step)
        for i in range(files):
            writer.save({}, f"step{step}/file{i}")
    assert [e for e in events if e[0] == "save_file"] == [("save_file", n, 1) for n in (1, 2, 3, 1, 2)]
    assert len(writer.written) == 5  # the real writer still ran for every file


def test_without_hooks_the_checkpoint_writer_is_left_alone():
    writer = FakeCheckpointEngine()
    original = writer.save
    Hooks([], rank=0, model=None).watch_saved_files(writer)
    assert writer.save == original


def test_trainer_state_written_before_the_split_loads_and_is_written_back_unchanged(tmp_path):
    # Written by the trainer at 2f5d997 (one TrainerState dataclass) after 2 steps of tiny-moe.
    old = json.loads((FIXTURES / "trainer_state_pre_split.json").read_text())
    (tmp_path / TRAINER_STATE).write_text(json.dumps(old))
    state, totals = read_trainer_state(tmp_path)
    assert (state.step, state.scheduler_steps, state.engine, state.sampler["step"]) == (2, 2, "accelerate", 2)
    assert (totals.last_val["ppl"], totals.peak_mem_mb_per_rank) == (
        old["last_val"]["ppl"],
        old["peak_mem_mb_per_rank"],
    )
    write_trainer_state(tmp_path, state, totals)
    assert json.loads((tmp_path / TRAINER_STATE).read_text()) == old


def test_resume_state_and_report_totals_share_no_key():
    names = [set(cls.__dataclass_fields__) for cls in (TrainerState, ReportTotals)]
    assert not names[0] & names[1]
