"""Consult thresholds calibrated on the training stream, where training leaves one micro-batch's quantile.

After every optimizer step the consult controller re-takes each layer's ``margin_threshold`` as a quantile of the
last step's router inputs (``moe.router``): in training the integral term averages the step-to-step noise out, but
the export freezes the last step's value, so an exported model's rate is off its target by the luck of one
micro-batch (-28% and +43% measured on two worlds of the strong recipe, results/protocol.md). ``calibrate`` re-takes
each threshold over many micro-batches instead; ``train.calibrate_micro_batches`` does it to every export of a run
(``train.export.export_checkpoint``), on the micro-batches of the steps after its last (``stream_batches``), and
``python -m pure_reasoner.train.evaluation.stream_rate --calibrate-into`` to a finished run's export.

Shape legend: B batch, S sequence, M margins.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from pure_reasoner.moe import PureReasonerLM


@torch.no_grad()
def calibrate(model: PureReasonerLM, batches: Sequence[dict[str, torch.Tensor]]) -> list[float]:
    """Set each MoE layer's ``margin_threshold`` to the margin that a ``consult_rate`` share of the tokens of
    ``batches`` (each with ``idx_BS`` [B, S] and optionally ``doc_ids_BS`` [B, S]) exceeds: the quantile
    ``refresh_threshold`` takes, over this sample instead of the router's ring of one step's inputs, and at
    ``consult_rate`` itself (the training-time correction ``log_rate_offset`` is not applied, though left as it is,
    as is the ring). Layer after layer from the first: a layer's inputs depend on the thresholds below it, and each
    forward stops at the router being calibrated. The model is left in the mode it came in. Returns the thresholds
    set."""
    layers = model.moe_layers()
    if not layers:
        raise ValueError("the model has no MoE layer: there is no threshold to calibrate")
    if not batches:
        raise ValueError("no micro-batch to calibrate the consult thresholds on")
    was_training = model.training
    model.eval()
    thresholds = []
    try:
        for layer in layers:
            router = layer.router
            margins: list[torch.Tensor] = []
            hook = router.register_forward_pre_hook(functools.partial(_take_margins, into=margins))
            try:
                for batch in batches:
                    try:
                        model(batch["idx_BS"], doc_ids_BS=batch.get("doc_ids_BS"))
                    except _RouterReached:
                        pass  # the layers above this router do not change its inputs
            finally:
                hook.remove()
            if margins[0] is None:
                raise ValueError(f"knowledge.mechanism={router.cfg.mechanism!r} has no consult margin to calibrate")
            all_M = torch.cat([m.reshape(-1) for m in margins]).double()
            threshold = torch.quantile(all_M, 1.0 - router.cfg.consult_rate).to(router.margin_threshold)
            router.margin_threshold.copy_(threshold)
            thresholds.append(float(threshold))
    finally:
        model.train(was_training)
    return thresholds


class _RouterReached(Exception):
    """Raised by the calibrating hook once it has the margins: the rest of the forward is not needed."""


def _take_margins(router, args, into: list) -> None:
    """A router forward pre-hook: append the margins of its inputs (``consult_margins``) to ``into``, then stop the
    forward (``_RouterReached``)."""
    into.append(router.consult_margins(args[0]))
    raise _RouterReached


def stream_batches(train_data, cfg, skip: int, count: int) -> list[dict[str, torch.Tensor]]:
    """The ``count`` micro-batches of ``cfg``'s training stream after its last step (``train.max_steps`` on), the
    first ``skip`` left out, as one rank of one reads them (``TrainData.micro_batch``; a multi-rank run's ranks
    read other shards of the same sequences)."""
    if count <= 0 or skip < 0:
        raise ValueError(f"micro-batches: skip must be >= 0 and count > 0, got {skip} and {count}")
    info = one_rank()
    return [train_data.micro_batch(cfg, info, step, i % cfg.train.grad_accum)
            for i, step in zip(range(skip, skip + count), stream_steps(cfg, skip, count), strict=True)]


def stream_steps(cfg, skip: int, count: int) -> list[int]:
    """The optimizer step of each of ``stream_batches(..., skip, count)``'s micro-batches."""
    accum = cfg.train.grad_accum
    return [cfg.train.max_steps + i // accum for i in range(skip, skip + count)]


def run_stream_data(run_dir: Path, cfg):
    """``cfg``'s training data (``train.loop.prepare_data``), rebuilt for the finished run in ``run_dir`` with its
    own tokenizer, nothing written there. Raises ValueError when the run has no tokenizer."""
    import shutil
    import tempfile

    from pure_reasoner.train import data
    from pure_reasoner.train.loop import prepare_data

    tokenizer = run_dir / data.TOKENIZER
    if not tokenizer.is_file():
        raise ValueError(f"{run_dir} has no {data.TOKENIZER}: its training stream cannot be rebuilt")
    with tempfile.TemporaryDirectory() as scratch:  # prepare_data writes world files into its run directory
        shutil.copy(tokenizer, Path(scratch) / data.TOKENIZER)
        train_data, _ = prepare_data(cfg, Path(scratch), one_rank())
    return train_data


def one_rank():
    """The ``DistInfo`` of a single-process CPU run: the view of the data the stream is read in."""
    from pure_reasoner.train.dist import DistInfo

    return DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
