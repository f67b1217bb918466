"""End to end on one GPU: the synchronous baseline against the asynchronous loop at several η.

Rollout and trainer are separate MPI ranks sharing the GPU (``configs/gpu-synthetic.yaml``: the
Qwen2-0.5B shape with random weights, prompts of 128 tokens, long-tailed response lengths). Every
mode runs the same steps on the same data; the table gives samples/s and tokens/s, the speedup over
sync, the rollout's idle fraction, and the reward at the start and end of training (from the HDF5
log), so a speedup is not bought with learning. Per-step rewards go into the JSON.

    python tools/bench/e2e_one_gpu.py --steps 30 --eta 1 2 4 8 --out tools/bench/results/e2e_h100.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.common import device_info, write_result  # noqa: E402


def steady_rate(run_dir: Path, skip: int = 2) -> tuple[float, float]:
    """Samples/s and response tokens/s between the end of step ``skip`` and the last step.

    The first steps include one-time work (CUDA-graph capture, torch.compile, allocator growth) that
    a long run amortises; the whole-run figure is reported next to this one.
    """
    from areal_hpc.storage.runlog import RunLog

    log = RunLog(run_dir)
    steps = log.steps().sort_values("step")
    used = log.step_samples()
    used = used[(used["fate"] == "used") & (used["step"] > skip)]
    lens = log.samples(["sample_id", "response_len"]).set_index("sample_id")["response_len"]
    t = steps["time"].to_numpy()
    if len(t) <= skip + 1:
        return float("nan"), float("nan")
    dt = t[-1] - t[skip - 1]
    return len(used) / dt, float(used.join(lens, on="sample_id")["response_len"].sum()) / dt


def trainer_split(run_dir: Path, skip: int = 2) -> tuple[float, float, float]:
    """Mean seconds per steady step the trainer computed (proximal pass, update, weight send) and
    waited for data: the split the one-GPU model of the ratio needs (docs/dev/optimizing.md); and the
    tokens its forwards ran on per step (prompts and padding included: what its compute scales with)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] > skip]
    if not rows:
        return float("nan"), float("nan"), float("nan")
    stream = [r["train/stream_tokens"] for r in rows if "train/stream_tokens" in r]
    return (sum(r["t_step"] - r["t_data"] for r in rows) / len(rows), sum(r["t_data"] for r in rows) / len(rows),
            sum(stream) / len(stream) if stream else float("nan"))


def reward_curve(run_dir: Path) -> list[float]:
    """Mean reward of the samples each step trained on, in step order."""
    from areal_hpc.storage.runlog import RunLog

    log = RunLog(run_dir)
    used = log.step_samples()
    used = used[used["fate"] == "used"]
    rewards = log.samples(["sample_id", "reward"]).set_index("sample_id")["reward"]
    used = used.join(rewards, on="sample_id")
    return [float(x) for x in used.groupby("step")["reward"].mean().tolist()]


def run(config: str, root: Path, name: str, overrides: list[str], timeout: float, skip: int = 2) -> dict:
    cmd = [sys.executable, "-m", "areal_hpc.cli", "train", config, f"run.output_dir={root}", f"run.name={name}",
           "run.progress=false", *overrides]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the launcher stop its ranks and its MPS daemon: killed outright, it would leave
        # the ranks running on the GPU under the next run's measurement
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        return {"run": name, "failed": True, "rc": "timeout", "stderr_tail": (stderr or "")[-2000:]}
    proc = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
        return {"run": name, "failed": True, "rc": proc.returncode, "stderr_tail": proc.stderr[-2000:]}
    summary = json.loads((root / name / "summary.json").read_text())
    for key in ("run_dir", "checkpoint"):  # a temporary folder, gone when the bench ends
        summary.pop(key, None)
    curve = reward_curve(root / name)
    steady, steady_tok = steady_rate(root / name, skip)
    train_s, wait_s, stream = trainer_split(root / name, skip)
    k = max(1, len(curve) // 5)
    engines = [e for e in summary.get("rollout_engines", []) if e.get("decode_steps")]
    if engines:  # the rollout's decode steps: how full they ran (the bucket each step used)
        steps = sum(e["decode_steps"] for e in engines)
        summary["decode_steps"] = steps
        summary["mean_decode_batch"] = sum(e["mean_decode_batch"] * e["decode_steps"] for e in engines) / steps
        summary["tokens_per_decode_step"] = sum(e["tokens_generated"] for e in engines) / steps
    return {**summary, "wall_seconds": wall, "reward_per_step": curve, "steady_skip": skip,
            "steady_samples_per_s": steady,
            "steady_tokens_per_s": steady_tok, "steady_train_s_per_step": train_s, "steady_wait_s_per_step": wait_s,
            "steady_stream_tokens_per_step": stream,
            "reward_first": sum(curve[:k]) / k, "reward_last": sum(curve[-k:]) / k}


def _parse_vary(ap: argparse.ArgumentParser, spec: str | None) -> tuple[str | None, list[str]]:
    if spec is None:
        return None, []
    key, _, values = spec.partition("=")
    vals = [v for v in values.split(",") if v]
    if not key or "." not in key or not vals:
        ap.error(f"--vary {spec!r}: expected KEY=V1,V2 with a dotted config key, e.g. rollout.batch_bucket_step=64,0")
    return key, vals


def vary_combos(ap: argparse.ArgumentParser, specs: list[str] | None) -> list[list[tuple[str, str]]]:
    """Every combination of the values of the --vary keys, the first values first ([[]] without --vary)."""
    varies = [_parse_vary(ap, spec) for spec in specs or []]
    keys = [k for k, _ in varies]
    if len(set(keys)) < len(keys):
        ap.error(f"--vary: a key given twice ({keys}); list its values once, KEY=V1,V2")
    return [list(zip(keys, vals)) for vals in itertools.product(*(v for _, v in varies))]


def _sets(combo: list[tuple[str, str]]) -> list[str]:
    """Overrides of one combination of --vary values."""
    return [f"{k}={v}" for k, v in combo]


def vary_line(key: str, rows: list[dict]) -> str:
    """Which value of the --vary key each row ran with (an earlier sync row from --sync-from has none)."""
    def value(r: dict) -> str:
        return r.get("vary") or f"(from {r.get('sync_from')})"

    return f"--vary {key}: " + "; ".join(f"{r['mode']} eta {r['eta']} {value(r)}" for r in rows)


def phase_line(row: dict) -> str:
    """``wall 300 = steps 162 + compile 50 + build 40 + ...``: the largest phases first."""
    ph = dict(row.get("phases", {}).get("trainer", {}))
    if not ph:
        return f"wall {row.get('wall_seconds', float('nan')):.0f} (no phases recorded)"
    parts = sorted(ph.items(), key=lambda kv: -kv[1])
    shown = " + ".join(f"{k} {v:.1f}" for k, v in parts if v >= 0.5)
    rest = row.get("wall_seconds", 0.0) - sum(ph.values())
    return f"wall {row.get('wall_seconds', float('nan')):.1f} = {shown} + other {rest:.1f}"


def _earlier_sync(args: argparse.Namespace) -> dict:
    """The sync row of an earlier result with this run's config, steps and overrides, marked as such."""
    path = Path(args.sync_from)
    try:
        old = json.loads(path.read_text())
        row = next(r for r in old["runs"] if r["mode"] == "sync" and not r.get("failed"))
    except (OSError, ValueError, KeyError, StopIteration) as e:
        raise SystemExit(f"--sync-from {path}: no readable sync row in it ({e!r}); run without --sync-from") from e
    same = (old.get("config"), old.get("steps"), old.get("overrides")) == (Path(args.config).name, args.steps,
                                                                            list(args.overrides))
    if not same:
        raise SystemExit(f"--sync-from {path}: it ran config {old.get('config')}, {old.get('steps')} steps, overrides "
                         f"{old.get('overrides')}; this run is {Path(args.config).name}, {args.steps} steps, "
                         f"{list(args.overrides)}: ratios across different runs would mean nothing")
    return {**row, "sync_from": path.name}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "gpu-synthetic.yaml"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eta", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    ap.add_argument("--first-extra", type=float, default=120.0,
                    help="more seconds for the first run, which also builds the random checkpoint in the cache and "
                         "fills the compile caches (on a fresh GPU machine, a 140 s limit fit later runs, not it)")
    ap.add_argument("--stale-policy", nargs="+", default=["reject"], choices=["reject", "downweight"],
                    help="trainer.stale_policy of the async runs, each with every eta: with long-tailed lengths, "
                         "reject drops every group holding a response that spanned more than eta versions")
    ap.add_argument("--skip", type=int, default=2,
                    help="steady figures start after this step: a long async run's first steps train the "
                         "shortest samples while the long ones are still in flight")
    ap.add_argument("--abort-stale", nargs="+", default=["on"], choices=["on", "off"],
                    help="rollout.abort_stale of the reject runs, each with every eta (off: doomed groups decode "
                         "to the end, then the trainer rejects them)")
    ap.add_argument("--sync-from", default=None, metavar="JSON",
                    help="do not run sync: compare against the sync row of this earlier result (same config, steps "
                         "and overrides, checked); the ratios are then across runs, and the JSON says so")
    ap.add_argument("--vary", action="append", default=None, metavar="KEY=V1,V2",
                    help="run every async mode once per value of this config key (the sync baseline runs with the "
                         "first value), e.g. rollout.batch_bucket_step=64,0: an A/B of one setting in the same call; "
                         "given more than once, once per combination of the values")
    ap.add_argument("--cache-dir", default=None, help="shared run.cache_dir (the random checkpoint is built once)")
    ap.add_argument("--out", default="e2e_one_gpu.json", help="result JSON (default: in the current folder)")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args(argv)
    combos = vary_combos(ap, args.vary)
    vary_keys = [k for k, _ in combos[0]]
    rows = []
    meta = {"config": Path(args.config).name, "steps": args.steps, "overrides": args.overrides, "vary": args.vary,
            "sync_from": Path(args.sync_from).name if args.sync_from else None}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = args.cache_dir or str(root / "cache")
        # The runs live in a temporary folder: a final checkpoint (~7 GB for the 0.5B shape) would be written
        # only to be deleted.
        common = [f"run.steps={args.steps}", f"run.cache_dir={cache}", "run.final_checkpoint=none", *args.overrides]
        earlier = _earlier_sync(args) if args.sync_from else None
        plan = [] if earlier else [("sync", 0, "-", "sync", ["async=false", "rollout.eta=0", *_sets(combos[0])],
                                    combos[0])]
        for pol in args.stale_policy:
            for abort in (args.abort_stale if pol == "reject" else ["on"]):  # only reject aborts
                tag = ("" if pol == "reject" else f"_{pol}") + ("" if abort == "on" else "_noabort")
                flags = [f"trainer.stale_policy={pol}", f"rollout.abort_stale={abort == 'on'}"]
                for combo in combos:
                    vtag = "".join(f"_{k.rsplit('.', 1)[-1]}{v}" for k, v in combo)
                    plan += [("async", eta, pol, f"async_eta{eta}{tag}{vtag}",
                              [f"rollout.eta={eta}", *flags, *_sets(combo)], combo) for eta in args.eta]
        for mode, eta, pol, name, extra, combo in plan:
            rows.append({"mode": mode, "eta": eta, "stale_policy": pol,
                         "abort_stale": mode == "async" and "rollout.abort_stale=False" not in extra,
                         **({"vary": " ".join(_sets(combo))} if combo else {}),
                         **run(args.config, root, name, [*common, *extra],
                               args.timeout + (args.first_extra if not rows else 0.0), args.skip)})
            # A later failure or time limit keeps what ran, with what it ran (--sync-from checks those)
            write_result(args.out, {**meta, "partial": True, "runs": rows})
    if earlier:
        rows.insert(0, earlier)
    ok = [r for r in rows if not r.get("failed")]
    base = rows[0] if rows and rows[0]["mode"] == "sync" and not rows[0].get("failed") else None
    print(f"steady: steps {args.skip + 1}..end; 'tok vs sync' compares steady response tokens/s, which short "
          "async runs overstate less than samples/s (the shortest groups finish first)")
    print(f"{'mode':6} {'eta':>3} {'stale':>10} {'abort':>5} {'aborted':>7} {'rejected':>8} {'samples/s':>10} "
          f"{'tokens/s':>10} {'vs sync':>8} "
          f"{'steady/s':>9} {'vs sync':>8} "
          f"{'tok vs sync':>11} "
          f"{'idle':>6} {'train s':>7} {'wait s':>6} {'stream':>7} {'dec steps':>9} {'tok/step':>8} {'batch':>6} "
          f"{'reward first':>12} {'reward last':>11} {'mps':>7}")
    for r in ok:
        r["speedup_vs_sync"] = r["samples_per_s"] / base["samples_per_s"] if base else float("nan")
        r["steady_speedup_vs_sync"] = r["steady_samples_per_s"] / base["steady_samples_per_s"] if base else float("nan")
        r["steady_token_speedup_vs_sync"] = (r["steady_tokens_per_s"] / base["steady_tokens_per_s"]
                                             if base else float("nan"))
        print(f"{r['mode']:6} {r['eta']:>3} {r['stale_policy']:>10} {str(r['abort_stale']):>5} "
              f"{r.get('aborted_stale_groups', 0):>7} {r.get('rejected', 0):>8.0f} "
              f"{r['samples_per_s']:>10.1f} {r['tokens_per_s']:>10.0f} "
              f"{r['speedup_vs_sync']:>7.2f}x {r['steady_samples_per_s']:>9.1f} {r['steady_speedup_vs_sync']:>7.2f}x "
              f"{r['steady_token_speedup_vs_sync']:>10.2f}x "
              f"{r['rollout_idle_fraction']:>6.2f} {r['steady_train_s_per_step']:>7.2f} "
              f"{r['steady_wait_s_per_step']:>6.2f} {r.get('steady_stream_tokens_per_step', float('nan')):>7.0f} "
              f"{r.get('decode_steps', 0):>9} "
              f"{r.get('tokens_per_decode_step', float('nan')):>8.1f} {r.get('mean_decode_batch', float('nan')):>6.0f} "
              f"{r['reward_first']:>12.4f} {r['reward_last']:>11.4f} {r.get('cuda_mps', '-').split()[0]:>7}")
    if vary_keys:
        print(vary_line(", ".join(vary_keys), ok))
    print("where each run's wall time went (trainer 0's phases, seconds; the rest is the launcher's start and exit):")
    for r in ok:
        print(f"  {r['mode']} eta {r['eta']}: {phase_line(r)}")
    for r in rows:
        if r.get("failed"):
            print(f"{r['run']} (eta {r['eta']}): FAILED rc {r['rc']}")
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {**device_info(dev), **meta, "runs": rows}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
