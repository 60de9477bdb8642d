"""The tiles of the grouped row-block GEMMs (``kernels.expert_mlp.triton_up``, ``kernels.expert_mlp.triton_down``).

Shapes: S sorted rows, T tokens, K the reduction dim, N the output dim of one program's column block;
one program owns BLOCK_M rows of one expert (``kernels.triton_schedule.grouped_tile``) and BLOCK_N columns.

Every helper is a ``triton.jit`` function, inlined where it is called: the kernels compile to what they
would with the loads and stores written out. Importing this module imports triton.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pure_reasoner.kernels.triton_schedule import grouped_tile


@triton.jit
def expert_tile(offsets_ptr, slot_order_ptr, num_experts, num_slots, num_cols, stride_we,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, P: tl.constexpr):
    """``grouped_tile``'s (expert, rows, row_mask, pid_n, cols), plus the rows' flat slots [BLOCK_M] and
    the offset of the expert's weights (``expert * stride_we``, int64). An idle-row block's slots are read
    too (its rows lie within [0, S)); a kernel that does not use them drops the load."""
    expert, rows, row_mask, pid_n, cols = grouped_tile(offsets_ptr, num_experts, num_slots, num_cols, BLOCK_M,
                                                       BLOCK_N, GROUP_M, P)
    slots = tl.load(slot_order_ptr + rows, mask=row_mask, other=0)
    return expert, rows, row_mask, pid_n, cols, slots, expert.to(tl.int64) * stride_we


@triton.jit
def out_tile(rows, row_mask, cols, N):
    """(offsets, mask) of the [BLOCK_M, BLOCK_N] output tile at sorted rows ``rows`` of a row-major [S, N]."""
    return rows[:, None] * N + cols[None, :], row_mask[:, None] & (cols < N)[None, :]


@triton.jit
def row_tile(ptr, rows, row_mask, kk, K):
    """[BLOCK_M, BLOCK_K] tile of a row-major [·, K] operand: rows ``rows`` (sorted rows or tokens),
    columns ``kk``; zero outside."""
    return tl.load(ptr + rows[:, None] * K + kk[None, :], mask=row_mask[:, None] & (kk < K)[None, :], other=0.0)


@triton.jit
def weight_tile_offsets(w_base, kk, cols, K, N, TRANSPOSED: tl.constexpr):
    """(int64 offsets, mask) of the [BLOCK_K, BLOCK_N] tile (rows ``kk`` of K, columns ``cols`` of N) of one
    expert's [K, N] weight operand at element ``w_base``, stored [K, N] or, ``TRANSPOSED``, [N, K] (read
    straight from that layout). Returned rather than loaded so that two weights of one layout (w1, w3) load
    through one offset tile: an offset tile per weight makes the up-projection's fp32 tiles spill."""
    if TRANSPOSED:
        offs = cols[None, :] * K + kk[:, None]
    else:
        offs = kk[:, None] * N + cols[None, :]
    return w_base + offs, (kk < K)[:, None] & (cols < N)[None, :]


@triton.jit
def rows_times_weight(a_ptr, w_ptr, w_base, a_rows, row_mask, cols, K, N, W_TRANSPOSED: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """a[a_rows] @ w for one tile: [BLOCK_M, BLOCK_N] in fp32, the reduction over K in BLOCK_K steps.
    a: row-major [·, K]; w: one expert's weight at element ``w_base`` of ``w_ptr`` (``weight_tile_offsets``)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = row_tile(a_ptr, a_rows, row_mask, kk, K)
        w_offs, w_mask = weight_tile_offsets(w_base, kk, cols, K, N, W_TRANSPOSED)
        acc += tl.dot(a, tl.load(w_ptr + w_offs, mask=w_mask, other=0.0), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def store_by_row_or_token(out_ptr, tile, rows, tokens, row_mask, cols, N, PER_ROW: tl.constexpr):
    """Write a [BLOCK_M, BLOCK_N] tile of a row-major output with N columns: ``PER_ROW``, stored at its
    sorted rows of [S, N] (combined afterwards, no atomics); else added atomically into its tokens' rows
    of [T, N]."""
    mask = row_mask[:, None] & (cols < N)[None, :]
    if PER_ROW:
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], tile, mask=mask)
    else:
        # Only the sum matters, read after the kernel: no ordering between programs is needed.
        tl.atomic_add(out_ptr + tokens[:, None] * N + cols[None, :], tile, mask=mask, sem="relaxed")
