"""``areal-hpc submit`` / ``status``: generated sbatch scripts, sweeps, local runs and argument errors.

The sbatch checks are golden-text checks in submitit's own style: build the executor and read the script it would
submit. A fake ``srun``/``sbatch`` on PATH stands in for Slurm, so nothing here needs a cluster except the test
marked ``slurm``, which runs only against ``slurm/local-cluster.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from areal_hpc.config import load_config
from areal_hpc.config.schema import RunConfig
from areal_hpc.launch import status, submit

submitit = pytest.importorskip("submitit")

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
FAST = ["run.steps=3", "eval.enabled=false", "run.progress=false", "warmup.steps=50", "run.timeout_s=240"]


def _fake_slurm(bin_dir: Path, job_id: int = 4242) -> Path:
    """``srun`` (for submitit's cluster detection) and an ``sbatch`` that accepts any script."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    scripts = {"srun": "#!/bin/sh\nexit 0\n",
               "sbatch": "#!/bin/sh\ncp \"$1\" \"$(dirname \"$0\")/last.sbatch\"\n"
                         f"echo 'Submitted batch job {job_id}'\n"}
    for name, text in scripts.items():
        p = bin_dir / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _sbatch_text(executor) -> str:
    """The script submitit would submit; the private helper's name changed across versions, so try both."""
    if hasattr(executor, "_make_submission_file_text"):
        return executor._make_submission_file_text("python -u -m submitit.core._submit FOLDER", "uid")
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command="python -u -m submitit.core._submit FOLDER", folder=executor.folder,
                               **executor.parameters)


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "areal_hpc.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env or dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    bin_dir = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


# --------------------------------------------------------------------------- golden sbatch text


def test_sbatch_script_of_a_three_rank_run(tmp_path, fake_slurm):
    cfg = load_config(QUICKSTART, ["cluster.n_trainer=1", "cluster.n_rollout=2"])
    opts = submit.SlurmOptions(time_min=42, job_name="golden", signal_delay_s=77, partition="debug")
    text = _sbatch_text(submit.build_executor(tmp_path / "submitit" / "%j", cfg, opts))
    for expected in ("--ntasks-per-node=3", "--nodes=1", "--mpi=pmi2", "--time=42", "--signal=USR2@77",
                     "--job-name=golden", "--partition=debug", "export PYTHONUNBUFFERED=1"):
        assert expected in text, f"{expected} missing from\n{text}"
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--mpi=pmi2" in shlex.split(srun) and "submitit.core._submit" in srun
    assert "-m areal_hpc.launch.mps --shell auto 3" in text  # the job's CUDA MPS daemon, before srun
    assert text.index("areal_hpc.launch.mps --shell") < text.index(srun)


def test_sbatch_script_of_a_sweep_array_on_two_nodes(tmp_path, fake_slurm):
    cfg = load_config(QUICKSTART, ["cluster.n_trainer=2", "cluster.n_rollout=4", "run.timeout_s=600"])
    opts = submit.SlurmOptions(nodes=2, job_name="sw", srun_mpi="pmix", gpus_per_task=1)
    executor = submit.build_executor(tmp_path / "submitit" / "%j", cfg, opts)
    executor.parameters["map_count"] = 2  # what submitit sets when it submits a batch of two as an array
    text = _sbatch_text(executor)
    for expected in ("--ntasks-per-node=3", "--nodes=2", "--mpi=pmix", "--time=20", "--job-name=sw",
                     "--array=0-1", "--gpus-per-task=1"):
        assert expected in text, f"{expected} missing from\n{text}"


def test_ranks_must_split_evenly_over_nodes():
    cfg = load_config(QUICKSTART, [])
    with pytest.raises(submit.UsageError, match="do not split evenly"):
        submit.slurm_parameters(cfg, submit.SlurmOptions(nodes=2))


def test_sweep_parsing_and_product():
    axes = submit.parse_sweeps(["trainer.lr=1e-4,2e-4", "trainer.adam_betas=[0.9,0.99],[0.8,0.9]"])
    assert axes[1] == ("trainer.adam_betas", ["[0.9,0.99]", "[0.8,0.9]"])
    points = submit.sweep_points(axes)
    assert len(points) == 4 and points[0] == {"trainer.lr": "1e-4", "trainer.adam_betas": "[0.9,0.99]"}
    assert submit.point_label({"a.b": "1", "c": "x/y"}) == "a.b=1_c=x-y"
    for bad in (["rollout.eta"], ["rollout.eta="], ["=1,2"], ["a=1", "a=2"], ["a=1,,2"]):
        with pytest.raises(submit.UsageError):
            submit.parse_sweeps(bad)


def test_run_task_pickles_and_requeues_itself(tmp_path):
    cfg_path = tmp_path / "run" / "config.yaml"
    from areal_hpc.config import save_config

    save_config(load_config(QUICKSTART, [f"run.output_dir={tmp_path}", "run.name=run"]), cfg_path)
    task = pickle.loads(pickle.dumps(submit.RunTask(str(cfg_path))))
    assert isinstance(task, submitit.helpers.Checkpointable)
    delayed = task.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    again = delayed.function
    assert isinstance(again, submit.RunTask) and again.resumed and again.config_path == str(cfg_path)
    if hasattr(RunConfig, "resume"):  # the job can resume: the requeued start continues from the checkpoint
        assert load_config(cfg_path).run.resume == "auto"


# --------------------------------------------------------------------------- the command line


def _parse_submit(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="areal-hpc")
    submit.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["submit", *argv])


@pytest.mark.parametrize("argv", [
    ["C", "a.b=1", "c.d=2", "--local"],
    ["C", "--local", "a.b=1", "c.d=2"],
    ["--local", "C", "a.b=1", "--time", "5", "c.d=2"],
    ["C", "a.b=1", "--sweep", "x.y=1,2", "c.d=2", "--local"],
])
def test_overrides_are_taken_anywhere_on_the_line(argv):
    args = _parse_submit(*argv)
    assert args.config == "C" and args.overrides == ["a.b=1", "c.d=2"] and args.local


def test_unknown_option_after_overrides_is_still_an_error(capsys):
    with pytest.raises(SystemExit):
        _parse_submit("C", "--local", "a.b=1", "--no-such-option")
    assert "--no-such-option" in capsys.readouterr().err


def test_override_after_an_option_reaches_the_run(tmp_path, fake_slurm):
    """The issue's line, ``submit CONFIG --local run.steps=20``, shape-checked without starting a job: a late
    override is applied to the run (Slurm) and validated like any other (--local)."""
    proc = _cli("submit", str(QUICKSTART), "--time", "15", f"run.output_dir={tmp_path}", "run.steps=20",
                "run.name=late", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert load_config(tmp_path / "late" / "config.yaml").run.steps == 20
    proc = _cli("submit", str(QUICKSTART), "--local", f"run.output_dir={tmp_path / 'out'}", "trainer.lrr=1e-5",
                timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "unknown config key 'trainer.lrr'" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sweep, message", [
    ("rollout.eta", "malformed --sweep"),
    ("trainer.lrr=1,2", "unknown config key 'trainer.lrr'"),
    ("trainer.lr=1e-4,abc", "expects float"),
])
def test_bad_sweep_exits_2_with_one_line_and_writes_nothing(tmp_path, sweep, message):
    proc = _cli("submit", "--local", str(QUICKSTART), f"run.output_dir={tmp_path / 'out'}", "--sweep", sweep,
                timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_slurm_sweep_submits_one_array_and_records_it(tmp_path, fake_slurm):
    env = dict(os.environ)
    proc = _cli("submit", str(QUICKSTART), f"run.output_dir={tmp_path}", "--sweep", "trainer.lr=1e-4,2e-4",
                "--sweep", "rollout.eta=0,2", "--name", "lrs", "--time", "15", env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (sweep_dir,) = tmp_path.glob("lrs-sweep-*")
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["job_id"] for r in record["runs"]] == [f"4242_{i}" for i in range(4)]
    assert record["submitit_folder"] == str((sweep_dir / "submitit" / "%j").resolve())
    assert {Path(r["run_dir"]).name for r in record["runs"]} == {
        f"trainer.lr={lr}_rollout.eta={eta}" for lr in ("1e-4", "2e-4") for eta in ("0", "2")}
    for r in record["runs"]:
        cfg = load_config(Path(r["run_dir"]) / "config.yaml")
        assert cfg.run.output_dir == str(sweep_dir) and str(cfg.rollout.eta) == r["point"]["rollout.eta"]
    script = (fake_slurm / "last.sbatch").read_text()
    assert "--array=0-3" in script and "--ntasks-per-node=3" in script and "--time=15" in script
    assert "4242_0" in proc.stdout and "submitit" in proc.stdout
    table = _cli("status", str(sweep_dir), env=env, timeout=60)
    states = [line.split()[2] for line in table.stdout.splitlines()[1:5]]
    assert table.returncode == 0 and states == ["PENDING"] * 4, table.stdout


@pytest.mark.mpi
def test_local_sweep_runs_and_status_shows_done(tmp_path):
    out = tmp_path / "out"
    proc = _cli("submit", "--local", str(QUICKSTART), *FAST, f"run.output_dir={out}",
                f"run.cache_dir={tmp_path / 'cache'}", "--sweep", "trainer.lr=1e-4,2e-4", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sweep_dir,) = out.glob("quickstart-sweep-*")
    record = json.loads((sweep_dir / "sweep.json").read_text())
    run_dirs = [Path(r["run_dir"]) for r in record["runs"]]
    assert [d.name for d in run_dirs] == ["trainer.lr=1e-4", "trainer.lr=2e-4"]
    assert all((d / "summary.json").exists() for d in run_dirs)
    assert [r["returncode"] for r in record["runs"]] == [0, 0]
    table = _cli("status", str(sweep_dir), timeout=60)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:3]}
    assert rows["trainer.lr=1e-4"][2:4] == ["DONE", "3"] and rows["trainer.lr=2e-4"][2:4] == ["DONE", "3"]
    rows_json = json.loads(_cli("status", str(run_dirs[0]), "--format", "json", timeout=60).stdout)
    assert rows_json[0]["state"] == "DONE" and rows_json[0]["step"] == 3


def test_status_falls_back_to_files(tmp_path):
    run = tmp_path / "r"
    (run / "errors").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"ste')  # a line being written
    assert status.latest_step(run) == 2 and status.file_state(run) == "RUNNING"  # an empty errors/ is no failure
    (run / "errors" / "rank1.txt").write_text("rank 1 failed")
    assert status.file_state(run) == "FAILED"
    (run / "summary.json").write_text(json.dumps({"accuracy_after": 0.5}))
    (row,) = status.collect(run)
    assert (row.state, row.step, row.accuracy) == ("DONE", 2, 0.5)
    assert _cli("status", str(tmp_path / "nothing"), timeout=60).returncode == 2


# --------------------------------------------------------------------------- a real (local) Slurm cluster
