"""Reporting for ``benchmarks.layer``: tables, measured vs roofline speedups, the CPU targets, a plot.

Records are the dicts ``benchmarks.layer`` writes to JSON (one per case, provider, rate and mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

from pure_reasoner.benchmarks.common import Roofline, print_table

PEERS = ("qwen2moe", "deepspeed")
ROOFLINE_SLACK = 1.5  # ours within 1.5x of its roofline
SPEEDUP_SHARE = 0.9  # measured speedup >= 90% of the roofline (or FLOP) speedup
RATE0_SLACK = 1.10  # rate 0 within 1.10x of the reasoning expert alone
MEMORY_SLACK = 1.10  # activation memory with E experts within 1.10x of that with E/4, at equal rows


def _rate(rate: float) -> str:
    """0.03125 -> '1/32'."""
    return str(Fraction(rate).limit_denominator(1024))


def _find(records: Sequence[dict], case: str, provider: str, mode: str, rate: float | None = None) -> dict | None:
    for r in records:
        if (r["case"], r["provider"], r["mode"]) == (case, provider, mode) and (
            rate is None or abs(r["consult_rate"] - rate) < 1e-9
        ):
            return r
    return None


def _ours(records: Sequence[dict], case: str, mode: str = "fwd+bwd") -> list[dict]:
    return sorted((r for r in records if (r["case"], r["provider"], r["mode"]) == (case, "ours", mode)),
                  key=lambda r: r["consult_rate"])


def speedups(records: Sequence[dict], case: str, mode: str = "fwd+bwd") -> list[dict]:
    """Per rate of ours and per peer: measured speedup (peer time / ours), roofline speedup (peer
    roofline / ours) and FLOP ratio (peer FLOPs / ours)."""
    rows = []
    for mine in _ours(records, case, mode):
        for peer in PEERS:
            other = _find(records, case, peer, mode)
            if other is None:
                continue
            measured = other["time_s"] / mine["time_s"]
            roofline = other["roofline_s"] / mine["roofline_s"]
            rows.append({
                "case": case, "rate": mine["consult_rate"], "peer": peer, "measured": measured, "roofline": roofline,
                "share": measured / roofline, "flop_ratio": other["flops"] / mine["flops"],
            })
    return rows


def _target(name: str, case: str, value: float, threshold: float, met: bool, detail: str) -> dict:
    return {"target": name, "case": case, "value": value, "threshold": threshold, "met": bool(met), "detail": detail}


def check_targets(records: Sequence[dict], memory_checks: dict) -> list[dict]:
    """The CPU targets (fwd+bwd), each with its number and met / missed."""
    out = []
    for case in ("default", "large-batch"):
        for r in _ours(records, case):
            out.append(_target(
                "ours <= 1.5x roofline", case, r["vs_roofline"], ROOFLINE_SLACK, r["vs_roofline"] <= ROOFLINE_SLACK,
                f"rate {_rate(r['consult_rate'])}: {r['time_s']:.4g} s vs roofline {r['roofline_s']:.4g} s",
            ))
        for s in speedups(records, case):
            if s["rate"] >= 1.0 - 1e-9:
                continue
            out.append(_target(
                f"faster than {s['peer']}", case, s["measured"], 1.0, s["measured"] > 1.0,
                f"rate {_rate(s['rate'])}: measured speedup {s['measured']:.3g}x",
            ))
            out.append(_target(
                f"speedup vs {s['peer']} >= 90% of roofline speedup", case, s["share"], SPEEDUP_SHARE,
                s["share"] >= SPEEDUP_SHARE,
                f"rate {_rate(s['rate'])}: measured {s['measured']:.3g}x, roofline {s['roofline']:.3g}x",
            ))
            if case == "large-batch":
                share = s["measured"] / s["flop_ratio"]
                out.append(_target(
                    f"speedup vs {s['peer']} approaches FLOP ratio (>= 90%)", case, share, SPEEDUP_SHARE,
                    share >= SPEEDUP_SHARE,
                    f"rate {_rate(s['rate'])}: measured {s['measured']:.3g}x, FLOP ratio {s['flop_ratio']:.3g}x",
                ))
        rate0, alone = _find(records, case, "ours", "fwd+bwd", 0.0), _find(records, case, "reasoning", "fwd+bwd")
        if rate0 and alone:
            ratio = rate0["time_s"] / alone["time_s"]
            out.append(_target(
                "rate 0 <= 1.10x reasoning alone", case, ratio, RATE0_SLACK, ratio <= RATE0_SLACK,
                f"{rate0['time_s']:.4g} s vs {alone['time_s']:.4g} s",
            ))
    for case, check in memory_checks.items():
        out += _memory_targets(records, case, check)
    return out


def _memory_targets(records: Sequence[dict], case: str, check: dict) -> list[dict]:
    """Activation memory: independent of E at equal routed rows; growth per routed row across rates."""
    (e_big, act_big), (e_small, act_small) = sorted(check["activation_bytes"].items(), reverse=True)
    ratio = act_big / max(act_small, 1)
    rows = _ours(records, case)
    per_row = ""
    if len(rows) > 1 and rows[-1]["routed_rows"] > rows[0]["routed_rows"]:
        slope = (rows[-1]["activation_bytes"] - rows[0]["activation_bytes"]) / (
            rows[-1]["routed_rows"] - rows[0]["routed_rows"])
        per_row = f"; across rates {slope / 1024:.3g} KiB per routed row (rate 0: "
        per_row += (f"{rows[0]['activation_bytes'] / 2**20:.4g} MiB, rate 1: "
                    f"{rows[-1]['activation_bytes'] / 2**20:.4g} MiB)")
    return [_target(
        "activation memory grows with rows, not E", case, ratio, MEMORY_SLACK, ratio <= MEMORY_SLACK,
        f"rate {_rate(check['rate'])}: E={e_big} {act_big / 2**20:.4g} MiB vs E={e_small} {act_small / 2**20:.4g} MiB"
        f" (routed rows {check['routed_rows'][e_big]} vs {check['routed_rows'][e_small]}){per_row}",
    )]


def print_report(records: Sequence[dict], targets: Sequence[dict], roof_before: Roofline, roof_after: Roofline):
    """Print the main table per case, the speedup table, and the targets."""
    print(f"matmul peak P: {roof_before.matmul_gflops:.1f} GFLOP/s before, {roof_after.matmul_gflops:.1f} after; "
          f"copy W: {roof_before.copy_gbs:.1f} GB/s before, {roof_after.copy_gbs:.1f} after (the better is used)")
    for name, roof in (("before", roof_before), ("after", roof_after)):
        engines = ", ".join(f"{k} {v:.1f}" for k, v in roof.engines.items())
        print(f"  dense matmul GFLOP/s by engine, {name}: {engines}")
    for case in dict.fromkeys(r["case"] for r in records):
        rows = [{
            **r, "rate": _rate(r["consult_rate"]), "peak%": 100 * r["peak_fraction"],
            "spread": f"{r['min_s'] / r['time_s']:.2f}..{r['max_s'] / r['time_s']:.2f}",
            "act MiB": r["activation_bytes"] / 2**20 if "activation_bytes" in r else "",
        } for r in records if r["case"] == case]
        print_table(rows, ["provider", "rate", "mode", "time_s", "spread", "tokens_per_s", "gflops_per_s", "peak%",
                           "roofline_s", "vs_roofline", "x_pass_bound", "act MiB"], title=f"layer: {case}")
        sp = [{**s, "rate": _rate(s["rate"])} for s in speedups(records, case)]
        if sp:
            print_table(sp, ["rate", "peer", "measured", "roofline", "share", "flop_ratio"],
                        title=f"{case}, fwd+bwd: ours' speedup over peers (measured vs roofline)")
    print_table([{**t, "met": "met" if t["met"] else "MISSED"} for t in targets],
                ["case", "target", "met", "value", "threshold", "detail"], title="targets")


def plot(records: Sequence[dict], path: str) -> None:
    """Time (solid) and roofline (dashed) vs consult rate, per provider; one panel per case and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["case"], r["mode"]) for r in records))
    cases = list(dict.fromkeys(c for c, _ in panels))
    modes = list(dict.fromkeys(m for _, m in panels))
    fig, axes = plt.subplots(len(cases), len(modes), figsize=(5 * len(modes), 4 * len(cases)), squeeze=False)
    rates = sorted({r["consult_rate"] for r in records if r["provider"] == "ours"})
    for i, case in enumerate(cases):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            mine = [r for r in records if (r["case"], r["mode"]) == (case, mode)]
            if not mine:  # e.g. the large batch runs fwd+bwd only
                ax.axis("off")
                continue
            for k, name in enumerate(dict.fromkeys(r["provider"] for r in mine)):
                pts = sorted((r for r in mine if r["provider"] == name), key=lambda r: r["consult_rate"])
                color = f"C{k}"
                if len(pts) > 1:  # a curve over consult rates
                    xs = [r["consult_rate"] for r in pts]
                    ax.plot(xs, [r["time_s"] for r in pts], "o-", color=color, label=name)
                    ax.plot(xs, [r["roofline_s"] for r in pts], "--", color=color, alpha=0.7)
                else:  # peers and the reasoning expert: one cost, whatever our rate
                    ax.axhline(pts[0]["time_s"], color=color, label=name)
                    ax.axhline(pts[0]["roofline_s"], color=color, ls="--", alpha=0.7)
            ax.set_xscale("symlog", linthresh=1 / 32)
            ax.set_xticks(rates, [_rate(r) for r in rates])
            ax.set_yscale("log")
            ax.set_title(f"{case}: {mode} (dashed: roofline)")
            ax.set_xlabel("consult rate")
            ax.set_ylabel("seconds")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(result: dict) -> str:
    """Markdown tables (fwd+bwd per case, speedups, targets) of a ``benchmarks.layer`` JSON result."""
    records, machine = result["records"], result.get("machine", {})
    lines = [f"CPU: {machine.get('cpu_model', '?')}, {machine.get('torch_threads', '?')} threads; GEMM engines: "
             f"{machine.get('gemm_engines', 'not recorded')}", ""]

    def table(rows: Sequence[dict], columns: Sequence[str]) -> None:
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
        lines.extend(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)])
        lines.extend("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows)
        lines.append("")

    for case in dict.fromkeys(r["case"] for r in records):
        for mode in dict.fromkeys(r["mode"] for r in records if r["case"] == case):
            tokens = next(r["tokens"] for r in records if r["case"] == case)
            lines.append(f"**{case}, {mode}** ({tokens} tokens)")
            lines.append("")
            table([{**r, "rate": _rate(r["consult_rate"]), "peak %": 100 * r["peak_fraction"],
                    "spread": f"{r['min_s'] / r['time_s']:.2f}..{r['max_s'] / r['time_s']:.2f}",
                    "act MiB": r["activation_bytes"] / 2**20 if "activation_bytes" in r else ""}
                   for r in records if (r["case"], r["mode"]) == (case, mode)],
                  ["provider", "rate", "time_s", "spread", "tokens_per_s", "gflops_per_s", "peak %", "roofline_s",
                   "vs_roofline", "x_pass_bound", "act MiB", "engine"])
        sp = speedups(records, case)
        if sp:
            lines.extend([f"**{case}, fwd+bwd: speedup of ours over peers, measured vs roofline**", ""])
            table([{**s, "rate": _rate(s["rate"])} for s in sp],
                  ["rate", "peer", "measured", "roofline", "share", "flop_ratio"])
    lines.extend(["**Targets**", ""])
    table([{**t, "met": "met" if t["met"] else "**MISSED**"} for t in result["targets"]],
          ["case", "target", "met", "value", "threshold", "detail"])
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    with open(sys.argv[1]) as f:
        print(markdown(json.load(f)))
