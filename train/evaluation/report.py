"""Turn ``python -m pure_reasoner.train.evaluation`` reports into the decoupling comparison: JSON, a markdown table,
matplotlib plots.

    python -m pure_reasoner.train.evaluation.report results/   # reads results/eval/<model>.json (+ results/runs.json)

Inputs (in DIR):
    eval/<model>.json: one ``python -m pure_reasoner.train.evaluation --json`` report per model (the file stem names
    the model). runs.json (optional): {model: {"wall_s": ..., "commands": [...], ...}}, copied into the output as is;
        its ``flops`` (recorded when the run was made) stands in for a checkpoint that is no longer on disk.
    notes.md (optional): text put before the tables of ``decoupling.md`` (what was run, what it shows).
Outputs (in DIR): ``decoupling.json`` (per model: per-split accuracy under every ablation, decoupling scores,
faithfulness, bits per parameter, routing, active FLOPs/token from ``moe.flops.nominal`` of the checkpoint's
config when it is still on disk), ``decoupling.md`` (tables), ``accuracy.png`` (chance-adjusted accuracy per
split per model), ``ablations.png`` (per split, each model's bars under each ablation), ``consult_rate.png``
(answer vs other-token consult rate per MoE layer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pure_reasoner.train.evaluation import scores as em  # noqa: E402

EVAL_DIR, RUNS, NOTES = "eval", "runs.json", "notes.md"


def _flops(checkpoint: str | None) -> dict | None:
    """Nominal active FLOPs/token of an exported checkpoint at its max_seq_len, or None when it is gone."""
    config = Path(checkpoint or "") / "config.json"
    if not checkpoint or not config.is_file():
        return None
    from pure_reasoner.moe import flops
    from pure_reasoner.moe.checkpoint import config_from_dict

    cfg = config_from_dict(json.loads(config.read_text()))
    acc = flops.nominal(cfg, cfg.max_seq_len)
    return {"seq_len": cfg.max_seq_len, "flops_per_token": acc.flops_per_token,
            "inference_flops_per_token": acc.inference_flops_per_token,
            "active_params": acc.active_params, "total_params": acc.total_params}


def summarize(name: str, report: dict, run: dict | None = None) -> dict:
    """One model's row of the comparison from its eval report (and its run record)."""
    splits = {s: {a: {"acc": r["acc"], "acc_adjusted": r["acc_adjusted"], "n": r["n"], "chance": r["chance"],
                      "exact_match": r.get("exact_match")} for a, r in by_ablation.items()}
              for s, by_ablation in report["splits"].items()}
    bits = report.get("knowledge_bits") or {}
    routing = report.get("routing") or {}
    return {
        "model": name,
        "checkpoint": report.get("checkpoint"),
        "splits": splits,
        "decoupling": [{k: d.get(k) for k in ("closed", "open", "score", "reason", "closed_relative_drop",
                                               "open_relative_drop")} for d in report.get("decoupling", [])],
        "faithfulness": {a: f.get("choice") or {} for a, f in (report.get("faithfulness") or {}).items()},
        "bits": bits.get("bits"),
        "max_bits": bits.get("max_bits"),
        "bits_per_knowledge_param": bits.get("bits_per_knowledge_param"),
        "bits_per_param": bits.get("bits_per_param"),
        "fano_bits": bits.get("fano_bits"),
        "fano_bits_knowledge_off": (report.get("knowledge_bits_knowledge_off") or {}).get("fano_bits"),
        "routing": {g: {k: r.get(k) for k in ("answer_rate", "other_rate", "ratio", "key_rate", "rest_rate",
                                              "ratio_beyond_keys")}
                    | {"per_layer": [{k: x.get(k) for k in ("answer_rate", "other_rate", "ratio")}
                                     for x in r.get("per_layer", [])]} for g, r in routing.items()},
        "flops": _flops(report.get("checkpoint")) or (run or {}).get("flops"),
        "run": run or {},
    }


def _faith(f: dict | None) -> str:
    """'faithfulness (context / memory / neither)' of a train.evaluation.evaluate faithfulness record."""
    if not f:
        return "—"
    return (f"{em.fmt(f.get('faithfulness'), '.2f')} ({em.fmt(f.get('follows_context'), '.2f')} / "
            f"{em.fmt(f.get('follows_memory'), '.2f')} / {em.fmt(f.get('neither'), '.2f')})")


def markdown(models: list[dict], notes: str = "") -> str:
    """``notes`` then tables: chance-adjusted accuracy per split and ablation; headline numbers; the commands."""
    splits = list(dict.fromkeys(s for m in models for s in m["splits"]))
    ablations = list(dict.fromkeys(a for m in models for s in m["splits"].values() for a in s))
    lines = [notes.rstrip(), ""] if notes.strip() else []
    lines += ["### Chance-adjusted accuracy (multiple choice; 0 = chance, 1 = perfect)", "",
             "| model | ablation | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
    for m in models:
        for a in ablations:
            cells = [em.fmt(m["splits"].get(s, {}).get(a, {}).get("acc_adjusted"), "+.3f") for s in splits]
            lines.append(f"| {m['model']} | {a} | " + " | ".join(cells) + " |")
    lines += ["", "### Headline numbers per model", "",
              "| model | train FLOPs/token | active / total params | decoupling (closed vs open) | "
              "faithfulness (base; context / memory / neither) | bits / knowledge param | bits / param | "
              "Fano bits (base / knowledge off) | consult ratio answer/other (closed, open) | train wall s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        f = m["flops"] or {}
        dec = "; ".join(f"{d['score'] if d['score'] is None else format(d['score'], '+.2f')} ({d['reason']})"
                        for d in m["decoupling"]) or "—"
        ratios = ", ".join(em.fmt((m["routing"].get(g) or {}).get("ratio"), ".2f")
                           for g in ("closed_book", "open_book"))
        params = (f"{em.fmt(f.get('active_params'), ',.0f')} / {em.fmt(f.get('total_params'), ',.0f')}" if f else "—")
        lines.append(f"| {m['model']} | {em.fmt(f.get('flops_per_token'), ',.0f')} | {params} | {dec} | "
                     f"{_faith(m['faithfulness'].get('base'))} | {em.fmt(m['bits_per_knowledge_param'], '.4f')} | "
                     f"{em.fmt(m['bits_per_param'], '.4f')} | {em.fmt(m.get('fano_bits'), '.0f')} / "
                     f"{em.fmt(m.get('fano_bits_knowledge_off'), '.0f')} | {ratios} | "
                     f"{em.fmt(m['run'].get('wall_s'), '.0f')} |")
    commands = [(m["model"], c) for m in models for c in m["run"].get("commands", [])]
    if commands:
        lines += ["", "### Commands", "", "```bash", *(c for _, c in commands), "```"]
    return "\n".join(lines) + "\n"


def plot(models: list[dict], out: Path) -> list[Path]:
    """accuracy.png, ablations.png, consult_rate.png under ``out``: one row of bars per model (readable at 20)."""
    paths = []
    names = [m["model"] for m in models]
    splits = list(dict.fromkeys(s for m in models for s in m["splits"]))
    ablations = list(dict.fromkeys(a for m in models for s in m["splits"].values() for a in s))
    height = max(4.0, 0.1 * len(models) * max(len(splits), len(ablations)) + 1.5)

    def grouped_rows(ax, keys: list[str], value) -> None:
        """Horizontal bars: one group per model (top to bottom), one bar per key inside it."""
        bar = 0.8 / max(len(keys), 1)
        for k, key in enumerate(keys):
            ax.barh([j + k * bar for j in range(len(models))], [value(m, key) or 0.0 for m in models], bar,
                    label=key)
        ax.set_yticks([j + 0.4 - bar / 2 for j in range(len(models))], names, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=0.5)

    fig, ax = plt.subplots(figsize=(8, height))
    grouped_rows(ax, splits, lambda m, s: m["splits"].get(s, {}).get("base", {}).get("acc_adjusted"))
    ax.set_xlabel("chance-adjusted accuracy")
    ax.set_title("Accuracy per split (no ablation)")
    ax.legend(fontsize=7, loc="lower right")
    paths.append(_save(fig, out / "accuracy.png"))

    fig, axes = plt.subplots(1, len(splits), figsize=(2.6 * len(splits) + 2, height), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], splits, strict=True):
        grouped_rows(ax, ablations, lambda m, a, s=s: m["splits"].get(s, {}).get(a, {}).get("acc_adjusted"))
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("chance-adjusted accuracy", fontsize=7)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    paths.append(_save(fig, out / "ablations.png"))

    groups = ("closed_book", "open_book")
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    colors = plt.cm.tab20.colors
    for ax, group in zip(axes, groups, strict=True):
        for i, m in enumerate(models):
            layers = (m["routing"].get(group) or {}).get("per_layer") or []
            if layers:
                color = colors[i % len(colors)]
                ax.plot(range(len(layers)), [x["answer_rate"] or 0.0 for x in layers], "-o", color=color,
                        label=m["model"])
                ax.plot(range(len(layers)), [x["other_rate"] or 0.0 for x in layers], ":x", color=color, alpha=0.6)
        ax.set_xlabel("MoE layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{group}: answer tokens (solid) vs others (dotted)", fontsize=9)
    axes[0].set_ylabel("consult rate")
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    paths.append(_save(fig, out / "consult_rate.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build(directory: str | Path) -> dict:
    """Read DIR/eval/*.json (+ DIR/runs.json), write decoupling.json, decoupling.md and the plots into DIR."""
    directory = Path(directory)
    files = sorted((directory / EVAL_DIR).glob("*.json"))
    if not files:
        raise ValueError(f"no eval reports under {directory / EVAL_DIR}")
    runs = json.loads((directory / RUNS).read_text()) if (directory / RUNS).is_file() else {}
    models = []
    for path in files:
        try:
            report = json.loads(path.read_text())
            models.append(summarize(path.stem, report, runs.get(path.stem)))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: not a train.evaluation.evaluate report ({err!r})") from err
    out = {"models": models}
    (directory / "decoupling.json").write_text(json.dumps(out, indent=2))
    notes = (directory / NOTES).read_text() if (directory / NOTES).is_file() else ""
    (directory / "decoupling.md").write_text(markdown(models, notes))
    plot(models, directory)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.train.evaluation.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    try:
        out = build(args.directory)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.directory}/decoupling.json, decoupling.md and 3 plots for {len(out['models'])} models")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
