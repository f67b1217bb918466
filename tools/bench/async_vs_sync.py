"""Async vs sync, side by side in one invocation: same config, same steps, same machine.

Runs the quickstart (or any config) once with ``async: false, rollout.eta: 0`` and once per η with
the asynchronous loop, then prints a table and writes JSON with samples/s, the speedup over sync,
held-out accuracy before/after and the rollout idle fraction. Absolute numbers depend on the machine;
the ratios are the point.

    python tools/bench/async_vs_sync.py --steps 200 --eta 1 4 --out tools/bench/results/async_vs_sync_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(config: str, out_root: Path, name: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "areal_hpc.cli", "train", config, f"run.output_dir={out_root}", f"run.name={name}",
           f"run.cache_dir={out_root / 'cache'}", "run.progress=false", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out_root / name / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in ("run_dir", "checkpoint")}  # temporary folders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eta", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--out", default="async_vs_sync_cpu.json", help="result JSON (default: in the current folder)")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = [f"run.steps={args.steps}", *args.overrides]
        rows = [{"mode": "sync", "eta": 0, **run(args.config, root, "sync", [*common, "async=false", "rollout.eta=0"])}]
        for eta in args.eta:
            rows.append({"mode": "async", **run(args.config, root, f"async_eta{eta}", [*common, f"rollout.eta={eta}"])})
    base = rows[0]["samples_per_s"]
    header = ("mode", "eta", "samples/s", "speedup", "acc before", "acc after", "rollout idle")
    print("{:6} {:>3} {:>10} {:>8} {:>10} {:>9} {:>12}".format(*header))
    for r in rows:
        r["speedup_vs_sync"] = r["samples_per_s"] / base
        print(f"{r['mode']:6} {r['eta']:>3} {r['samples_per_s']:>10.1f} {r['speedup_vs_sync']:>7.2f}x "
              f"{r['accuracy_before']:>10.3f} {r['accuracy_after']:>9.3f} {r['rollout_idle_fraction']:>12.2f}")
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
              "python": platform.python_version(), "steps": args.steps, "overrides": args.overrides, "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
