"""Disk weight channel per version: what the trainer's step pays, what the disk takes, what a worker waits.

For one model shape (default the Qwen2-0.5B preset, fp32 on CPU; ``--device cuda`` for a GPU trainer),
times through ``DiskWeightWriter`` and ``DiskWeightReader`` (areal_hpc/weights/disk.py):

- publish: the snapshot into the writer's CPU buffers, the only part the training step waits for
  (the first one also allocates the buffers, reported apart);
- write: the background thread's safetensors write + fsync + rename + pointer, in seconds and MB/s
  (from a GPU it includes waiting for the asynchronous copy to finish);
- load: a reader's background load of that version, once from the page cache (the file was just
  written on this machine) and once after asking the kernel to drop the file's cached pages (what a
  worker on another node pays, to the extent the filesystem honours the hint).

Point ``--dir`` at the shared filesystem the run folder lives on to measure that one. Prints a table,
writes JSON (default disk_weights_<device>.json in the current folder).

    python tools/bench/disk_weights.py                 # qwen2-0.5b, fp32, 3 versions
    python tools/bench/disk_weights.py --quick         # a 2-layer slice: seconds, anywhere
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `areal-hpc bench` runs this file without its folder

from weight_sync import make_params, param_shapes  # noqa: E402

from areal_hpc.weights.disk import DiskWeightReader, DiskWeightWriter, file_name  # noqa: E402


def drop_cached_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def load_once(directory: Path, version: int) -> float:
    reader = DiskWeightReader(directory, poll_s=0.0)
    reader.wait_for(version, timeout=600)
    return reader.seconds_loading


def run(args: argparse.Namespace, directory: Path) -> dict:
    shapes = param_shapes(args.preset, args.quick)
    params = make_params(shapes, torch.float32, args.device)
    writer = DiskWeightWriter(directory, dtype=getattr(torch, args.dtype))
    rows = []
    try:
        for v in range(1, args.versions + 2):  # version 1 allocates the buffers: reported apart
            with torch.no_grad():
                for _, p in params:
                    p.add_(1e-3)  # an optimizer step between versions
            if args.device == "cuda":
                torch.cuda.synchronize()  # time the publish, not the step queued before it
            s0, w0, b0 = writer.seconds_snapshot, writer.seconds_writing, writer.bytes_written
            writer.publish(v, params)
            snapshot_s = writer.seconds_snapshot - s0
            writer.wait()
            write_s, nbytes = writer.seconds_writing - w0, writer.bytes_written - b0
            warm_s = load_once(directory, v)
            drop_cached_pages(directory / file_name(v))
            cold_s = load_once(directory, v)
            writer.prune([])
            rows.append({"version": v, "publish_ms": snapshot_s * 1e3, "write_s": write_s,
                         "write_mb_per_s": nbytes / 2**20 / write_s, "mb": nbytes / 2**20,
                         "load_warm_s": warm_s, "load_cold_s": cold_s, "first": v == 1})
    finally:
        writer.close()
    return {"rows": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2-0.5b")
    ap.add_argument("--versions", type=int, default=3, help="timed versions after the first (median reported)")
    ap.add_argument("--quick", action="store_true", help="a 2-layer slice of the shape")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the file's dtype (trainer parameters are fp32; bfloat16 converts during the snapshot)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where the trainer's parameters live (cuda: the snapshot is an asynchronous copy to "
                         "pinned memory, and publish only queues it)")
    ap.add_argument("--dir", default=None, help="where to write (default a temporary folder under $TMPDIR)")
    ap.add_argument("--out", default=None, help="result JSON (default disk_weights_<device>.json)")
    args = ap.parse_args(argv)

    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="disk_weights_"))
    try:
        res = run(args, directory)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    rows = res["rows"]
    timed = [r for r in rows if not r["first"]]
    med = {k: statistics.median(r[k] for r in timed)
           for k in ("publish_ms", "write_s", "write_mb_per_s", "load_warm_s", "load_cold_s")}
    print(f"{args.preset}{' (quick slice)' if args.quick else ''}: {rows[0]['mb']:.1f} MiB/version {args.dtype}, "
          f"median of {len(timed)} versions, in {directory}")
    print(f"{'':8} {'publish ms':>11} {'write s':>8} {'write MB/s':>11} {'load s (cache)':>15} {'load s (cold)':>14}")
    for label, r in (("first", rows[0]), ("median", med)):
        print(f"{label:8} {r['publish_ms']:>11.1f} {r['write_s']:>8.2f} {r['write_mb_per_s']:>11.0f} "
              f"{r['load_warm_s']:>15.2f} {r['load_cold_s']:>14.2f}")
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
              "torch": torch.__version__, "preset": args.preset, "quick": args.quick, "dtype": args.dtype,
              "device": args.device, "dir": str(directory), "cpu_count": os.cpu_count(), "median": med, "rows": rows}
    out = Path(args.out or f"disk_weights_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
