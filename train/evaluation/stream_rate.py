"""The overall consult rate where the router's target holds it: on the run's own training stream, after training.

    python -m pure_reasoner.train.evaluation.stream_rate RUN_DIR [--micro-batches 16] [--report REPORT.json]

``model.knowledge.consult_rate`` is the share of *training* tokens the consult controller aims at. The evaluation's
closed-book questions are the densest recall text the world has (the answers alone are about a fifth of their
tokens, the names a third of the rest), so the overall rate over them (``routing.closed_book``) is not the
population the target is set on. This measures it on that population: micro-batches of the run's own data pipeline
(``train.loop.prepare_data`` on its ``config.yaml``) at the steps after its last one (``train.max_steps`` onward:
the corpus sequences in an order not trained on, reading drills never seen), each one forward pass of the exported
model in eval mode (the thresholds frozen, no controller update), with the run's document mask. Every token of a
micro-batch counts, as in training's ``consult_rate_l*`` columns.

Writes ``{"rate", "per_layer", "tokens", "micro_batches", "steps", "target_rate"}`` (``rate``: the mean over MoE
layers of the share of tokens that consult any knowledge expert) into ``routing.train_stream`` of ``--report``
(rewritten atomically; nothing is written on an error), or prints it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from pure_reasoner.moe import PureReasonerLM


@torch.no_grad()
def consult_rate(model: PureReasonerLM, batches: Iterable[dict[str, torch.Tensor]]) -> dict:
    """The share of tokens that consult any knowledge expert, per MoE layer and averaged over layers, on
    ``batches`` (each with ``idx_BS`` [B, S] and optionally ``doc_ids_BS`` [B, S]); the model in eval mode."""
    if not model.moe_layers():
        raise ValueError("the model has no MoE layer: there is no consult rate to measure")
    was_training = model.training
    model.eval()
    consulting_L, tokens, count = torch.zeros(len(model.moe_layers()), dtype=torch.float64), 0, 0
    try:
        for batch in batches:
            out = model(batch["idx_BS"], doc_ids_BS=batch.get("doc_ids_BS"))
            consulting_L += torch.stack([s.consulting_tokens.double().cpu() for s in out.stats])
            tokens += out.stats[0].num_tokens
            count += 1
    finally:
        model.train(was_training)
    if not tokens:
        raise ValueError("no micro-batch to measure the consult rate on")
    per_layer = (consulting_L / tokens).tolist()
    return {"rate": sum(per_layer) / len(per_layer), "per_layer": per_layer, "tokens": tokens, "micro_batches": count}


def measure_run(run_dir: Path, micro_batches: int) -> dict:
    """``consult_rate`` of ``run_dir``'s export on ``micro_batches`` micro-batches of its own training stream, the
    steps after its last (see the module docstring). Raises ValueError for a directory that is not a finished
    training run of a pure reasoner."""
    from pure_reasoner.moe.checkpoint import load_pretrained
    from pure_reasoner.train import data
    from pure_reasoner.train.dist import DistInfo
    from pure_reasoner.train.export import EXPORT, load_run_config
    from pure_reasoner.train.loop import prepare_data

    if micro_batches <= 0:
        raise ValueError(f"micro_batches must be > 0, got {micro_batches}")
    cfg = load_run_config(run_dir)
    tokenizer = run_dir / data.TOKENIZER
    if not tokenizer.is_file():
        raise ValueError(f"{run_dir} has no {data.TOKENIZER}: its training stream cannot be rebuilt")
    model = load_pretrained(run_dir / EXPORT)
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    with tempfile.TemporaryDirectory() as scratch:  # prepare_data writes world files into its run directory
        shutil.copy(tokenizer, Path(scratch) / data.TOKENIZER)
        train_data, _ = prepare_data(cfg, Path(scratch), info)
    first = cfg.train.max_steps
    steps = [first + i // cfg.train.grad_accum for i in range(micro_batches)]
    batches = (train_data.micro_batch(cfg, info, step, i % cfg.train.grad_accum) for i, step in enumerate(steps))
    measured = consult_rate(model, batches)
    return {**measured, "steps": [steps[0], steps[-1]], "target_rate": model.cfg.knowledge.consult_rate,
            "run": str(run_dir)}


def write_into(report_path: Path, measured: dict) -> None:
    """Set ``routing.train_stream`` of the JSON report at ``report_path`` to ``measured``, atomically."""
    from pure_reasoner.moe.checkpoint import write_text

    try:
        report = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{report_path}: not a readable JSON report ({err})") from err
    if not isinstance(report, dict):
        raise ValueError(f"{report_path}: not an evaluation report (a JSON object)")
    report.setdefault("routing", {})["train_stream"] = measured
    write_text(report_path, json.dumps(report, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.train.evaluation.stream_rate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished training run (config.yaml, tokenizer.json, export/)")
    parser.add_argument("--micro-batches", type=int, default=16)
    parser.add_argument("--report", type=Path, default=None,
                        help="an evaluation report (JSON) to write the measurement into, under routing.train_stream")
    args = parser.parse_args(argv)
    try:
        if args.report is not None and not args.report.is_file():
            raise ValueError(f"--report {args.report} is not a file")
        measured = measure_run(args.run_dir, args.micro_batches)
        if args.report is not None:
            write_into(args.report, measured)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    per_layer = " ".join(f"{r:.3f}" for r in measured["per_layer"])
    print(f"train stream: consult rate {measured['rate']:.4f} (target {measured['target_rate']}; per layer "
          f"{per_layer}) over {measured['tokens']} tokens, {measured['micro_batches']} micro-batches")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
