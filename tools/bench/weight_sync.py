"""Weight sync per version: shared buffers (CUDA IPC / shared memory) against a plain copy and broadcast.

For one model shape (default the Qwen2-0.5B preset, bf16), times a version end to end, from the
trainer starting to fill the buffers to the rollout process having copied it into its own
parameters, through:

- shared: ``SharedWeightSender``/``SharedWeightReceiver`` between two processes (CUDA IPC on one GPU,
  /dev/shm on CPU), the reader started by subprocess, not torch.multiprocessing;
- a plain device-to-device copy of the same bytes in one process (the ceiling: shared does two);
- gloo broadcast between two processes (CPU tensors), and NCCL broadcast when two GPUs exist,
  through the same ``WeightSender``/``WeightReceiver`` the job uses.

Prints a table, writes JSON (default weight_sync_<device>.json in the current folder).

    python tools/bench/weight_sync.py                 # GPU: IPC + copy + gloo (+ NCCL with 2 GPUs)
    python tools/bench/weight_sync.py --quick         # CPU, a 2-layer slice of the shape: runs anywhere
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONPATH": str(REPO)}
WARMUP = 2


def param_shapes(preset: str, quick: bool) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of the preset (built on the meta device: no memory, no weights)."""
    from transformers import Qwen2ForCausalLM

    from areal_hpc.model.presets import preset_config

    cfg = preset_config(preset, max_positions=4096)
    if quick:  # a slice that moves in well under a second on a laptop
        cfg.num_hidden_layers, cfg.vocab_size = 2, 16384
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def make_params(shapes, dtype: torch.dtype, device: str, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator(device=device).manual_seed(seed)
    return [(n, torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dtype)) for n, s in shapes]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def copy_into(dst: dict[str, torch.Tensor], named) -> None:
    """What TorchEngine.update_weights does."""
    for name, t in named:
        dst[name].copy_(t)


# -- shared buffers ----------------------------------------------------------------------------------
def shared_reader(spec_path: str) -> None:
    """Child: map the trainer's buffers, copy every version into its own parameters, record when done."""
    from areal_hpc.weights.shared import SharedWeightReceiver

    spec = pickle.loads(Path(spec_path).read_bytes())
    device = spec["device"]
    own = dict(make_params(spec["shapes"], spec["dtype"], device, seed=1))
    rx = SharedWeightReceiver(spec["handle"], 0, torch.device(device), list(own.items()))
    done = []
    for v in range(1, spec["versions"] + 1):
        rx.announce(v)
        rx.ready(block=True)
        copy_into(own, rx.tensors())  # tensors() synchronizes and checks the slot after the copy
        done.append(time.perf_counter())
        rx.post_next()
    rx.close()
    Path(spec["out"]).write_text(json.dumps({"done": done}))


def bench_shared(shapes, args, device: str, tmp: Path) -> dict:
    from areal_hpc.weights.shared import SharedWeightSender

    params = make_params(shapes, getattr(torch, args.trainer_dtype), device)
    n = args.versions + WARMUP
    sender = SharedWeightSender(params, path=f"/dev/shm/areal_bench{uuid.uuid4().hex[:8]}_weights", n_readers=1,
                                dtype=torch.bfloat16, device=torch.device(device), timeout_s=600)
    spec = tmp / "shared_spec.pkl"
    out = tmp / "shared_out.json"
    spec.write_bytes(pickle.dumps({"handle": sender.handle(), "device": device, "shapes": shapes,
                                   "dtype": torch.bfloat16, "versions": n, "out": str(out)}))
    child = subprocess.Popen([sys.executable, __file__, "--role", "shared-reader", str(spec)], cwd=REPO, env=ENV)
    starts, fills = [], []
    try:
        for _ in range(n):
            sender.wait()  # one version in flight at a time: end to end, not pipelined
            t0 = time.perf_counter()
            sender.send(params)
            starts.append(t0)
            fills.append(time.perf_counter() - t0)
        sender.wait()
        if child.wait(600) != 0:
            raise SystemExit("shared reader failed")
    finally:
        sender.close()
    done = json.loads(out.read_text())["done"]
    ms = [(d - s) * 1e3 for s, d in zip(starts, done)][WARMUP:]
    return {"ms": ms, "fill_ms": [f * 1e3 for f in fills][WARMUP:], "wait_s": sender.seconds_waiting}


def bench_copy(shapes, args, device: str) -> dict:
    nbytes = sum(torch.Size(s).numel() for _, s in shapes) * 2
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = []
    for _ in range(args.versions + WARMUP):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        ms.append((time.perf_counter() - t0) * 1e3)
    return {"ms": ms[WARMUP:]}


# -- broadcast ---------------------------------------------------------------------------------------
def bcast_rank(spec_path: str, rank: int) -> None:
    """Child: one rank of a 2-process broadcast through the job's WeightSender/WeightReceiver."""
    import torch.distributed as dist

    from areal_hpc.weights.broadcast import WeightReceiver, WeightSender

    spec = json.loads(Path(spec_path).read_text())
    device = "cpu" if spec["backend"] == "gloo" else f"cuda:{rank}"
    if device != "cpu":
        torch.cuda.set_device(rank)
    dist.init_process_group(spec["backend"], init_method=spec["addr"], rank=rank, world_size=2)
    shapes = [(n, tuple(s)) for n, s in spec["shapes"]]
    params = make_params(shapes, torch.bfloat16, device, seed=rank)
    times = []
    if rank == 0:
        tx = WeightSender(params, None, spec["bucket_mb"], torch.device(device))
    else:
        rx = WeightReceiver(params, None, spec["bucket_mb"], torch.device(device))
        own = dict(params)
    for v in range(spec["versions"]):
        dist.barrier()
        _sync(device)
        if rank == 0:
            times.append(time.perf_counter())
            tx.send(params)
            tx.wait()
        else:
            rx.announce(v)
            rx.ready(block=True)
            copy_into(own, rx.tensors())
            _sync(device)
            times.append(time.perf_counter())
            rx.post_next()
    dist.barrier()
    dist.destroy_process_group()
    Path(spec["out"] + f".{rank}").write_text(json.dumps(times))


def bench_bcast(shapes, args, backend: str, tmp: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = tmp / f"{backend}_spec.json"
    out = tmp / f"{backend}_out"
    spec.write_text(json.dumps({"backend": backend, "addr": f"tcp://127.0.0.1:{port}", "shapes": shapes,
                                "versions": args.versions + WARMUP, "bucket_mb": args.bucket_mb, "out": str(out)}))
    procs = [subprocess.Popen([sys.executable, __file__, "--role", "bcast", str(spec), "--rank", str(r)], cwd=REPO,
                              env=ENV) for r in (0, 1)]
    if any(p.wait(1200) != 0 for p in procs):
        raise SystemExit(f"{backend} broadcast failed")
    t0, t1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1))
    return {"ms": [(b - a) * 1e3 for a, b in zip(t0, t1)][WARMUP:]}


# -- driver ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2-0.5b")
    ap.add_argument("--versions", type=int, default=10, help="timed versions per path (median reported)")
    ap.add_argument("--quick", action="store_true", help="CPU, a 2-layer slice of the shape")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--trainer-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="trainer parameters (float32: master weights converted during the fill)")
    ap.add_argument("--bucket-mb", type=int, default=64, help="broadcast bucket size")
    ap.add_argument("--no-broadcast", action="store_true", help="skip the gloo/NCCL comparison")
    ap.add_argument("--out", default=None,
                    help="result JSON (default: weight_sync_<device>.json in the current folder)")
    ap.add_argument("--role", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "shared-reader":
        return shared_reader(args.spec)
    if args.role == "bcast":
        return bcast_rank(args.spec, args.rank)

    cuda = torch.cuda.is_available() and not args.quick and args.device != "cpu"
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda but no CUDA device is visible (or --quick given)")
    device = "cuda:0" if cuda else "cpu"
    shapes = param_shapes(args.preset, args.quick)
    mb = sum(torch.Size(s).numel() for _, s in shapes) * 2 / 2**20
    tmp = Path(f"/tmp/weight_sync_{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    rows = []

    def add(path: str, where: str, res: dict) -> None:
        med = statistics.median(res["ms"])
        rows.append({"path": path, "device": where, "mb_per_version": mb, "ms_median": med,
                     "ms_min": min(res["ms"]), "gb_per_s": mb / 1024 / (med / 1e3), **res})

    add("shared (CUDA IPC)" if cuda else "shared (/dev/shm)", device, bench_shared(shapes, args, device, tmp))
    add("d2d copy" if cuda else "memcpy", device, bench_copy(shapes, args, device))
    if not args.no_broadcast:
        add("gloo broadcast", "cpu", bench_bcast(shapes, args, "gloo", tmp))
        if cuda and torch.cuda.device_count() >= 2:
            add("nccl broadcast", "cuda:0->1", bench_bcast(shapes, args, "nccl", tmp))
    copy_gbps = rows[1]["gb_per_s"]
    print(f"{args.preset}{' (quick slice)' if args.quick else ''}: {mb:.1f} MiB/version bf16, "
          f"trainer {args.trainer_dtype}, median of {args.versions}")
    print(f"{'path':20} {'device':10} {'ms/version':>11} {'GB/s':>8} {'vs copy':>8}")
    for r in rows:
        r["vs_copy"] = r["gb_per_s"] / copy_gbps
        print(f"{r['path']:20} {r['device']:10} {r['ms_median']:>11.2f} {r['gb_per_s']:>8.2f} {r['vs_copy']:>7.2f}x")
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
              "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
              "preset": args.preset, "quick": args.quick, "trainer_dtype": args.trainer_dtype,
              "versions": args.versions, "goal_ms": 50.0, "rows": rows}
    out = Path(args.out or f"weight_sync_{'cuda' if cuda else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return result


if __name__ == "__main__":
    main()
