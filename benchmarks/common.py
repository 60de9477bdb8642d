"""Shared benchmark tooling: interleaved timing with medians, the machine's roofline, tables, JSON.

The roofline of a case is ``max(flops / P, bytes / W)``: P the GFLOP/s of a large dense matmul and W
the GB/s of a large tensor copy, both measured in the same run as the cases they judge.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Seconds per call over repeats: median, and the spread as (min, max)."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int


def time_interleaved(
    cases: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1, device: str | torch.device = "cpu"
) -> dict[str, Timing]:
    """Time every case ``repeats`` times, interleaving cases so drift hits them all alike.

    Args:
        cases: name -> zero-argument callable doing one unit of work.
        repeats: timed calls per case; warmup: untimed calls per case first.
        device: where the work runs (synchronised around each call on CUDA).
    """
    device = torch.device(device)
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {n: Timing(statistics.median(s), min(s), max(s), len(s)) for n, s in samples.items()}


@dataclass(frozen=True)
class Roofline:
    """Measured machine limits: dense-matmul GFLOP/s and tensor-copy GB/s."""

    matmul_gflops: float
    copy_gbs: float

    def time_s(self, flops: float, bytes_moved: float) -> float:
        """Least time a case needs: bound by compute or by memory traffic, whichever is slower."""
        return max(flops / (self.matmul_gflops * 1e9), bytes_moved / (self.copy_gbs * 1e9))


def measure_roofline(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, copy_mb: int = 256,
    repeats: int = 5,
) -> Roofline:
    """Measure P (an n x n x n matmul) and W (a ``copy_mb`` MB copy: read + write counted) here and now."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    numel = copy_mb * 2**20 // a.element_size()
    src, dst = torch.randn(numel, device=device, dtype=dtype), torch.empty(numel, device=device, dtype=dtype)
    t = time_interleaved({"mm": lambda: a @ b, "copy": lambda: dst.copy_(src)}, repeats=repeats, device=device)
    return Roofline(
        matmul_gflops=2 * n**3 / t["mm"].median_s / 1e9,
        copy_gbs=2 * numel * a.element_size() / t["copy"].median_s / 1e9,
    )


def machine() -> dict:
    """What the numbers were measured on."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None) -> None:
    """Print rows as an aligned table (floats to 4 significant digits)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns))
    Console(width=200).print(table)


def write_json(path: str | os.PathLike, records: Sequence[dict], **meta) -> None:
    """Write ``{"machine": ..., **meta, "records": [...]}`` to ``path``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), **meta, "records": list(records)}, indent=2))
