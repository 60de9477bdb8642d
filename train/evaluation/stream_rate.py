"""The overall consult rate where the router's target holds it: on the run's own training stream, after training.

    python -m pure_reasoner.train.evaluation.stream_rate RUN_DIR [--micro-batches 32] [--report REPORT.json]
                                                         [--calibrate-into DIR [--calibration-micro-batches 64]]

``model.knowledge.consult_rate`` is the share of *training* tokens the consult controller aims at. The evaluation's
closed-book questions are the densest recall text the world has (the answers alone are about a fifth of their
tokens, the names a third of the rest), so the overall rate over them (``routing.closed_book``) is not the
population the target is set on. This measures it on that population: micro-batches of the run's own data pipeline
(``train.loop.prepare_data`` on its ``config.yaml``) at the steps after its last one (``train.max_steps`` onward:
the corpus sequences in an order not trained on, reading drills never seen), each one forward pass of the exported
model in eval mode (the thresholds frozen, no controller update), with the run's document mask. Every token of a
micro-batch counts, as in training's ``consult_rate_l*`` columns. A run whose export was calibrated
(``train.calibrate_micro_batches``, ``train.calibration``) is measured on the micro-batches after those.

Writes ``{"rate", "per_layer", "tokens", "micro_batches", "steps", "target_rate"}`` (``rate``: the mean over MoE
layers of the share of tokens that consult any knowledge expert) into ``routing.train_stream`` of ``--report``
(rewritten atomically; nothing is written on an error), or prints it.

``--calibrate-into DIR`` writes a copy of the export whose thresholds are each layer's quantile over
``--calibration-micro-batches`` micro-batches of the stream (``train.calibration.calibrate``), where training leaves
the quantile of the last step's inputs alone, and measures the copy on the micro-batches after those: for a run
trained without ``train.calibrate_micro_batches``, the export that setting would have written.

Shape legend: B batch, S sequence, T tokens, L MoE layers.
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
from pure_reasoner.train.calibration import calibrate, run_stream_data, stream_batches, stream_steps


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


class RunStream:
    """A finished run's export and its own training stream, rebuilt from its ``config.yaml`` and tokenizer: the
    micro-batches of the steps after its last (``batches(skip, count)``: from step ``max_steps`` on, the first
    ``skip`` left out). Raises ValueError for a directory that is not a finished training run."""

    def __init__(self, run_dir: Path):
        from pure_reasoner.moe.checkpoint import load_pretrained
        from pure_reasoner.train.export import EXPORT, load_run_config

        self.run_dir = run_dir
        self.cfg = load_run_config(run_dir)
        self.export = run_dir / EXPORT
        self.model = load_pretrained(self.export)
        self.data = run_stream_data(run_dir, self.cfg)

    def steps(self, skip: int, count: int) -> list[int]:
        """The optimizer step of each of the ``count`` micro-batches after the first ``skip``."""
        return stream_steps(self.cfg, skip, count)

    def batches(self, skip: int, count: int) -> list[dict[str, torch.Tensor]]:
        return stream_batches(self.data, self.cfg, skip, count)

    def measure(self, skip: int, count: int) -> dict:
        """``consult_rate`` on ``batches(skip, count)``, with the steps it read and the target."""
        steps = self.steps(skip, count)
        measured = consult_rate(self.model, self.batches(skip, count))
        return {**measured, "steps": [steps[0], steps[-1]], "target_rate": self.model.cfg.knowledge.consult_rate,
                "run": str(self.run_dir)}


def measure_run(run_dir: Path, micro_batches: int) -> dict:
    """``consult_rate`` of ``run_dir``'s export on ``micro_batches`` micro-batches of its own training stream, the
    steps after its last and after those its export was calibrated on (``train.calibrate_micro_batches``; see the
    module docstring)."""
    if micro_batches <= 0:
        raise ValueError(f"micro_batches must be > 0, got {micro_batches}")
    stream = RunStream(run_dir)
    return stream.measure(stream.cfg.train.calibrate_micro_batches, micro_batches)


def calibrated_copy(run_dir: Path, out: Path, calibration: int, micro_batches: int) -> dict:
    """Write ``run_dir``'s export with thresholds ``calibrate``d on the first ``calibration`` micro-batches after its
    last step into ``out`` (a copy: the other files as they are), and measure the copy on the ``micro_batches``
    after those. Raises ValueError when ``out`` exists (nothing is overwritten)."""
    from pure_reasoner.moe.checkpoint import save_pretrained

    if out.exists():
        raise ValueError(f"{out} exists; choose a new directory for the calibrated copy")
    if calibration <= 0 or micro_batches <= 0:
        raise ValueError(f"calibration and micro_batches must be > 0, got {calibration} and {micro_batches}")
    stream = RunStream(run_dir)
    before = stream.measure(calibration, micro_batches)
    thresholds = calibrate(stream.model, stream.batches(0, calibration))
    after = stream.measure(calibration, micro_batches)
    made = [p for p in reversed(out.parents) if not p.exists()]  # parents this call creates
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=out.parent) as scratch:  # all or nothing: renamed into place at the end
            staged = Path(scratch) / out.name
            shutil.copytree(stream.export, staged)
            save_pretrained(stream.model, staged, hf=True)  # as train.export writes it
            staged.rename(out)
    except BaseException:
        for parent in reversed(made):  # no empty directories left behind
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
        raise
    steps = stream.steps(0, calibration)
    return {"calibration_steps": [steps[0], steps[-1]], "thresholds": thresholds, "before": before, "after": after,
            "out": str(out)}


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
    parser.add_argument("--micro-batches", type=int, default=32)
    parser.add_argument("--report", type=Path, default=None,
                        help="an evaluation report (JSON) to write the measurement into, under routing.train_stream")
    parser.add_argument("--calibrate-into", type=Path, default=None,
                        help="write a copy of the export whose thresholds are calibrated on the stream here, and "
                             "measure it on the micro-batches after the calibration's")
    parser.add_argument("--calibration-micro-batches", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        if args.report is not None and not args.report.is_file():
            raise ValueError(f"--report {args.report} is not a file")
        if args.calibrate_into is not None:
            done = calibrated_copy(args.run_dir, args.calibrate_into, args.calibration_micro_batches,
                                   args.micro_batches)
            print(json.dumps({k: v for k, v in done.items() if k not in ("before", "after")}))
            print(f"before: {done['before']['rate']:.4f}")
            measured = done["after"]
        else:
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
