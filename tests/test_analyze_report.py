"""``areal-hpc analyze`` as a user meets it: sweeps, logs with pieces missing, and figures worth reading.

The runs are written with the real ShardWriter (``make_run`` of test_analyze); figures are checked through
the numbers and artists the plotting code computes, not through pixels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from areal_hpc.analysis import sweep as sweep_mod
from areal_hpc.analysis.cli import main
from areal_hpc.analysis.plots import (
    COMPARE_FILE,
    PLOT_FILES,
    figure_compare,
    figure_response_length,
    figure_reward_accuracy,
    response_length_data,
)
from areal_hpc.analysis.tables import comparison_table, coverage, format_header, load_run, per_step
from areal_hpc.launch.run_dir import SWEEP_FILE
from tests.test_analyze import N_STEPS, PER_SHARD, PER_STEP, _check_png, make_run


def _make_sweep(root: Path, etas: tuple[int, ...] = (2, 4), *, dead_point: bool = True) -> Path:
    """A sweep folder as ``areal-hpc submit --sweep rollout.eta=...`` leaves it, plus, with ``dead_point``, a
    point whose job failed before writing any shard, and the Slurm job-log folder."""
    sweep = root / "quickstart-sweep-20260101-000000"
    sweep.mkdir(parents=True)
    rows = []
    for k, eta in enumerate(etas):
        label = f"rollout.eta={eta}"
        make_run(sweep, label, eta, seed=10 + k)
        rows.append({"point": {"rollout.eta": str(eta)}, "run_dir": str((sweep / label).resolve()),
                     "job_id": str(100 + k), "log_folder": None, "returncode": None})
    if dead_point:
        (sweep / "rollout.eta=8").mkdir()
        (sweep / "rollout.eta=8" / "config.yaml").write_text("run: {name: x}\n")
        rows.append({"point": {"rollout.eta": "8"}, "run_dir": str((sweep / "rollout.eta=8").resolve()),
                     "job_id": "199", "log_folder": None, "returncode": None})
    (sweep / "submitit").mkdir()
    (sweep / "submitit" / "100_log.out").write_text("job log\n")
    record = {"config": "configs/quickstart.yaml", "overrides": [],
              "sweep": ["rollout.eta=" + ",".join(map(str, etas))], "mode": "slurm",
              "created": "2026-01-01T00:00:00", "submitit_folder": None, "runs": rows}
    (sweep / SWEEP_FILE).write_text(json.dumps(record, indent=2))
    return sweep


def _analyze_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[dict[str, Any], str]:
    capsys.readouterr()
    assert main([*argv, "--format", "json"]) == 0
    got = capsys.readouterr()
    return json.loads(got.out), got.err


def test_sweep_record_name_matches_submit() -> None:
    assert sweep_mod.SWEEP_FILE == SWEEP_FILE


def test_sweep_folder_and_its_glob_give_its_runs_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _make_sweep(tmp_path)
    by_folder, err = _analyze_json(capsys, [str(sweep), "--no-plots"])
    assert [r["info"]["sweep_point"] for r in by_folder["runs"]] == [{"rollout.eta": "2"}, {"rollout.eta": "4"}]
    assert "sweep point left out" in err and "rollout.eta=8" in err and len(err.splitlines()) == 1
    assert [row["run"] for row in by_folder["compare"]] == ["rollout.eta=2", "rollout.eta=4"]
    assert by_folder["sweep_dir"] == str(sweep)
    # the shell's expansion of SWEEP_DIR/*: sweep.json, the job logs and every run folder
    glob = [str(p) for p in sorted(sweep.iterdir())]
    assert any(p.endswith(SWEEP_FILE) for p in glob) and any(p.endswith("submitit") for p in glob)
    by_glob, _ = _analyze_json(capsys, [*glob, "--no-plots"])
    assert [r["info"]["name"] for r in by_glob["runs"]] == ["rollout.eta=2", "rollout.eta=4"]
    by_file, _ = _analyze_json(capsys, [str(sweep / SWEEP_FILE), "--no-plots"])
    assert by_file["compare"] == by_folder["compare"]
    # the dead point named on its own is what the user asked for: refused, not silently left out
    assert main([str(sweep / "rollout.eta=8"), "--no-plots"]) == 2
    assert "rollout.eta=8" in capsys.readouterr().err


def test_sweep_figures_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _make_sweep(tmp_path, dead_point=False)
    capsys.readouterr()
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "Runs compared (sweep" in out and "[rollout.eta=4]" in out
    names = sorted(p.name for p in (sweep / "analysis").glob("*.png"))
    assert names == sorted([*PLOT_FILES, COMPARE_FILE])
    for p in (sweep / "analysis").glob("*.png"):
        _check_png(p)
    # the analysis folder now sits in the sweep: a second glob over it still means the same runs
    obj, _ = _analyze_json(capsys, [*(str(p) for p in sorted(sweep.iterdir())), "--no-plots"])
    assert len(obj["runs"]) == 2

    runs = [load_run(sweep / f"rollout.eta={eta}", point=(("rollout.eta", str(eta)),)) for eta in (2, 4)]
    table = comparison_table(runs)
    assert list(table["run"]) == ["rollout.eta=2", "rollout.eta=4"]
    assert list(table["trained"]) == [N_STEPS * PER_STEP] * 2 and list(table["generated"]) == [800, 800]
    assert (table["trained_per_s"] > 0).all() and (table["generated_per_s"] > 0).all()
    fig = figure_compare(runs)
    reward_ax, rate_ax = fig.axes[0], fig.axes[1]  # no summary.json: no held-out panel
    assert len(fig.axes) == 2
    assert [t.get_text() for t in reward_ax.get_legend().get_texts()][0].startswith("rollout.eta=2")
    assert [t.get_text() for t in rate_ax.get_xticklabels()] == ["rollout.eta=2", "rollout.eta=4"]
    heights = [b.get_height() for b in rate_ax.patches]
    assert heights == pytest.approx([*table["generated_per_s"], *table["trained_per_s"]])


def test_moved_sweep_and_bad_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _make_sweep(tmp_path / "a", dead_point=False)
    moved = tmp_path / "b" / sweep.name
    shutil.copytree(sweep, moved)
    shutil.rmtree(sweep)  # sweep.json's absolute run_dir paths now point nowhere
    obj, _ = _analyze_json(capsys, [str(moved), "--no-plots"])
    assert [Path(r["info"]["run_dir"]).parent for r in obj["runs"]] == [moved, moved]
    (moved / SWEEP_FILE).write_text("{not json")
    assert main([str(moved), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and SWEEP_FILE in err


def _copy(tmp_path: Path, name: str) -> Path:
    src = tmp_path / "src"
    if not src.exists():
        make_run(src, "run", 2, seed=5)
    dst = tmp_path / name
    shutil.copytree(src / "run", dst)
    return dst


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_damaged_trainer_shard_names_the_missing_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(tmp_path, "damaged")
    _truncate(run / "trainer_log" / "trainer-t000-000000.h5")  # steps 1-15
    header = "\n".join(format_header(load_run(run)))
    assert f"MISSING trainer log: steps 1-15 of {N_STEPS} missing (1 damaged trainer shard skipped)" in header
    assert f"{N_STEPS}/{N_STEPS} steps" not in header and f"15 of {N_STEPS} steps in the trainer log" in header
    obj, err = _analyze_json(capsys, [str(run), "--no-plots"])
    missing = obj["runs"][0]["info"]["missing"]
    assert missing["trainer_steps"] == "1-15" and missing["trainer_steps_count"] == 15
    assert err.count("trainer-t000-000000.h5") == 1


def test_deleted_trainer_shard_is_named_absent(tmp_path: Path) -> None:
    run = _copy(tmp_path, "deleted")
    (run / "trainer_log" / "trainer-t000-000000.h5").unlink()
    cov = coverage(load_run(run))
    assert cov.missing_steps == [(1, 15)]
    assert cov.lines() == [f"trainer log: steps 1-15 of {N_STEPS} missing (absent: trainer rank 0: shard 0)"]


def test_damaged_rollout_shard_explains_trained_without_record(tmp_path: Path) -> None:
    run = _copy(tmp_path, "rollout")
    _truncate(run / "rollout_log" / "rollout-r000-000000.h5")
    data = load_run(run)
    lost = 800 - len(data.samples)
    assert lost == PER_SHARD
    seen = data.step_samples["sample_id"].unique()
    unmatched = int((~np.isin(seen, data.samples["sample_id"])).sum())
    assert unmatched > 0
    header = "\n".join(format_header(data))
    assert (f"MISSING rollout log: {unmatched} of the {len(seen)} samples the trainer received have no rollout "
            f"record (1 damaged rollout shard skipped)") in header
    assert f"{800 - PER_SHARD} samples generated (in the rollout log)" in header
    assert "MISSING trainer log" not in header


def test_whole_log_has_no_missing_line(tmp_path: Path) -> None:
    data = load_run(_copy(tmp_path, "whole"))
    assert coverage(data).lines() == []
    header = "\n".join(format_header(data))
    assert "MISSING" not in header and f"{N_STEPS}/{N_STEPS} steps" in header


def _summary(run: Path, before: float, after: float) -> None:
    (run / "summary.json").write_text(json.dumps({"accuracy_before": before, "accuracy_after": after,
                                                  "final_version": N_STEPS, "steps": N_STEPS}))


def _marker_points(ax: Any, marker: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for line in ax.get_lines() if line.get_marker() == marker
            for x, y in zip(line.get_xdata(), line.get_ydata())]


def test_reward_equal_to_accuracy_is_one_panel_with_heldout_marks(tmp_path: Path) -> None:
    run = _copy(tmp_path, "math")  # 0/1 rewards: reward and accuracy are one series
    _summary(run, 0.395, 0.55)
    fig = figure_reward_accuracy([load_run(run)])
    (ax,) = fig.axes
    assert "= accuracy" in ax.get_title()
    assert _marker_points(ax, "D") == [(0.0, 0.395)] and _marker_points(ax, "*") == [(float(N_STEPS), 0.55)]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("held-out accuracy 0.395 → 0.550" in t for t in labels)


def test_graded_reward_gets_its_own_panel(tmp_path: Path) -> None:
    src = make_run(tmp_path, "graded", 2, seed=7, graded=True)
    _summary(src["dir"], 0.1, 0.2)
    fig = figure_reward_accuracy([load_run(src["dir"])])
    ax_r, ax_a = fig.axes
    assert "Reward" in ax_r.get_title() and "Accuracy" in ax_a.get_title()
    r_line, a_line = ax_r.get_lines()[1], ax_a.get_lines()[1]  # the rolling means
    assert not np.allclose(r_line.get_ydata(), a_line.get_ydata())
    assert _marker_points(ax_a, "D") == [(0.0, 0.1)] and _marker_points(ax_r, "D") == []


@pytest.mark.parametrize("lengths", [(2, 3), (2990, 3010)], ids=["2-token", "3000-token"])
def test_response_length_legend_outside_and_data_in_view(tmp_path: Path, lengths: tuple[int, int]) -> None:
    src = make_run(tmp_path, "len", 2, seed=8, resp_len=lengths)
    data = load_run(src["dir"])
    d = response_length_data(data)
    assert len(d) and (d["p50"] >= lengths[0]).all() and (d["p50"] < lengths[1]).all()
    fig = figure_response_length([data])
    (ax,) = fig.axes
    lo, hi = ax.get_ylim()
    assert lo == 0 and hi > float(d["p90"].max()) * 1.05  # the curve is never on the frame
    renderer = fig.canvas.get_renderer()
    legend_box = ax.get_legend().get_window_extent(renderer)
    axes_box = ax.get_window_extent(renderer)
    assert not legend_box.overlaps(axes_box), (legend_box, axes_box)
    ticks = [t for t in ax.get_yticks() if lo <= t <= hi]
    assert all(float(t).is_integer() for t in ticks) and len(ticks) >= 3


def test_reward_curve_fills_lost_steps_from_metrics(tmp_path: Path) -> None:
    run = _copy(tmp_path, "metrics")
    _truncate(run / "trainer_log" / "trainer-t000-000000.h5")  # steps 1-15 gone from the log
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, N_STEPS + 1):
            f.write(json.dumps({"step": step, "reward": 0.01 * step, "accuracy": 0.01 * step, "samples": PER_STEP})
                    + "\n")
    ps = per_step(load_run(run))
    assert list(ps["step"]) == list(range(1, N_STEPS + 1))
    assert list(ps["reward"][:15]) == pytest.approx([0.01 * s for s in range(1, 16)])  # from metrics.jsonl
    assert list(ps["trained"][15:]) == [PER_STEP] * 15  # from the log


def test_one_point_of_a_sweep_keeps_its_label_and_not_the_sweep_output(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _make_sweep(tmp_path, dead_point=False)
    obj, _ = _analyze_json(capsys, [str(sweep / "rollout.eta=4")])
    assert obj["runs"][0]["info"]["sweep_point"] == {"rollout.eta": "4"}
    assert "sweep_dir" not in obj  # a part of the sweep: its figures go to the run's folder, not the sweep's
    assert {Path(p).parent for p in obj["plots"]} == {sweep / "rollout.eta=4" / "analysis"}
    assert not (sweep / "analysis").exists()


def test_running_run_steps_not_yet_written_are_not_called_lost(tmp_path: Path) -> None:
    r = make_run(tmp_path, "running", 3, seed=3, finished=False)  # trainer log: steps 1-15
    with open(r["dir"] / "metrics.jsonl", "w") as f:
        for step in range(1, 19):
            f.write(json.dumps({"step": step, "reward": 0.5}) + "\n")
    cov = coverage(load_run(r["dir"]))
    assert cov.missing_steps == [] and cov.pending_steps == (16, 18)
    assert cov.lines()[0].startswith("trainer log: steps 16-18 not written yet")


def _add_trainer_rank(run: Path, rank: int) -> None:
    """A second trainer rank's log over the same steps (in two shards, the last final), with empty shares."""
    from areal_hpc.storage.shards import ShardWriter

    w = ShardWriter(run / "trainer_log", "trainer", rank, attrs={"run_id": "x", "config_yaml": "", "rank": rank})
    for steps in (range(1, 16), range(16, N_STEPS + 1)):
        k = len(steps)
        rows = {"step": np.array(steps, np.int64), "trained_version": np.array(steps, np.int64) - 1,
                "time": np.full(k, 1.7e9)}
        for f in ("loss", "grad_norm", "clip_frac", "cap_frac", "importance_weight", "ratio", "approx_kl"):
            rows[f] = np.zeros(k, np.float32)
        empty = [np.zeros(0, np.int64) for _ in steps]
        ragged = {"used": {"used_sample_id": empty, "used_staleness": [e.astype(np.int32) for e in empty],
                           "used_weight": [e.astype(np.float32) for e in empty]},
                  "rejected": {"rejected_sample_id": empty, "rejected_staleness": [e.astype(np.int32) for e in empty]}}
        last = steps[-1] == N_STEPS
        w.write(rows, ragged, extra_attrs={"final": int(last)},
                extra_datasets={"leftover_sample_id": np.zeros(0, np.int64)} if last else None)


def test_one_trainer_rank_losing_a_shard_is_named(tmp_path: Path) -> None:
    run = _copy(tmp_path, "two-trainers")
    _add_trainer_rank(run, 1)
    assert coverage(load_run(run)).lines() == []
    _truncate(run / "trainer_log" / "trainer-t001-000000.h5")
    cov = coverage(load_run(run))
    assert cov.missing_steps == [] and cov.partial_ranks == ["rank 1: steps 1-15"]
    assert cov.lines() == ["trainer log: rank 1: steps 1-15 missing for that trainer rank only, so those steps lack "
                           "its share of samples (1 damaged trainer shard skipped)"]
