"""``areal-hpc attach`` and the attached workers in ``areal-hpc status``, on fabricated run folders.

The run folder is what a running main job leaves (config.yaml, elastic/run.json with a fresh heartbeat); the
worker loop is a stand-in (``tests/attach_fakes.py``). The sbatch script is checked line by line against the
one submitit would submit; the submission itself is in tests/slurm/test_attach_array.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from areal_hpc import cli
from areal_hpc.config import load_config, save_config
from areal_hpc.elastic.attachable import AttachError, check_attachable, config_sha
from areal_hpc.elastic.layout import ElasticFiles, write_json
from areal_hpc.elastic.lease import Lease, read_lease
from areal_hpc.launch import attach, status

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def running_run(root: Path, name: str = "r", **run_json) -> Path:
    """A run folder as a running main job leaves it: its resolved config and a fresh ``elastic/run.json``."""
    run = root / name
    save_config(load_config(QUICKSTART, [f"run.name={name}", f"run.output_dir={root}"]), run / "config.yaml")
    files = ElasticFiles(run)
    files.root.mkdir()
    record = {"run_id": "rid", "attempt": 0, "state": "running", "policy": str(run / "policy"),
              "config_sha": config_sha((run / "config.yaml").read_text()), "time": time.time(), "host": "node1",
              "pid": 4321, **run_json}
    write_json(files.run, record)
    return run


@pytest.fixture
def run(tmp_path) -> Path:
    return running_run(tmp_path)


# --------------------------------------------------------------------------- check_attachable


def _error(run_dir: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(AttachError) as e:
        check_attachable(run_dir, list(overrides))
    text = str(e.value)
    assert "\n" not in text
    return text


def test_not_a_folder_and_not_a_run_folder(tmp_path):
    assert "is not a folder" in _error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "is not a run folder (no config.yaml)" in _error(tmp_path / "empty")


def test_an_ended_run_takes_no_worker(tmp_path):
    ended = running_run(tmp_path, "a", state="ended")
    assert "has ended (its run.json says ended)" in _error(ended)
    done = running_run(tmp_path, "b")
    (done / "summary.json").write_text(json.dumps({"preempted": False, "steps": 40}))
    assert "has ended (it left a summary.json)" in _error(done)
    preempted = running_run(tmp_path, "c")  # a preempted attempt's summary: the run goes on
    (preempted / "summary.json").write_text(json.dumps({"preempted": True}))
    check_attachable(preempted, [])


def test_a_run_not_started_or_dead_names_the_status_command(tmp_path, run):
    ElasticFiles(run).run.unlink()
    msg = _error(run)
    assert "is not running (no elastic/run.json" in msg and f"areal-hpc status {run}" in msg
    stale = running_run(tmp_path, "stale", time=time.time() - 300)
    msg = _error(stale)
    assert "heartbeat elastic/run.json is 300 s old, more than elastic.lease_s=60" in msg
    assert f"areal-hpc status {stale}" in msg
    check_attachable(stale, [], lease_s=400)  # the caller's lease_s beats the run's
    requeued = running_run(tmp_path, "rq", state="requeued", attempt=2)
    assert "preempted and requeued (attempt 2)" in _error(requeued)


def test_a_config_changed_since_the_start_is_refused(run):
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "\n# edited\n")
    assert "changed since the main job started" in _error(run)


def test_a_key_that_must_equal_the_runs_names_both_values(run):
    msg = _error(run, ["rollout.temperature=0.7"])
    assert "'rollout.temperature' is 0.7 for this worker but 1.0 in the run" in msg
    assert "attached workers must sample what the trainer expects" in msg and "vllm.*" in msg
    assert "'rollout.eta'" in _error(run, ["rollout={eta: 1}"])  # a whole section, one key differing
    assert "'elastic.lease_s'" in _error(run, ["elastic.lease_s=90"])


def test_a_typo_gets_the_loaders_own_line(run):
    assert "unknown config key 'rollout.temprature'" in _error(run, ["rollout.temprature=0.7"])
    assert "did you mean 'rollout.temperature'" in _error(run, ["rollout.temprature=0.7"])


def test_per_worker_keys_and_equal_values_are_accepted(run):
    eta = load_config(run / "config.yaml").rollout.eta
    cfg = check_attachable(run, ["rollout.dtype=float16", "rollout.max_concurrent_groups=32", "model.device=cpu",
                                 "vllm.gpu_memory_utilization=0.9", "reward.workers=4", "run.log_level=DEBUG",
                                 f"rollout.eta={eta}"])
    assert (cfg.rollout.dtype, cfg.rollout.max_concurrent_groups, cfg.vllm.gpu_memory_utilization,
            cfg.reward.workers, cfg.rollout.eta) == ("float16", 32, 0.9, 4, eta)


# --------------------------------------------------------------------------- the command


SBATCH = """#SBATCH --array=0-2%3
#SBATCH --error=RUN/elastic/slurm/%A_%a/%A_%a_0_log.err
#SBATCH --gpus-per-task=1
#SBATCH --job-name=r-attach
#SBATCH --no-requeue
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=RUN/elastic/slurm/%A_%a/%A_%a_0_log.out
#SBATCH --partition=scavenger
#SBATCH --qos=low
#SBATCH --signal=USR1@90
#SBATCH --time=120
#SBATCH --wckey=submitit"""


def test_dry_run_prints_the_array_script_that_leaves_on_usr1_and_never_requeues(run, capsys):
    pytest.importorskip("submitit")
    rc = cli.main(["attach", str(run), "--array", "0-2", "--partition", "scavenger", "--gpus-per-task", "1",
                   "--time", "120", "--qos", "low", "--dry-run", "rollout.dtype=float16",
                   "--entry", "tests.attach_fakes:lease_until_signal"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [line.replace(str(run.resolve()), "RUN") for line in out.splitlines()]
    assert "\n".join(line for line in lines if line.startswith("#SBATCH")) == SBATCH
    srun = next(line for line in lines if line.startswith("srun "))
    assert "submitit.core._submit RUN/elastic/slurm/%j" in srun and "export PYTHONUNBUFFERED=1" in lines
    assert not (run / "elastic" / "slurm").exists()  # a dry run writes nothing


def test_array_specs_count_tasks():
    assert attach.parse_array("0-7") == (8, None)
    assert attach.parse_array("0-15%4") == (16, 4)
    assert attach.parse_array("1,3,5-6") == (4, None)
    with pytest.raises(attach.UsageError, match="write it as sbatch does"):
        attach.parse_array("0-x")


def test_errors_are_one_line_and_exit_2(tmp_path, run, capsys):
    assert cli.main(["attach", str(tmp_path / "nope"), "--array", "0-1"]) == 2
    assert cli.main(["attach", str(run), "--local", "rollout.top_p=0.5"]) == 2
    assert cli.main(["attach", str(run), "--local", "--entry", "no_such_module:run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("areal-hpc: ") for line in lines), lines
    assert "is not a folder" in lines[0] and "'rollout.top_p'" in lines[1] and "no_such_module" in lines[2]


def test_local_runs_the_worker_here_and_returns_its_code(run):
    rc = cli.main(["attach", str(run), "--local", "--entry", "tests.attach_fakes:lease_once", "rollout.dtype=float16"])
    assert rc == 3
    lease = read_lease(ElasticFiles(run), 0)
    assert lease is not None and (lease.state, lease.reason, lease.job) == ("left", "rollout.dtype=float16",
                                                                            os.environ.get("SLURM_JOB_ID", "local"))


def test_the_array_task_turns_usr2_into_term_and_fails_on_a_nonzero_code(run):
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        assert attach.AttachTask(str(run), [], "tests.attach_fakes:usr2_to_self")() == 0  # submitit: requeue
        with pytest.raises(SystemExit) as e:
            attach.AttachTask(str(run), [], "tests.attach_fakes:lease_once")()
        assert e.value.code == 3
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- status


def _lease(run: Path, wid: int, state: str, age_s: float, **kw) -> None:
    files = ElasticFiles(run)
    files.worker(wid).mkdir(parents=True)
    now = time.time()
    write_json(files.lease(wid), asdict(Lease(worker=wid, attempt=0, state=state, started=now - age_s - 100,
                                              time=now - age_s, **kw)))


def _status(path: Path, fmt: str = "table") -> None:
    assert status.run(argparse.Namespace(path=path, format=fmt)) == 0


def test_status_lists_attached_workers(run, capsys):
    _lease(run, 0, "ready", 1, job="701", host="gpu-07.cluster", version=12, samples=250)
    _lease(run, 1, "left", 30, job="702", version=11, samples=100, reason="SIGTERM")
    _lease(run, 2, "ready", 61, job="703", version=9, samples=50)  # past the run's elastic.lease_s=60
    _status(run)
    out = capsys.readouterr().out
    table = out.split("attached workers of r: ")[1].splitlines()
    assert table[0] == "1 expired, 1 left, 1 ready"
    assert table[1].split() == ["worker", "job", "host", "state", "version", "samples", "samples/s", "uptime",
                                "heartbeat", "reason"]
    assert table[2].split() == ["w0000", "701", "gpu-07", "ready", "12", "250", "2.50", "1m40s", "1s", "ago"]
    assert table[3].split() == ["w0001", "702", table[3].split()[2], "left", "11", "100", "1.00", "1m40s", "30s",
                                "ago", "SIGTERM"]
    assert table[4].split()[3] == "expired"
    _status(run, "json")
    (row,) = json.loads(capsys.readouterr().out)
    assert [w["state"] for w in row["workers"]] == ["ready", "left", "expired"]


def test_status_of_a_run_without_workers_is_unchanged(run, capsys):
    _status(run)
    out = capsys.readouterr().out
    assert out == status.format_table(status.collect(run)) + "\n"
    _status(run, "json")
    assert "workers" not in json.loads(capsys.readouterr().out)[0]
