"""The knowledge path's grouped GEMMs at few rows per expert: the ``small`` engine against ``grouped_mm``.

    python -m pure_reasoner.benchmarks.small_gemm [--rows 4,8,16,32,48,64,96,128] [--experts 64] [--json PATH]
                                                  [--repeats 5]

For each rows-per-expert count M: E experts with 1024 x 1024 fp32 weights (256 MiB at E = 64, more than a cache
holds, as in training), one call each of the forward GEMM (``x @ w``), the input gradient against a transposed view
(``dy @ wᵀ``) and the weight gradient (``aᵀ b`` per expert), with both engines interleaved (medians of repeats; the
small engine runs every expert, whatever M). GB/s counts each weight (or weight gradient) once. Run alone: it is a
bandwidth measurement.
"""

from __future__ import annotations

import argparse

import torch

from pure_reasoner.benchmarks.common import print_table, time_interleaved, write_json
from pure_reasoner.kernels import small_gemm
from pure_reasoner.kernels.expert_mlp.torch_mlp import grouped_matmul_wgrad_with, grouped_matmul_with

DIM = 1024
ALL_ROWS = 10**9  # max_rows that makes the small engine run every expert


def cases(experts: int, rows: int, gen: torch.Generator) -> dict:
    """engine/op -> one call, for ``experts`` experts of ``rows`` rows each."""
    w_EIO = torch.empty(experts, DIM, DIM).uniform_(-1, 1, generator=gen)
    wt_EIO = torch.empty(experts, DIM, DIM).uniform_(-1, 1, generator=gen).transpose(1, 2)
    x_RI = torch.randn(experts * rows, DIM, generator=gen)
    b_RO = torch.randn(experts * rows, DIM, generator=gen)
    offsets_E = torch.arange(1, experts + 1, dtype=torch.int32) * rows
    out = {}
    for op, w in (("x @ w", w_EIO), ("dy @ wT", wt_EIO)):
        out[f"small/{op}"] = lambda w=w: small_gemm.grouped_matmul(x_RI, w, offsets_E, max_rows=ALL_ROWS)
        out[f"grouped_mm/{op}"] = lambda w=w: grouped_matmul_with("grouped_mm", x_RI, w, offsets_E)
    out["small/wgrad"] = lambda: small_gemm.grouped_matmul_wgrad(x_RI, b_RO, offsets_E, max_rows=ALL_ROWS)
    out["grouped_mm/wgrad"] = lambda: grouped_matmul_wgrad_with("grouped_mm", x_RI, b_RO, offsets_E)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.benchmarks.small_gemm", description=__doc__)
    parser.add_argument("--rows", default="4,8,16,32,48,64,96,128", help="rows per expert, comma-separated")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the rows and the machine to this JSON file")
    args = parser.parse_args(argv)
    if not small_gemm.available():
        raise SystemExit("the small engine is not available here (no C++ compiler)")
    gen = torch.Generator().manual_seed(0)
    records = []
    for rows in (int(r) for r in args.rows.split(",")):
        timings = time_interleaved(cases(args.experts, rows, gen), repeats=args.repeats)
        for op in ("x @ w", "dy @ wT", "wgrad"):
            small, base = timings[f"small/{op}"], timings[f"grouped_mm/{op}"]
            records.append({"rows": rows, "experts": args.experts, "op": op, "small_ms": small.median_s * 1e3,
                             "grouped_mm_ms": base.median_s * 1e3, "speedup": base.median_s / small.median_s,
                             "small_GBps": args.experts * DIM * DIM * 4 / small.median_s / 1e9})
    print_table(records, ["rows", "op", "small_ms", "grouped_mm_ms", "speedup", "small_GBps"],
                title=f"{args.experts} experts, {DIM} x {DIM} fp32, {torch.get_num_threads()} threads")
    if args.json:
        write_json(args.json, records)


if __name__ == "__main__":
    from pure_reasoner.kernels.malloc_tuning import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()  # keeps freed memory: the weight gradients are fresh every call
    main()
