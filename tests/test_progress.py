"""What a person watching a run sees: the progress line's pace off a terminal, and the closing table."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from areal_hpc.config import Config
from areal_hpc.phases import Phases
from areal_hpc.storage.records import RunFiles
from areal_hpc.train.progress import Progress, summary_table
from areal_hpc.trajectory import RolloutStats


def _row(step: int) -> dict[str, float]:
    return {"step": step, "version": step, "reward": 0.5, "staleness_mean": 1.0, "staleness_max": 2,
            "rejected_total": 0, "samples_per_s": 10.0, "tokens_per_s": 100.0}


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_off_a_terminal_writes_a_line_per_interval_not_per_step():
    """A Slurm output file (or mpiexec's forwarded stderr) gets the first step, then a line per
    ``every_s`` seconds, then the last step, however few steps the run has."""
    out, clock = io.StringIO(), _Clock()
    p = Progress(20, stream=out, every_s=15.0, clock=clock)
    for step in range(1, 21):
        p.update(_row(step))
        clock.t += 2.0  # a step every 2 s: a line every 8 steps
    p.close()
    steps = [int(line.split("step ")[1].split("/")[0]) for line in out.getvalue().splitlines()]
    assert steps == [1, 9, 17, 20], out.getvalue()


def test_progress_slower_steps_than_the_interval_get_a_line_each():
    out, clock = io.StringIO(), _Clock()
    p = Progress(3, stream=out, every_s=15.0, clock=clock)
    for step in range(1, 4):
        p.update(_row(step))
        clock.t += 60.0
    assert len(out.getvalue().splitlines()) == 3


def _summary(**extra) -> dict:
    return {"async": True, "eta": 4, "n_trainer": 1, "n_rollout": 2, "accuracy_before": 0.4,
            "accuracy_after": 0.55, "steps": 300, "final_version": 300, "samples_trained": 38400.0,
            "samples_per_s": 200.0, "tokens_per_s": 1200.0, "rejected": 0, "rollout_idle_fraction": 0.1,
            "train_seconds": 192.0, "run_dir": "runs/quickstart", "checkpoint": None, **extra}


def test_closing_table_shows_generated_and_trained_tokens_per_second():
    table = summary_table(_summary(generated_tokens_per_s=1500.0))
    assert "1500 generated, 1200 trained" in table, table
    assert "1200 trained" in summary_table(_summary())  # a summary written before the generated figure


def test_summary_has_the_generated_tokens_per_second_the_table_shows(tmp_path):
    from areal_hpc.train.loop import _summary as make_summary

    rollouts = [RolloutStats(pushed=10, tokens_generated=3000), RolloutStats(pushed=10, tokens_generated=1000)]
    s = make_summary(Config(), RunFiles(tmp_path), SimpleNamespace(version=3), preempted=False, attempt=0,
                     acc_before=0.1, acc_after=0.2, train_seconds=4.0,
                     totals={"samples": 16.0, "tokens": 800.0, "rejected": 0.0, "downweighted": 0.0},
                     leftover=0, rollouts=rollouts, ckpt=None, phases=Phases())
    assert s["generated_tokens_per_s"] == pytest.approx(1000.0)
    assert "1000 generated, 200 trained" in summary_table(s)
