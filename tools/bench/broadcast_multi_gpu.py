"""Weight broadcast trainer rank 0 -> every rollout rank, against the all-reduce bus bandwidth.

Start one rank per GPU the way a cluster does (``mpiexec -n 4 python tools/bench/broadcast_multi_gpu.py``
or ``srun``); rank 0 plays trainer 0, the others rollout ranks. For each model shape the version goes
through the system's own ``WeightSender`` / ``WeightReceiver`` (flat buckets, asynchronous, committed
only when every bucket has arrived), timed from the send to the last rank's completion. In the same
run an all-reduce of the same bytes over all ranks gives the link's bus bandwidth, 2(n-1)/n x bytes /
time (NCCL's definition), which a broadcast of B bytes should approach as B / time. NCCL on GPUs,
gloo on CPU (``--quick`` runs small shapes on CPU so the script is tested without GPUs).
NVLink multicast stays off (NCCL_NVLS_ENABLE=0) in this process and any it starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from areal_hpc.comm.devices import bind_gpu  # noqa: E402
from areal_hpc.comm.dist import init_distributed, shutdown_distributed  # noqa: E402
from areal_hpc.comm.mpi import MPIContext, world_size  # noqa: E402
from areal_hpc.model.presets import preset_config  # noqa: E402
from areal_hpc.weights.broadcast import WeightReceiver, WeightSender  # noqa: E402
from tools.bench.common import device_info, write_result  # noqa: E402


def shapes(preset: str, quick: bool) -> list[tuple[str, tuple[int, ...]]]:
    from transformers import Qwen2ForCausalLM

    cfg = preset_config(preset)
    if quick:
        cfg.num_hidden_layers, cfg.vocab_size = 2, 4096
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def time_broadcast(ctx: MPIContext, group, spec, device, dtype, bucket_mb: int,
                   versions: int) -> tuple[list[float], bool]:
    params = [(n, torch.randn(s, device=device).to(dtype) if ctx.rank == 0 else torch.empty(s, device=device,
                                                                                           dtype=dtype))
              for n, s in spec]
    sender = WeightSender(params, group, bucket_mb, device) if ctx.rank == 0 else None
    receiver = WeightReceiver(params, group, bucket_mb, device) if ctx.rank != 0 else None
    times = []
    for v in range(versions + 1):  # the first is warm-up (communicator set-up, buffers)
        ctx.world.Barrier()
        t = time.perf_counter()
        if sender is not None:
            sender.send(params)
            sender.wait()
        else:
            receiver.announce(v)
            receiver.ready(block=True)
            receiver.post_next()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ctx.world.Barrier()
        times.append(time.perf_counter() - t)
    flat = (sender or receiver).buckets.flat  # the last version must be identical on every rank
    checksum = [float(f.double().sum()) for f in flat]
    ok = all(c == checksum for c in ctx.allgather(checksum))
    return times[1:], ok


def allreduce_busbw(device, dtype, nbytes: int, repeat: int, n: int) -> float:
    x = torch.ones(nbytes // torch.finfo(dtype).bits * 8, device=device, dtype=dtype)
    dist.all_reduce(x)
    times = []
    for _ in range(repeat):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    t = sorted(times)[len(times) // 2]
    return 2 * (n - 1) / n * nbytes / t / 1e9


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["qwen2-0.5b", "qwen2-1.5b"])
    ap.add_argument("--versions", type=int, default=5)
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="CPU/gloo, 2-layer small-vocab slices")
    ap.add_argument("--out", default="broadcast_multi_gpu.json", help="result JSON (default: in the current folder)")
    args = ap.parse_args(argv)
    if world_size() < 2:
        raise SystemExit("start at least 2 ranks: mpiexec -n 2 python tools/bench/broadcast_multi_gpu.py")
    ctx = MPIContext(1, world_size() - 1)
    gpu = bind_gpu(ctx, "cpu" if args.quick else "auto")
    if gpu.shared:
        raise SystemExit(f"{ctx.world.size} ranks but {gpu.n_gpus} GPUs on a node: NCCL needs one GPU per rank; "
                         "start as many ranks per node as it has GPUs (or use --quick on CPU)")
    groups = init_distributed(ctx, "gloo" if args.quick else "auto", timeout_s=600)
    device = torch.device("cuda", gpu.device) if gpu.device is not None else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = ctx.world.size
    rows = []
    for preset in args.presets:
        spec = shapes(preset, args.quick)
        nbytes = sum(torch.Size(s).numel() for _, s in spec) * torch.finfo(dtype).bits // 8
        times, same = time_broadcast(ctx, groups.weights, spec, device, dtype, args.bucket_mb, args.versions)
        bus = allreduce_busbw(device, dtype, nbytes, 5, n)
        med = sorted(times)[len(times) // 2]
        rows.append({"preset": preset + (" (quick slice)" if args.quick else ""), "bytes": nbytes,
                     "broadcast_ms": 1e3 * med, "broadcast_GBps": nbytes / med / 1e9, "allreduce_busbw_GBps": bus,
                     "broadcast_vs_busbw": nbytes / med / 1e9 / bus, "identical_on_all_ranks": same,
                     "ms_all": [1e3 * t for t in times]})
    result = None
    if ctx.rank == 0:
        print(f"{n} ranks ({groups.backend}), 1 sender -> {n - 1} receivers, median of {args.versions}")
        print(f"{'shape':24} {'MB':>8} {'bcast ms':>9} {'bcast GB/s':>11} {'allreduce busbw':>16} {'ratio':>6} "
              f"{'identical':>9}")
        for r in rows:
            print(f"{r['preset']:24} {r['bytes'] / 1e6:>8.0f} {r['broadcast_ms']:>9.2f} {r['broadcast_GBps']:>11.1f} "
                  f"{r['allreduce_busbw_GBps']:>16.1f} {r['broadcast_vs_busbw']:>6.2f} "
                  f"{str(r['identical_on_all_ranks']):>9}")
        result = {**device_info(device), "ranks": n, "backend": groups.backend, "bucket_mb": args.bucket_mb,
                  "rows": rows}
        write_result(args.out, result)
    shutdown_distributed()
    return result


if __name__ == "__main__":
    main()
