"""What attached rollout workers add: the same run with 0, 1, 2, ... workers attached, side by side in one invocation.

Each run is the quickstart (or any config) with its own rollout ranks; the workers (``python -m
areal_hpc.elastic.worker``, as ``areal-hpc attach --local`` starts them) are started as soon as the run takes
workers. ``--job-cpus``/``--worker-cpus`` pin the run's ranks and the workers to separate cores, as workers
on other nodes bring their own hardware (on a small machine: the run on core 0, the workers on core 1).
Samples/s is measured over the steps trained once every worker is ready (the run's metrics say when
``elastic/workers_live`` reaches the count), so their start-up is not counted against them; the table gives it
beside the run's rate before they joined. The machine must have the cores for the extra processes: on a
machine with fewer cores than ranks + workers they only share the same cores.

    python tools/bench/elastic_attach.py --workers 0 1 2 --steps 400 --out elastic_attach_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def steady_rate(metrics: list[dict], workers: int) -> tuple[float, int]:
    """(samples/s over the steps after ``workers`` workers were live, steps counted)."""
    start = next((i for i, m in enumerate(metrics) if m.get("elastic/workers_live", 0) >= workers), None)
    if start is None or start + 2 >= len(metrics):
        return float("nan"), 0
    a, b = metrics[start], metrics[-1]
    samples = sum(m["samples"] for m in metrics[start + 1:])
    return samples / max(b["elapsed"] - a["elapsed"], 1e-9), len(metrics) - start - 1


def _pinned(cpus: set[int] | None):
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def run(config: str, root: Path, workers: int, steps: int, overrides: list[str], job_cpus: set[int] | None = None,
        worker_cpus: set[int] | None = None) -> dict:
    name = f"w{workers}"
    cmd = [sys.executable, "-m", "areal_hpc.cli", "train", config, f"run.output_dir={root}", f"run.name={name}",
           f"run.cache_dir={root / 'cache'}", "run.progress=false", f"run.steps={steps}", "eval.enabled=false",
           "elastic.poll_s=0.2", "elastic.heartbeat_s=0.5", *overrides]
    main = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_pinned(job_cpus))
    run_dir = root / name
    procs = []
    if workers:
        while not (run_dir / "elastic" / "run.json").exists():
            if main.poll() is not None:
                raise SystemExit(f"{name} ended before taking workers:\n{main.stdout.read()[-3000:]}")
            time.sleep(0.2)
        env = dict(os.environ)
        if worker_cpus is None:
            env["SLURM_CPUS_PER_TASK"] = os.environ.get("BENCH_WORKER_THREADS", "2")
        procs = [subprocess.Popen([sys.executable, "-m", "areal_hpc.elastic.worker", str(run_dir)], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  preexec_fn=_pinned(worker_cpus))
                 for _ in range(workers)]
    out, _ = main.communicate()
    for p in procs:
        p.wait(timeout=120)
    if main.returncode != 0:
        raise SystemExit(f"{name} failed (rc {main.returncode}):\n{out[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rate, counted = steady_rate(metrics, workers)
    by_worker = {k.split("/")[1]: v for k, v in metrics[-1].items() if k.startswith("worker/") and
                 k.endswith("/samples")}
    return {"workers": workers, "samples_per_s": summary["samples_per_s"], "steady_samples_per_s": rate,
            "steady_steps": counted, "worker_samples": by_worker, "rollout_idle_fraction":
            summary["rollout_idle_fraction"], "n_rollout": summary["n_rollout"]}


def _cpus(spec: str | None) -> set[int] | None:
    if not spec:
        return None
    out: set[int] = set()
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--job-cpus", help="cores for the run's ranks, e.g. 0 or 0-7 (default: all)")
    ap.add_argument("--worker-cpus", help="cores for the attached workers, e.g. 1 or 8-15 (default: all)")
    ap.add_argument("--out", default="elastic_attach_cpu.json", help="result JSON (default: in the current folder)")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(args.config, Path(tmp), n, args.steps, args.overrides, _cpus(args.job_cpus),
                    _cpus(args.worker_cpus)) for n in args.workers]
    base = next((r["steady_samples_per_s"] for r in rows if r["workers"] == 0), rows[0]["steady_samples_per_s"])
    print(f"{'workers':>7} {'samples/s':>10} {'x no workers':>13} {'steps counted':>14} {'worker samples':>15}")
    for r in rows:
        rate = r["steady_samples_per_s"]
        r["ratio_vs_none"] = rate / base
        print(f"{r['workers']:>7} {rate:>10.1f} {r['ratio_vs_none']:>12.2f}x {r['steady_steps']:>14} "
              f"{sum(r['worker_samples'].values()):>15.0f}")
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
              "cpus": os.cpu_count(), "job_cpus": args.job_cpus, "worker_cpus": args.worker_cpus,
              "python": platform.python_version(), "steps": args.steps,
              "overrides": args.overrides, "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
