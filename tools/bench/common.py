"""Ceilings measured in the same run as the figure they bound, plus result bookkeeping.

Benchmarks report ratios against these (copy bandwidth, bf16 matmul rate) rather than datasheet
numbers, because lent machines are shared and clocks vary.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from pathlib import Path

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeat: int = 10) -> float:
    """Device-to-device copy in GB/s, counting bytes read plus bytes written (the HBM traffic)."""
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 27)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / _median_seconds(lambda: dst.copy_(src), repeat) / 1e9


def matmul_tflops(device: torch.device, n: int = 8192, repeat: int = 10) -> float:
    """bf16 n^3 matrix product rate on random data (fp32 and smaller n on CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type != "cuda":
        n = min(n, 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n**3 / _median_seconds(lambda: a @ b, repeat) / 1e12


def device_info(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.node(),
            "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_result(path: str | Path, result: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {p.resolve()}")
