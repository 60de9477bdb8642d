"""Update a trained model's knowledge:
``python -m pure_reasoner.train.update BASE_RUN [options] [--set KEY=VALUE ...]``.

Starts from ``BASE_RUN/export`` (``train.init_from``) and trains on a knowledge update of the world the base run was
trained on (``train.world_update``: new people and changed facts), then scores the update
(``train.update_eval``: new facts, changed facts, retention, open-book reading; before vs after) and writes it to
``OUT/update_eval.json`` (with ``--bits-people N`` also the bits stored about the new people, ``stored``). The run
is the base run's config (model, sequence length, objective, optimizer, seed) with:
    data        ``pure_reasoner.train.world_update:update_corpus`` of the base world and ``--seed / --new-people /
                --changed-facts``; no context on any row (every new fact must be memorised), no fresh drills;
    replay      ``--replay R``: round(R x its rows) rows of the base world's pretraining corpus mixed in (default 0);
                ``--anchor-replayed`` anchors only those rows, to the base model itself (``objective.anchor_rows=
                marked``, ``objective.teacher=BASE_RUN/export``, ``anchor_weight`` the base's or 1): the old facts
                held where they are rehearsed, the new values free to move;
    train       ``init_from=BASE_RUN/export``, ``trainable=--trainable`` (``knowledge``: only knowledge experts
                and routers, the pure reasoner's update; ``all``: fine-tune everything, the dense baseline's),
                ``max_steps=--steps``, one checkpoint at the end, no first-look table, the base export's consult
                thresholds kept (``calibrate_micro_batches=0``: not re-taken on the update's rows);
    slots       ``--slots N``: only the N expert units per MoE layer that the update's rows use most against the
                base world's pretraining rows (module ``train.slots``: TF-IDF, as Sparse Memory Finetuning picks
                memory slots) train; routers and every other unit stay bit for bit (``trainable=experts``, weight
                decay 0); the choice is written to ``OUT/slots.json``;
    ``--set``   any further override of the typed config (``train.lr=1e-3``), applied last; ``data.fresh_drills=N``
                puts N reading drills of the base world (contexts it reads, people it never memorised) in every
                micro-batch, in place of N update rows.
The run directory is ``--out`` (default ``BASE_RUN-update-s<seed>``, ``...-replay<R>`` with replay, then
``-anchor-replayed`` with that, ``-slots<N>`` with slots; same command, same directory: it resumes).
Multi-process: ``deepspeed --no_local_rank --num_gpus N --module pure_reasoner.train.update ...``.
docs/knowledge_update.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from pure_reasoner.train.config import UPDATE_GENERATOR, Config  # noqa: E402
from pure_reasoner.train.world_update import UpdateConfig, build_update, load_update, update_kwargs  # noqa: E402

REPORT = "update_eval.json"
SLOTS = "slots.json"
BACKGROUND_ROWS_PER_ROW = 2  # pretraining rows scored per update row when choosing slots


def run_config(base_run: Path, out: Path, update: UpdateConfig, trainable: str, steps: int,
               overrides: Sequence[str] = (), anchor_replayed: bool = False, slots: int = 0) -> tuple[Config, str]:
    """The typed Config of the update run and its resolved YAML (module docstring). Raises ValueError on a bad
    base run (no config.yaml, export or world.json) or override, or slots with ``trainable`` other than
    ``knowledge`` or with expert parallelism."""
    from pure_reasoner.train.export import EXPORT, load_run_config
    from pure_reasoner.train.world.generator import build_world, load_world_config

    base = load_run_config(base_run)
    export = base_run / EXPORT
    if not (export / "world.json").is_file():
        raise ValueError(f"{export} has no world.json: the base run did not train on the built-in knowledge world")
    world = load_world_config(export / "world.json")
    build_update(build_world(world), update)  # a bad update fails here, before anything is written
    node = OmegaConf.structured(base)
    changes = {
        "name": out.name,
        "data.source": "generator", "data.generator": UPDATE_GENERATOR,
        "data.generator_kwargs": update_kwargs(world, update),
        "data.in_context_fraction": 0.0, "data.fresh_drills": 0, "data.counterfactual_drills": 0.0,
        "data.max_chars": None, "data.path": None,
        "data.files": [],
        "train.init_from": str(export), "train.trainable": trainable, "train.max_steps": steps,
        "train.warmup_steps": min(base.train.warmup_steps, steps // 10), "train.ckpt_every": steps,
        "train.first_look": 0,
        # The update keeps the base model's consult thresholds: calibrated on the update's own rows, they would
        # move the old facts' routing (and with --slots the routers are frozen by contract).
        "train.calibrate_micro_batches": 0,
    }
    if anchor_replayed:
        if not update.replay:
            raise ValueError("--anchor-replayed anchors the replayed rows: it needs --replay R > 0")
        changes |= {"objective.anchor_rows": "marked", "objective.teacher": str(export),
                    "objective.anchor_weight": base.objective.anchor_weight or 1.0}
    if slots:
        if trainable != "knowledge":
            raise ValueError(f"--slots trains chosen units of the knowledge experts: it needs --trainable knowledge, "
                             f"got {trainable}")
        if base.train.ep_size != 1:
            raise ValueError(f"--slots needs train.ep_size=1 (every rank holds every expert), got {base.train.ep_size}")
        changes |= {"train.trainable": "experts", "train.weight_decay": 0.0}
    for key, value in changes.items():
        OmegaConf.update(node, key, value, merge=False)
    try:
        node = OmegaConf.merge(node, OmegaConf.from_dotlist(list(overrides)))
    except Exception as err:  # omegaconf's own error types: an unknown key or a value of the wrong type
        raise ValueError(f"--set {list(overrides)}: {err}") from err
    return OmegaConf.to_object(node), OmegaConf.to_yaml(node, resolve=True)


def choose_slots(export: Path, update: UpdateConfig, seq_len: int, per_layer: int) -> tuple[list, dict]:
    """The units ``--slots`` trains: scored on the base model over the update's own rows (no replay) against
    ``BACKGROUND_ROWS_PER_ROW`` x as many rows of the base world's pretraining corpus (``replay_rows``: none about a
    new or changed person). Returns (per layer [E, F] bool, ``{parameter name: gradient mask}``)."""
    from pure_reasoner.train.evaluation.evaluate import load
    from pure_reasoner.train.slots import parameter_masks, select_slots, slot_scores, unit_usage
    from pure_reasoner.train.world.generator import build_world, load_world_config
    from pure_reasoner.train.world_update import replay_rows, update_rows

    model, codec = load(export)
    built = build_update(build_world(load_world_config(export / "world.json")), update)
    own = [row for row in update_rows(built, anchor_column=True) if not row["anchor"]]
    background = replay_rows(built, BACKGROUND_ROWS_PER_ROW * len(own))

    def encode(rows: list[dict]) -> list[list[int]]:
        return [codec.encode((row.get("context") or "") + row["text"])[:seq_len] for row in rows]

    usage = zip(unit_usage(model, encode(own)), unit_usage(model, encode(background)), strict=True)
    selected = select_slots([slot_scores(u_EF, b_EF) for u_EF, b_EF in usage], per_layer)
    return selected, parameter_masks(model, selected)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.train.update", description=__doc__.split("\n")[0])
    parser.add_argument("base_run", type=Path, help="the trained run (its config.yaml and export/)")
    parser.add_argument("--out", type=Path, default=None, help="the update's run directory "
                                                                "(default: BASE_RUN-update-s<seed>[-replay<R>])")
    parser.add_argument("--seed", type=int, default=UpdateConfig.seed, help="which new people and changed facts")
    parser.add_argument("--new-people", type=int, default=UpdateConfig.new_people)
    parser.add_argument("--changed-facts", type=int, default=UpdateConfig.changed_facts)
    parser.add_argument("--replay", type=float, default=UpdateConfig.replay,
                        help="replayed pretraining rows per row of the update (rehearsal of old facts; 0: none)")
    parser.add_argument("--anchor-replayed", action="store_true",
                        help="anchor only the replayed rows, to the base model (needs --replay)")
    parser.add_argument("--trainable", choices=("knowledge", "experts", "all"), default="knowledge",
                        help="knowledge: only knowledge experts and routers (pure reasoner); all: everything (dense)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of the update")
    parser.add_argument("--slots", type=int, default=0, metavar="N",
                        help="train only the N expert units per MoE layer the update uses most against the "
                             "pretraining rows (0: every knowledge parameter)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, applied last")
    parser.add_argument("--no-eval", action="store_true", help="train only; score later with train.update_eval")
    parser.add_argument("--max-examples", type=int, default=None, help="questions per split in the evaluation")
    parser.add_argument("--bits-people", type=int, default=0,
                        help="the evaluation also measures the bits stored about the new people, scoring this many "
                             "(train.update_eval's 'stored'; 0: off)")
    args = parser.parse_args(argv)
    if args.steps <= 0:
        parser.error(f"--steps must be > 0, got {args.steps}")
    if args.bits_people < 0:
        parser.error(f"--bits-people must be >= 0, got {args.bits_people}")
    if args.slots < 0:
        parser.error(f"--slots must be >= 0, got {args.slots}")
    out = args.out or args.base_run.with_name(f"{args.base_run.name}-update-s{args.seed}"
                                              + (f"-replay{args.replay:g}" if args.replay else "")
                                              + ("-anchor-replayed" if args.anchor_replayed else "")
                                              + (f"-slots{args.slots}" if args.slots else ""))
    try:
        update = UpdateConfig(seed=args.seed, new_people=args.new_people, changed_facts=args.changed_facts,
                              replay=args.replay)
        cfg, resolved = run_config(args.base_run, out, update, args.trainable, args.steps, args.set,
                                   args.anchor_replayed, args.slots)
        selected, masks = (choose_slots(Path(cfg.train.init_from), update, cfg.data.seq_len, args.slots)
                           if args.slots else (None, None))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from pure_reasoner.train.loop import run
    from pure_reasoner.train.update_eval import evaluate_update, render, stored_bits

    try:
        summary = run(cfg, out, resolved, grad_masks=masks)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if selected is not None and int(os.environ.get("RANK", "0")) == 0:
        from pure_reasoner.moe.checkpoint import write_text
        from pure_reasoner.train.slots import selection_summary

        record = {"per_layer": args.slots, "background_rows_per_row": BACKGROUND_ROWS_PER_ROW,
                  **selection_summary(selected)}
        write_text(out / SLOTS, json.dumps(record, indent=1))
    print(f"done: {summary.steps} steps, final loss {summary.final_loss:.4f}, {summary.wall_s:.1f} s -> {out}")
    if args.no_eval or int(os.environ.get("RANK", "0")) != 0:
        return 0
    from pure_reasoner.train.export import EXPORT

    report = evaluate_update(args.base_run / EXPORT, out / EXPORT, max_examples=args.max_examples)
    if args.bits_people:
        report["stored"] = stored_bits(args.base_run / EXPORT, out / EXPORT, load_update(out / EXPORT),
                                       args.bits_people)
    (out / REPORT).write_text(json.dumps(report, indent=2))
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
