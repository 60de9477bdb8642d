"""Markdown tables from the benchmarks' JSON results, for benchmarks/RESULTS.md.

    python -m pure_reasoner.benchmarks.results_md kernels benchmarks/results/kernels_cpu.json
    python -m pure_reasoner.benchmarks.results_md layer benchmarks/results/layer_cpu.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from pure_reasoner.benchmarks.layer_report import markdown as layer_markdown

KERNEL_COLUMNS = ["workload", "rate", "op", "provider", "mode", "ms", "min_ms", "GFLOP/s", "GB/s", "roofline_ms",
                  "x_roofline", "x_pass_bound", "engine"]


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def kernels_markdown(result: dict) -> str:
    """The run's machine, roofline and every row of a ``benchmarks.kernels`` JSON result as a table."""
    machine = result["machine"]
    lines = [f"CPU: {machine.get('cpu_model', '?')}, GEMM engines: {machine.get('gemm_engines', 'not recorded')}", "",
             f"machine: `{json.dumps(machine)}`", ""]
    for where, roof in result["rooflines"].items():
        engines = ", ".join(f"{k} {v:.1f}" for k, v in roof.get("engines", {}).items())
        lines.append(f"roofline ({where}): P = {roof['matmul_gflops']:.1f} GFLOP/s ({engines}), "
                     f"W = {roof['copy_gbs']:.1f} GB/s")
    lines += ["", "| " + " | ".join(KERNEL_COLUMNS) + " |", "|" + "---|" * len(KERNEL_COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in KERNEL_COLUMNS) + " |" for r in result["records"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("kernels", "layer"))
    parser.add_argument("json_path")
    args = parser.parse_args(argv)
    with open(args.json_path) as f:
        result = json.load(f)
    print(kernels_markdown(result) if args.kind == "kernels" else layer_markdown(result))


if __name__ == "__main__":
    main()
