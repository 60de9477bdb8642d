"""What every Triton knowledge-path kernel shares: the row-block schedule and launch configs.

Shapes: S = T*K slots (rows in sorted order), E experts, P = E padded to a power of two.

Grouped GEMMs run one program per (expert, block of BLOCK_M rows of that expert). How many such blocks
there are depends on the routing, which lives on the device, so the grid is sized from an upper bound
and each program finds its expert from the offsets itself:

    sum_e ceil(n_e / BLOCK_M) <= ceil(S / BLOCK_M) + E     (each expert adds at most one partial block)

The programs left over are at least ceil((S - R) / BLOCK_M), R = routed rows (the bound exceeds the
blocks used by more than (S - R) / BLOCK_M), so they can zero the idle rows or exit at once.

Importing this module imports triton: only the Triton implementation does, on first use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backends import interpreting


def configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """Autotune candidates: several on a GPU; exactly one under the interpreter, which has no driver to
    benchmark with ("0 active drivers") and gains nothing from tuning."""
    return [interpreter] if interpreting() else gpu


def dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot``'s input precision: exact IEEE for fp32 (no TF32 rounding, as the tests require);
    the default (tensor cores) for fp16/bf16. fp32 on a GPU is therefore slow: train in bf16."""
    return "ieee" if dtype == torch.float32 else None


def launch(kernel, grid, *args, deterministic: bool, **constexprs) -> None:
    """Launch an autotuned kernel; ``deterministic`` pins its first config instead of the fastest.

    The tile sizes fix the order of every reduction (BLOCK_K over D or F, BLOCK_R over rows), and
    autotuning picks them by timing, so two processes can sum in different orders. A pinned config makes
    a deterministic kernel's bits independent of the run (and of the autotuner's ``reset_to_zero``: the
    callers zero their accumulators themselves).
    """
    if deterministic:
        kernel.fn[grid](*args, **constexprs, **kernel.configs[0].all_kwargs())
    else:
        kernel[grid](*args, **constexprs)


def row_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the (expert, row block) pairs any routing of ``num_slots`` rows can need."""
    return triton.cdiv(num_slots, block_m) + num_experts


def padded(num_experts: int) -> int:
    """P: E rounded up to a power of two, for ``tl.arange`` over experts."""
    return triton.next_power_of_2(num_experts)


@triton.jit
def expert_row_block(offsets_ptr, num_experts, num_slots, BLOCK_M: tl.constexpr, P: tl.constexpr):
    """This program's expert and its block of sorted rows.

    Programs past the last expert block get the idle rows ``[offsets[-1], S)`` instead, one block each
    (there are always enough: see the module docstring's bound), so kernels whose outputs are indexed by
    sorted row can write every element without reading the routed count back to the host.

    Args:
        offsets_ptr: [E] int32 end offsets of each expert's rows (``cumsum(counts_E)``).
        num_slots: S, the rows there are in sorted order.

    Returns:
        expert (``== num_experts``: an idle-row block), rows [BLOCK_M] int64, row_mask [BLOCK_M].
    """
    pid = tl.program_id(0)
    e_P = tl.arange(0, P)
    real_P = e_P < num_experts
    ends_P = tl.load(offsets_ptr + e_P, mask=real_P, other=0)
    starts_P = tl.load(offsets_ptr + e_P - 1, mask=real_P & (e_P > 0), other=0)
    blocks_P = tl.where(real_P, (ends_P - starts_P + BLOCK_M - 1) // BLOCK_M, 0)
    block_ends_P = tl.cumsum(blocks_P, axis=0)
    num_blocks = tl.sum(blocks_P, axis=0)
    idle = pid >= num_blocks
    expert = tl.sum((block_ends_P <= pid).to(tl.int32), axis=0)
    mine_P = e_P == expert
    first_block = tl.where(idle, num_blocks, tl.sum(tl.where(mine_P, block_ends_P - blocks_P, 0), axis=0))
    row_start = tl.where(idle, tl.max(ends_P, axis=0), tl.sum(tl.where(mine_P, starts_P, 0), axis=0))
    row_end = tl.where(idle, num_slots, tl.sum(tl.where(mine_P, ends_P, 0), axis=0))
    rows = row_start.to(tl.int64) + (pid - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    return tl.where(idle, num_experts, expert), rows, rows < row_end
