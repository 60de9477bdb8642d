"""Training metrics: a matmul peak measured at start-up, and per-step CSV + TensorBoard logs.

``metrics.csv`` has one row per logged step (loss, lr, grad norm, tokens/s, realized FLOPs per token,
MFU, consult rate per MoE layer); ``expert_load.csv`` one row per (step, layer) with each expert's
share of that layer's routed slots. TensorBoard gets the same scalars plus load histograms.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter


@dataclass
class StepMetrics:
    """What one optimizer step did, reduced over ranks and micro-steps."""

    step: int
    loss: float
    ce: float
    aux: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float
    flops_per_token: float
    peak_flops: float
    skipped: bool
    consult_rate_L: list[float]
    load_share_LE: list[list[float]]
    knowledge_off: float = 0.0  # the knowledge-off pass's loss (objective.forget_weight / read_weight), in loss
    overflow_rows: int = 0  # routed rows past the knowledge path's saved-activation bound (recomputed, not dropped)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation: realized training FLOPs per second over the measured matmul peak."""
        return self.flops_per_token * self.tokens_per_s / self.peak_flops if self.peak_flops > 0 else math.nan

    def row(self) -> dict[str, float | int]:
        row = {
            "step": self.step,
            "loss": self.loss,
            "ce": self.ce,
            "aux": self.aux,
            "knowledge_off": self.knowledge_off,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_s,
            "flops_per_token": self.flops_per_token,
            "mfu": self.mfu,
            "skipped": int(self.skipped),
            "overflow_rows": self.overflow_rows,
        }
        row.update({f"consult_rate_l{i}": rate for i, rate in enumerate(self.consult_rate_L)})
        return row


WALL_TIME_COLUMNS = ("tokens_per_s", "mfu")  # measured from the step's wall time: differ between identical runs


def read_curve(run_dir: Path) -> list[dict[str, str]]:
    """The rows of ``run_dir/metrics.csv`` as written (strings: equal rows are bitwise equal), without the
    wall-time columns, so that two runs that computed the same steps have equal curves."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in WALL_TIME_COLUMNS} for row in csv.DictReader(f)]


def _truncate_csv(path: Path, last_step: int) -> None:
    """Drop rows logged after ``last_step`` (by a run that died after its last checkpoint), atomically."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= last_step] if rows else []
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, path)


class MetricsLogger:
    """Appends StepMetrics to the run's CSV files and TensorBoard. Use on rank 0 only.

    Args:
        run_dir: the run directory.
        start_step: steps already done (the checkpoint resumed from); rows a crashed run logged after it go.
    """

    def __init__(self, run_dir: Path, start_step: int):
        self.metrics_path, self.load_path = run_dir / "metrics.csv", run_dir / "expert_load.csv"
        for path in (self.metrics_path, self.load_path):
            _truncate_csv(path, start_step)
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self._metrics_file = self._load_file = None
        self._metrics_csv = self._load_csv = None

    def log(self, m: StepMetrics) -> None:
        row = m.row()
        if self._metrics_csv is None:
            width = len(m.load_share_LE[0]) if m.load_share_LE else 0
            self._metrics_csv, self._metrics_file = self._open(self.metrics_path, list(row))
            self._load_csv, self._load_file = self._open(
                self.load_path, ["step", "layer"] + [f"e{e}" for e in range(width)]
            )
        self._metrics_csv.writerow(list(row.values()))
        for layer, shares in enumerate(m.load_share_LE):
            self._load_csv.writerow([m.step, layer, *shares])
            self.tb.add_histogram(f"expert_load/layer{layer}", torch.tensor(shares), m.step)
        for key, value in row.items():
            if key != "step":
                self.tb.add_scalar(f"train/{key}", value, m.step)
        self._metrics_file.flush()
        self._load_file.flush()

    @staticmethod
    def _open(path: Path, header: list[str]):
        new = not path.exists() or path.stat().st_size == 0
        f = open(path, "a", newline="")
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        return writer, f

    def close(self) -> None:
        for f in (self._metrics_file, self._load_file):
            if f is not None:
                f.close()
        self.tb.close()
