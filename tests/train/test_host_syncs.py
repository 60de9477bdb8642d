"""The training step reads back to the host at most once per optimizer step (one batched transfer), however many
MoE layers and micro-batches it has: no per-layer syncs, no sync before each backward."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pure_reasoner.moe import PureReasonerLM
from pure_reasoner.train import loop as train_loop
from tests.train.helpers import run_in_process

OURS = tuple(str(Path(__file__).resolve().parents[2] / pkg) + "/" for pkg in ("train", "moe", "kernels"))


def _caller_is_ours() -> bool:
    """Whether the innermost frame outside torch and this test file belongs to our packages (DeepSpeed's own
    reads, e.g. its overflow check, are its business)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name != __file__ and "/torch/" not in name:
            return name.startswith(OURS)
        frame = frame.f_back
    return False


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values into Python made from our code: item()/float()/bool() (the
    ``_local_scalar_dense`` op) and tolist()/cpu()/numpy() (counted by the patched methods below)."""

    def __init__(self):
        super().__init__()
        self.sites: list[str] = []
        self.counting: list[bool] = []  # a stack: innermost wrapper decides

    def counts(self) -> bool:
        return bool(self.counting) and self.counting[-1] and _caller_is_ours()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and self.counts():
            self.sites.append(_site())
        return func(*args, **(kwargs or {}))


def _site() -> str:
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename == __file__ or "/torch/" in frame.f_code.co_filename):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else "?"


def test_one_host_read_per_optimizer_step(tmp_path, monkeypatch, dist_info):
    reads = HostReads()

    def counting(method):
        real = getattr(torch.Tensor, method)

        def wrapper(self, *args, **kwargs):
            if reads.counts():
                reads.sites.append(f"{method} at {_site()}")
            return real(self, *args, **kwargs)

        return wrapper

    def counted(real, counting: bool = True):
        def wrapper(*args, **kwargs):
            reads.counting.append(counting)
            try:
                with reads:
                    return real(*args, **kwargs)
            finally:
                reads.counting.pop()

        return wrapper

    for method in ("tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, counting(method))
    monkeypatch.setattr(train_loop, "_one_step", counted(train_loop._one_step))
    real_metrics = train_loop._metrics

    def metrics_from_host_copy(cfg, engine, info, step, acc, *args):
        """The metrics must come from the host copy that ``reduce`` read: the device-side tensors are swapped for
        meta tensors, which have no values to read."""
        acc.sums_6, acc.consult_L, acc.load_LE = (t.to("meta") for t in (acc.sums_6, acc.consult_L, acc.load_LE))
        acc.router_inputs = [[t.to("meta") for t in per_layer] for per_layer in acc.router_inputs]
        return real_metrics(cfg, engine, info, step, acc, *args)

    monkeypatch.setattr(train_loop, "_metrics", metrics_from_host_copy)
    monkeypatch.setattr(PureReasonerLM, "update_controllers", counted(PureReasonerLM.update_controllers))
    # The data pipeline builds each micro-batch on the host before it moves to the device: not a device read.
    monkeypatch.setattr(train_loop.TrainData, "micro_batch", counted(train_loop.TrainData.micro_batch, False))
    steps = 6
    run_in_process(tmp_path / "run", f"train.max_steps={steps}", "train.grad_accum=2", "train.ckpt_every=100",
                   "train.export=false")
    # 2 micro-batches x the MoE layers each: still one read per step (StepStats.reduce's)
    assert len(reads.sites) <= steps, reads.sites
