"""The proximal pass's cost: trainer.proximal_logp=forward against recompute, side by side in one run.

Each mode (sync, and async at each η) runs the same config twice per round, once with the proximal
log-probs taken from the training forward (the default) and once with the separate no-grad pass,
alternating which goes first, over ``--rounds`` rounds. The table gives samples/s, the trainer's
compute seconds per step (proximal pass, update and weight send, from metrics.jsonl) and the
forward/recompute ratios, with held-out accuracy after RL, so a speed gain is not bought with
learning. The two settings give the same update (tests/test_train_engine.py), so the accuracies
should agree up to run-to-run noise.

    python tools/bench/proximal_pass.py --steps 200 --eta 4 --out tools/bench/results/proximal_pass_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.async_vs_sync import run  # noqa: E402
from tools.bench.common import device_info, write_result  # noqa: E402


def train_seconds(run_dir: Path, skip: int = 2) -> float:
    """Mean trainer compute seconds per step after the first ``skip`` steps."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] > skip]
    return statistics.fmean(r["t_step"] - r["t_data"] for r in rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eta", type=int, nargs="*", default=[4])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="proximal_pass_cpu.json", help="result JSON (default: in the current folder)")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args(argv)
    modes = [("sync", 0, ["async=false", "rollout.eta=0"])] + [("async", e, [f"rollout.eta={e}"]) for e in args.eta]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for k in range(args.rounds):
            for mode, eta, extra in modes:
                order = ("forward", "recompute") if k % 2 == 0 else ("recompute", "forward")
                for prox in order:
                    name = f"{mode}{eta}_{prox}_{k}"
                    s = run(args.config, root, name, [f"run.steps={args.steps}", *args.overrides, *extra,
                                                      f"trainer.proximal_logp={prox}"])
                    runs.append({"mode": mode, "eta": eta, "proximal_logp": prox, "round": k,
                                 "samples_per_s": s["samples_per_s"], "accuracy_after": s["accuracy_after"],
                                 "train_s_per_step": train_seconds(root / name)})
    rows = []
    print(f"{'mode':6} {'eta':>3} {'fwd samples/s':>13} {'rec samples/s':>13} {'ratio':>6} "
          f"{'fwd train s':>11} {'rec train s':>11} {'ratio':>6} {'acc fwd':>7} {'acc rec':>7}")
    for mode, eta, _ in modes:
        def mean(prox: str, key: str, mode=mode, eta=eta) -> float:
            return statistics.fmean(r[key] for r in runs
                                    if (r["mode"], r["eta"], r["proximal_logp"]) == (mode, eta, prox))
        row = {"mode": mode, "eta": eta, **{f"{p}_{k}": mean(p, k) for p in ("forward", "recompute")
                                            for k in ("samples_per_s", "train_s_per_step", "accuracy_after")}}
        row["samples_ratio"] = row["forward_samples_per_s"] / row["recompute_samples_per_s"]
        row["train_time_ratio"] = row["forward_train_s_per_step"] / row["recompute_train_s_per_step"]
        rows.append(row)
        print(f"{mode:6} {eta:>3} {row['forward_samples_per_s']:>13.1f} {row['recompute_samples_per_s']:>13.1f} "
              f"{row['samples_ratio']:>5.2f}x {row['forward_train_s_per_step']:>11.4f} "
              f"{row['recompute_train_s_per_step']:>11.4f} {row['train_time_ratio']:>5.2f}x "
              f"{row['forward_accuracy_after']:>7.3f} {row['recompute_accuracy_after']:>7.3f}")
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {**device_info(dev), "config": Path(args.config).name, "steps": args.steps, "rounds": args.rounds,
              "overrides": args.overrides, "summary": rows, "runs": runs}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
