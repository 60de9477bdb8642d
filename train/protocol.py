"""Run a recipe under the protocol: several seeds, each its own world, init and data order; train, evaluate, record.

    python -m pure_reasoner.train.protocol --recipe NAME [--seeds 0 1 2] [--heldout-seeds 2] [--world-seed-offset 0]
                             [--eval-examples 600] [--results results] [--eval-arg=--bits-people=120 ...] [--chain]
                             [--chain-only] [--probe]
                             -- experiment=decoupling [overrides ...]

For each seed k (at least ``MIN_SEEDS``): world seed ``w = offset + k`` (``data.generator_kwargs.seed``: its own
people, facts and questions), ``train.seed=k`` (init and data order) and ``name=<recipe>-seed<k>``; then
``python -m pure_reasoner.train.evaluation`` on its export into ``<results>/eval/<recipe>_seed<k>.json`` (with a
``run`` record: recipe, seed, world seed, held out; for a model that routes, ``routing.train_stream`` from
``train.evaluation.stream_rate``: its overall consult rate on its own training stream), and an entry
``<recipe>_seed<k>`` in ``<results>/runs.json`` (commands, seed, world seed, commit, wall times). Seeds in
``--heldout-seeds`` run on world seeds never looked at while choosing a recipe: ``python -m
pure_reasoner.train.evaluation.scorecard --exclude-heldout`` leaves them out, the final scorecard keeps them.

The world's eval splits hold ``--eval-examples`` questions (600: a 95% interval of about ±0.04); the single-hop
splits (closed_book, open_book) are checked to reach that many before anything trains, and again in the reports.
Training and evaluation run as subprocesses, one after another, in the current directory (``runs/<name>``).

``--chain``: a recipe that starts from (or distils) earlier recipes' exports, ``runs/<recipe>-seed<k>/export``, gets
those stages trained first where their exports are missing (``train.chain``), each with the seed's world and the
overrides in ``train.chain.RUN_ONLY_KEYS``; the entry records their commands (``chain_commands``) and walls.
``--chain-only`` trains those stages and stops: each seed's entry ``<recipe>_seed<k>_chain`` records them, and a
later run of any recipe on the same chain reuses them.

``--probe``: one or two seeds, none held out, to ask a question on worlds already used for choosing; the entries and
reports are marked ``probe`` (a probe is an anecdote, not a claim: the scorecard needs three seeds for that).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MIN_SEEDS = 3
SINGLE_HOP = ("closed_book", "open_book")
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SeedRun:
    """What one seed of a recipe runs."""

    recipe: str
    seed: int
    world_seed: int
    heldout: bool
    overrides: tuple[str, ...]
    probe: bool = False

    @property
    def name(self) -> str:
        return f"{self.recipe}-seed{self.seed}"

    @property
    def stem(self) -> str:
        return f"{self.recipe}_seed{self.seed}"

    def train_overrides(self, eval_examples: int) -> list[str]:
        return [*self.overrides, f"name={self.name}", f"train.seed={self.seed}",
                f"++data.generator_kwargs.seed={self.world_seed}",
                f"++data.generator_kwargs.eval_examples={eval_examples}"]


def compose(overrides: Sequence[str]):
    """The typed training Config of ``python -m pure_reasoner.train <overrides>`` (ValueError when it does not
    validate)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from pure_reasoner.train.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        try:
            cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
        except Exception as err:  # Hydra's own error types for overrides that do not compose
            raise ValueError(f"overrides {list(overrides)} do not compose: {err}") from err
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return to_config(cfg)


def check_world(cfg, eval_examples: int) -> dict[str, int]:
    """Questions per single-hop split of the world ``cfg`` trains on; ValueError when one is below
    ``eval_examples`` or the data is not the world generator (the protocol sets its seed)."""
    from pure_reasoner.train.config import WORLD_GENERATOR
    from pure_reasoner.train.world.generator import build_world, corpus_world_config
    from pure_reasoner.train.world.splits import split_examples

    if cfg.data.source != "generator" or cfg.data.generator != WORLD_GENERATOR:
        raise ValueError(f"the protocol gives every seed its own world through data.generator={WORLD_GENERATOR}; got "
                         f"source={cfg.data.source!r}, generator={cfg.data.generator!r}")
    world = build_world(corpus_world_config(**cfg.data.generator_kwargs))
    sizes = {s: len(split_examples(world, s)) for s in SINGLE_HOP}
    short = {s: n for s, n in sizes.items() if n < eval_examples}
    if short:
        raise ValueError(f"world seed {world.cfg.seed}: single-hop splits {short} hold fewer than --eval-examples="
                         f"{eval_examples} questions (closed_book asks 5 attributes of each held-out person: grow "
                         f"data.generator_kwargs.num_people, or lower --eval-examples)")
    return sizes


def commit() -> str:
    """The repository's HEAD commit, ``-dirty`` when the work tree has uncommitted changes ("unknown" outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout

    try:
        return git("rev-parse", "HEAD").strip() + ("-dirty" if git("status", "--porcelain").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# A launcher's (or this process's own) rank variables would make each run try to join that process group.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _run(command: list[str]) -> float:
    """Run one training or eval command as a fresh single-rank job; its wall seconds."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    start = time.perf_counter()
    done = subprocess.run(command, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"exit status {done.returncode}: {' '.join(command)}")
    return time.perf_counter() - start


def run_seed(run: SeedRun, results: Path, eval_examples: int, eval_args: Sequence[str]) -> dict:
    """Train and evaluate one seed; returns its manifest entry (the eval report gets its ``run`` record)."""
    overrides = run.train_overrides(eval_examples)
    train_cmd = [sys.executable, "-m", "pure_reasoner.train", *overrides]
    report_path = results / "eval" / f"{run.stem}.json"
    eval_cmd = [sys.executable, "-m", "pure_reasoner.train.evaluation",
                "--checkpoint", str(Path("runs") / run.name / "export"), "--json", str(report_path), *eval_args]
    train_s = _run(train_cmd)
    eval_s = _run(eval_cmd)
    commands = [train_cmd, eval_cmd]
    if json.loads(report_path.read_text()).get("routing"):  # a model that routes: its rate on its training stream
        stream_cmd = [sys.executable, "-m", "pure_reasoner.train.evaluation.stream_rate", str(Path("runs") / run.name),
                      "--report", str(report_path)]
        eval_s += _run(stream_cmd)
        commands.append(stream_cmd)
    report = json.loads(report_path.read_text())
    short = {s: report["splits"][s]["base"]["n"] for s in SINGLE_HOP
             if s in report["splits"] and report["splits"][s]["base"]["n"] < eval_examples}
    if short:
        raise ValueError(f"{report_path}: single-hop splits scored on {short} questions, fewer than {eval_examples}")
    record = {"recipe": run.recipe, "seed": run.seed, "world_seed": run.world_seed, "heldout": run.heldout,
              **({"probe": True} if run.probe else {})}
    report["run"] = record
    report_path.write_text(json.dumps(report, indent=2))
    return {**record, "commit": commit(), "train_wall_s": round(train_s, 1), "eval_wall_s": round(eval_s, 1),
            "commands": [" ".join(["python", *c[1:]]) for c in commands]}


def stage_run(run: SeedRun, stage: str) -> SeedRun:
    """The seed run of an earlier stage of ``run``'s chain: same seed and world, only the run-only overrides."""
    from pure_reasoner.train.chain import run_only

    return SeedRun(stage, run.seed, run.world_seed, run.heldout, (f"experiment={stage}", *run_only(run.overrides)))


def chain_stages(run: SeedRun, eval_examples: int, cfg=None) -> list[SeedRun]:
    """The earlier stages ``run`` needs, in training order (``train.chain.stages``); ``cfg``: the run's composed
    Config when the caller has it (composed here otherwise)."""
    from pure_reasoner.train.chain import stages

    def compose_stage(stage: str):
        return compose(stage_run(run, stage).train_overrides(eval_examples))

    cfg = compose(run.train_overrides(eval_examples)) if cfg is None else cfg
    return [stage_run(run, s) for s in stages(cfg, run.seed, compose_stage, REPO / "conf" / "experiment")]


def train_chain(stages: Sequence[SeedRun], eval_examples: int) -> dict:
    """Train the stages whose exports are missing, in order; the manifest fields that record them."""
    commands, walls, reused = [], {}, []
    for stage in stages:
        if (Path("runs") / stage.name / "export").is_dir():
            reused.append(stage.name)
            continue
        command = [sys.executable, "-m", "pure_reasoner.train", *stage.train_overrides(eval_examples)]
        walls[stage.recipe] = round(_run(command), 1)
        commands.append(" ".join(["python", *command[1:]]))
    return {"chain_commands": commands, "chain_train_wall_s": walls, "chain_reused": reused}


def record(manifest_path: Path, stem: str, entry: dict) -> None:
    """Add (or replace) one entry of the runs manifest, written atomically."""
    runs = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    runs[stem] = entry
    tmp = manifest_path.with_name(f".{manifest_path.name}.tmp")
    tmp.write_text(json.dumps(runs, indent=2) + "\n")
    tmp.replace(manifest_path)


def plan(recipe: str, seeds: Sequence[int], heldout: Sequence[int], offset: int,
         overrides: Sequence[str], probe: bool = False) -> list[SeedRun]:
    """The seed runs of a recipe; ValueError on fewer than MIN_SEEDS distinct seeds (a ``probe``: fewer, and none
    held out) or a held-out seed not run."""
    if not recipe or "/" in recipe:
        raise ValueError(f"--recipe must be a non-empty name without '/', got {recipe!r}")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"--seeds must be distinct and at least one, got {list(seeds)}")
    if probe and (heldout or len(seeds) >= MIN_SEEDS):
        raise ValueError(f"--probe asks a question on fewer than {MIN_SEEDS} worlds used for choosing: got seeds "
                         f"{list(seeds)}, held out {list(heldout)}; run the protocol without --probe")
    if not probe and len(seeds) < MIN_SEEDS:
        raise ValueError(f"the protocol needs >= {MIN_SEEDS} distinct seeds, got {list(seeds)} (--probe for fewer, "
                         "not a claim)")
    if not set(heldout) <= set(seeds):
        raise ValueError(f"--heldout-seeds {sorted(set(heldout) - set(seeds))} are not among --seeds {list(seeds)}")
    reserved = [o for o in overrides if o.split("=")[0].lstrip("+") in ("name", "train.seed",
                                                                         "data.generator_kwargs.seed")]
    if reserved:
        raise ValueError(f"the protocol sets {reserved} itself (name, train.seed, the world seed)")
    return [SeedRun(recipe, s, offset + s, s in heldout, tuple(overrides), probe) for s in seeds]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.train.protocol", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", required=True, help="the recipe's name (runs are grouped by it)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heldout-seeds", type=int, nargs="*", default=[],
                        help="seeds whose worlds are never looked at while choosing the recipe")
    parser.add_argument("--world-seed-offset", type=int, default=0, help="world seed = offset + seed")
    parser.add_argument("--eval-examples", type=int, default=600,
                        help="questions per eval split (single-hop splits must reach it)")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--eval-arg", action="append", default=[], help="passed to the evaluation (repeatable)")
    parser.add_argument("--chain", action="store_true",
                        help="first train the earlier recipes this one starts from, where their exports are missing")
    parser.add_argument("--chain-only", action="store_true",
                        help="train the earlier recipes (as --chain) and stop; record them per seed")
    parser.add_argument("--probe", action="store_true",
                        help=f"fewer than {MIN_SEEDS} seeds, none held out: a question, not a claim (marked probe)")
    parser.add_argument("overrides", nargs="*", help="training overrides (after --)")
    args = parser.parse_args(argv)
    chained = args.chain or args.chain_only
    try:
        runs = plan(args.recipe, args.seeds, args.heldout_seeds, args.world_seed_offset, args.overrides, args.probe)
        chains = {}
        for run in runs:  # every seed's config, world and chain are checked before the first one trains
            cfg = compose(run.train_overrides(args.eval_examples))
            check_world(cfg, args.eval_examples)
            chains[run.seed] = chain_stages(run, args.eval_examples, cfg) if chained else []
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    manifest = args.results / "runs.json"
    args.results.mkdir(parents=True, exist_ok=True)
    for run in runs:
        try:
            chain = train_chain(chains[run.seed], args.eval_examples) if chained else {}
            if args.chain_only:
                record(manifest, f"{run.stem}_chain", {"recipe": run.recipe, "seed": run.seed,
                                                       "world_seed": run.world_seed, "commit": commit(), **chain})
                print(f"{run.stem}: chain of world seed {run.world_seed} trained {chain['chain_train_wall_s']}, "
                      f"reused {chain['chain_reused']}")
                continue
            entry = {**run_seed(run, args.results, args.eval_examples, args.eval_arg), **chain}
        except (RuntimeError, ValueError) as err:
            print(f"error: seed {run.seed}: {err}", file=sys.stderr)
            return 1
        record(manifest, run.stem, entry)
        print(f"{run.stem}: world seed {run.world_seed}, train {entry['train_wall_s']} s, "
              f"eval {entry['eval_wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
