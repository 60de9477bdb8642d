"""Training throughput on one and two ranks of this machine, against ideal per-token scaling.

    python -m pure_reasoner.benchmarks.ranks [--steps 40] [--grad-accum 1 4] [--json PATH] [-- OVERRIDE ...]

For each gradient-accumulation setting, runs of the training entry point (``experiment=plain`` plus the
overrides; export, first-look table and checkpoints off, run directories in a temporary folder), each figure the
median global tokens/s over the run's steps after the first ``--skip`` (its ``metrics.csv``):

- ``unit``: 1 rank, 1 thread, alone: the per-core figure ideal scaling multiplies by two;
- ``contended``: two independent 1-rank, 1-thread runs started together, the mean of their figures: what one core
  gives while the other core works too (shared memory bandwidth and caches), with no communication at all;
- ``one_rank_2_threads``: 1 rank, 2 threads;
- ``two_ranks``: 2 ranks of 1 thread through the ``deepspeed`` launcher (gloo), the global figure.

Ratios: ``vs_ideal`` = 2 x unit / two_ranks (how much slower than ideal per-token scaling), ``vs_contended`` =
2 x contended / two_ranks (what the ranks' communication and synchronisation cost beyond sharing the machine), and
``vs_one_process`` = one_rank_2_threads / two_ranks. ``--variant "KEY=VALUE ..."`` (repeatable) adds a 2-rank run
with those overrides too, in the same invocation, reported as ``variants[<overrides>]`` with its own ``vs_ideal``
and ``vs_contended`` against the same unit (e.g. ``--variant deepspeed.communication_data_type=bf16``).
Run it on an otherwise idle machine (the JSON records the load
average); settings run one after another, except the contended pair.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

RUN_KEYS = ("train.export=false", "train.first_look=0", "train.progress=false", "train.log_every=1")


def train_command(name: str, root: Path, steps: int, grad_accum: int, ranks: int,
                  overrides: Sequence[str]) -> list[str]:
    """The command line of one run: ``ranks`` 1 runs the entry point, 2 the deepspeed launcher with 2 processes."""
    args = ["experiment=plain", f"name={name}", f"hydra.run.dir={root / name}", f"train.max_steps={steps}",
            f"train.grad_accum={grad_accum}", f"train.ckpt_every={steps}", *RUN_KEYS, *overrides]
    if ranks == 1:
        return [sys.executable, "-m", "pure_reasoner.train", *args]
    launcher = Path(sys.executable).with_name("deepspeed")
    if not launcher.is_file():
        raise ValueError(f"2 ranks need the deepspeed launcher next to {sys.executable}; {launcher} does not exist")
    return [str(launcher), "--no_local_rank", "--num_gpus", str(ranks), "--master_port", "29517", "--module",
            "pure_reasoner.train", *args]


def median_tokens_per_s(run_dir: Path, skip: int) -> float:
    """Median ``tokens_per_s`` of the steps after the first ``skip`` in ``run_dir/metrics.csv``."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) > skip]
    if not rows:
        raise ValueError(f"{run_dir}/metrics.csv has no step after the first {skip}")
    return statistics.median(float(r["tokens_per_s"]) for r in rows)


def run_together(commands: dict[str, list[str]], threads: int, log_dir: Path) -> None:
    """Start the named ``commands`` at once with ``threads`` OpenMP threads each, output in ``log_dir/<name>.log``;
    raise if any fails (its log named)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = {}
    for name, cmd in commands.items():
        with open(log_dir / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    failed = [str(log_dir / f"{name}.log") for name, proc in procs.items() if proc.wait() != 0]
    if failed:
        raise RuntimeError(f"training runs failed; see {failed}")


def measure(steps: int, grad_accum: int, skip: int, overrides: Sequence[str], root: Path,
            variants: Sequence[str] = ()) -> dict:
    """The four settings at one ``grad_accum``, then a 2-rank run per variant (space-separated overrides):
    tokens/s each and the scaling ratios."""
    logs = root / "logs"
    logs.mkdir(exist_ok=True)

    def cmd(name: str, ranks: int = 1, threads: int | None = None, more: Sequence[str] = ()) -> dict[str, list[str]]:
        extra = [*overrides, *more, *([f"train.threads={threads}"] if threads else [])]
        name = f"ga{grad_accum}-{name}"
        return {name: train_command(name, root, steps, grad_accum, ranks, extra)}

    def figure(name: str) -> float:
        return median_tokens_per_s(root / f"ga{grad_accum}-{name}", skip)

    run_together(cmd("unit", threads=1), 1, logs)
    run_together({**cmd("contended_a", threads=1), **cmd("contended_b", threads=1)}, 1, logs)
    run_together(cmd("one_rank_2_threads", threads=2), 2, logs)
    run_together(cmd("two_ranks", ranks=2), 1, logs)
    unit, two = figure("unit"), figure("two_ranks")
    contended = statistics.mean([figure("contended_a"), figure("contended_b")])
    one_process = figure("one_rank_2_threads")
    measured = {}
    for i, variant in enumerate(variants):
        run_together(cmd(f"variant{i}", ranks=2, more=variant.split()), 1, logs)
        tokens = figure(f"variant{i}")
        measured[variant] = {"two_ranks": tokens, "vs_ideal": 2 * unit / tokens, "vs_contended": 2 * contended / tokens}
    return {"grad_accum": grad_accum, "steps": steps, "skip": skip, "unit": unit, "contended": contended,
            "one_rank_2_threads": one_process, "two_ranks": two, "vs_ideal": 2 * unit / two,
            "vs_contended": 2 * contended / two, "vs_one_process": one_process / two, "variants": measured}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="steps left out of each median (start-up)")
    parser.add_argument("--grad-accum", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--json", default=None)
    parser.add_argument("--keep", default=None, help="keep the run directories here instead of a temporary folder")
    parser.add_argument("--variant", action="append", default=[],
                        help="space-separated overrides of one more 2-rank run (repeatable)")
    parser.add_argument("overrides", nargs="*", help="training overrides after --, e.g. deepspeed=zero2")
    args = parser.parse_args(argv)
    if args.steps <= args.skip:
        raise ValueError(f"--steps {args.steps} must exceed --skip {args.skip}")
    for variant in args.variant:
        if not variant.split() or not all("=" in o for o in variant.split()):
            raise ValueError(f"--variant {variant!r} must be space-separated KEY=VALUE overrides")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ranks-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        records = [measure(args.steps, ga, args.skip, args.overrides, root, args.variant) for ga in args.grad_accum]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    from pure_reasoner.benchmarks.common import print_table, write_json

    columns = ("grad_accum", "unit", "contended", "one_rank_2_threads", "two_ranks", "vs_ideal", "vs_contended",
               "vs_one_process")
    print_table(records, columns, title="global tokens/s (median over steps) and scaling ratios")
    for variant in args.variant:
        print_table([{"grad_accum": r["grad_accum"], **r["variants"][variant]} for r in records],
                    ("grad_accum", "two_ranks", "vs_ideal", "vs_contended"), title=f"2 ranks with {variant}")
    if args.json:
        write_json(args.json, records, overrides=list(args.overrides))


if __name__ == "__main__":
    from pure_reasoner.kernels.malloc_tuning import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()  # the JSON's engine record is then measured under the runs' allocator
    main()
