"""What every Triton knowledge-path kernel shares: the row-block schedule, launch configs, the launch.

Shapes: S = T*K slots (rows in sorted order), E experts, P = E padded to a power of two.

Grouped GEMMs run one program per (expert, block of BLOCK_M rows of that expert) and output column
block. How many row blocks there are depends on the routing, which lives on the device, so the grid is
sized from an upper bound and each program finds its expert from the offsets itself:

    sum_e ceil(n_e / BLOCK_M) <= ceil(S / BLOCK_M) + E     (each expert adds at most one partial block)

The programs left over are at least ceil((S - R) / BLOCK_M), R = routed rows (the bound exceeds the
blocks used by more than (S - R) / BLOCK_M), so they can zero the idle rows or exit at once.

The grid is one-dimensional and walks GROUP_M row blocks down each column block before moving right
(``swizzle``): a group's gathered rows and the expert's weight tiles stay in L2 while every column
block of the group is computed, instead of re-streaming the gathered rows once per column block.

Importing this module imports triton: only the Triton implementation does, on first use.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pure_reasoner.kernels.backends import interpreting

# Power-of-two buckets of the row count: the autotune key, so a small eval batch tunes its own config
# instead of fixing the one every training step then uses.
_MAX_ROW_BUCKET = 1 << 20
# Set to 1, every autotuned kernel runs its first candidate, as deterministic runs do: a test suite on a
# GPU then compiles one binary per kernel and shape instead of timing every candidate (minutes).
PIN_CONFIGS_ENV = "PURE_REASONER_TRITON_PIN_CONFIGS"


@dataclass(frozen=True)
class TileConfigs:
    """Autotune candidates per dot precision. ``mma``: 16-bit tensor-core tiles (fp16, bf16); TF32 runs
    the same tiles with half the reduction block (``reduction``), as its 4-byte operands would otherwise
    double the shared memory of every pipeline stage (64 x 128 x 64 at 3 stages: 240 KiB > the H100's
    227); ``fma``: exact fp32 ('ieee'), which needs smaller tiles to stay within registers. Under the
    interpreter, exactly one: it has no driver to benchmark with ("0 active drivers") and gains nothing
    from tuning.

    The first candidate of each list is the pinned one of deterministic runs (``launch``).
    """

    mma: tuple[triton.Config, ...]
    fma: tuple[triton.Config, ...]
    interpreter: triton.Config
    reduction: str = "BLOCK_K"

    @property
    def tf32(self) -> tuple[triton.Config, ...]:
        return tuple(_halved(c, self.reduction) for c in self.mma)

    @property
    def all(self) -> list[triton.Config]:
        return [self.interpreter] if interpreting() else [*self.mma, *self.tf32, *self.fma]

    def prune(self, configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        """``early_config_prune``: the candidates for this launch's ``DOT_PRECISION``."""
        if interpreting():
            return configs
        precision = kwargs["DOT_PRECISION"]
        keep = {"ieee": self.fma, "tf32": self.tf32}.get(precision, self.mma)
        return [c for c in configs if _signature(c) in {_signature(k) for k in keep}]

    def autotune(self, key: list[str], **kwargs):
        """``triton.autotune`` over these candidates, keyed on ``key`` plus the row bucket."""
        return triton.autotune(configs=self.all, key=[*key, "row_bucket"],
                               prune_configs_by={"early_config_prune": self.prune}, **kwargs)


def _tile(block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


# The autotune candidates of every knowledge-path kernel, in one table.
#
# The row-block GEMMs' candidates (gather + up/gate, down + scatter, and their backwards): each compiles
# without a register spill on sm_90 and sm_80 in every dtype (kernels.triton_aot). Left out for spilling:
# 128 x 128 (up forward's two accumulators; every kernel on sm_80), and on sm_80 the up backward at
# 64 x 128 x 64 / 8 warps, 32 x 128 x 64 / 4 warps, 64 x 64 x 64 / 4 warps, and FMA 32 x 64 x 16.
ROW_GEMM_TILES = TileConfigs(
    mma=(_tile(64, 128, 32, 8, 3), _tile(64, 64, 64, 8, 3), _tile(128, 64, 32, 8, 3), _tile(32, 128, 64, 8, 3),
         _tile(16, 128, 64, 4, 4)),
    fma=(_tile(64, 64, 8, 8, 2), _tile(32, 32, 16, 4, 2)),
    interpreter=triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}),
)


# The fused backward keeps u, a1, a3 and h live at once in its epilogue: in bf16, every 64-row tile
# spills (255 registers at 64 x 64 / 4 warps and 64 x 128 / 8 warps; kernels.triton_aot), 32 x 128 / 8
# warps uses 134. Small row blocks cost little weight traffic: GROUP_M row blocks share each w2 tile.
SWIGLU_BWD_TILES = TileConfigs(
    mma=(
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
    ),
    fma=ROW_GEMM_TILES.fma,
    interpreter=ROW_GEMM_TILES.interpreter,
)

# The grouped weight gradient (triton_wgrad): 32 x 128 x 128 / 8 warps spills on sm_80 (kernels.triton_aot).
WGRAD_TILES = TileConfigs(
    mma=(
        triton.Config({"BLOCK_R": 32, "BLOCK_I": 64, "BLOCK_O": 64, "GROUP_I": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 64, "BLOCK_I": 128, "BLOCK_O": 64, "GROUP_I": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 64, "BLOCK_I": 128, "BLOCK_O": 128, "GROUP_I": 8}, num_warps=8, num_stages=4),
    ),
    fma=(
        triton.Config({"BLOCK_R": 16, "BLOCK_I": 64, "BLOCK_O": 64, "GROUP_I": 8}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_R": 16, "BLOCK_I": 64, "BLOCK_O": 64, "GROUP_I": 8}, num_warps=8, num_stages=2),
    ),
    interpreter=triton.Config({"BLOCK_R": 16, "BLOCK_I": 32, "BLOCK_O": 32, "GROUP_I": 2}),
    reduction="BLOCK_R",
)


def _halved(config: triton.Config, name: str) -> triton.Config:
    kwargs = {**config.kwargs, name: config.kwargs[name] // 2}
    return triton.Config(kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _signature(config: triton.Config) -> tuple:
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


def dot_precision(dtype: torch.dtype, tf32: bool = False) -> str | None:
    """``tl.dot``'s input precision: exact IEEE for fp32 (no TF32 rounding, as the tests require) unless
    ``tf32`` (tensor cores, ~1e-3 relative error per product: for training); the default (tensor cores)
    for fp16/bf16."""
    if dtype != torch.float32:
        return None
    return "tf32" if tf32 else "ieee"


def row_bucket(num_rows: int) -> int:
    """The autotune key's row count: ``num_rows`` rounded up to a power of two, capped at 2^20."""
    return min(triton.next_power_of_2(max(num_rows, 1)), _MAX_ROW_BUCKET)


def pinned_config(kernel, constexprs: dict) -> triton.Config:
    """The config a deterministic launch of an autotuned ``kernel`` uses: the first candidate."""
    candidates = kernel.configs
    if kernel.early_config_prune is not None:
        candidates = kernel.early_config_prune(candidates, {}, **constexprs)
    return candidates[0]


def device_guard(device: torch.device):
    """Make ``device`` current while launching: Triton launches on the current CUDA device, which need
    not be the tensors' (tensors on cuda:1 with cuda:0 current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(kernel, grid, *args, deterministic: bool, **constexprs) -> None:
    """Launch a Triton kernel on its tensors' device; ``deterministic`` pins an autotuned kernel's config.

    The tile sizes fix the order of every reduction (BLOCK_K over D or F, BLOCK_R over rows), and
    autotuning picks them by timing, so two processes can sum in different orders. A pinned config makes
    a deterministic kernel's bits independent of the run (and of the autotuner's ``reset_to_zero``: the
    callers zero their accumulators themselves). ``PIN_CONFIGS_ENV``=1 pins every launch's config too.
    """
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    pin = deterministic or os.environ.get(PIN_CONFIGS_ENV) == "1"
    with device_guard(device):
        if pin and isinstance(kernel, triton.runtime.Autotuner):
            kernel.fn[grid](*args, **constexprs, **pinned_config(kernel, constexprs).all_kwargs())
        else:
            kernel[grid](*args, **constexprs)


def row_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the (expert, row block) pairs any routing of ``num_slots`` rows can need."""
    return triton.cdiv(num_slots, block_m) + num_experts


def padded(num_experts: int) -> int:
    """P: E rounded up to a power of two, for ``tl.arange`` over experts."""
    return triton.next_power_of_2(num_experts)


@triton.jit
def swizzle(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in a 1-D grid of num_pid_m * num_pid_n: GROUP_M row blocks at a
    time, each group swept over every column block before the next group starts."""
    pid = tl.program_id(0)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    return pid_m, pid_n


@triton.jit
def grouped_tile(offsets_ptr, num_experts, num_slots, num_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr, P: tl.constexpr):
    """This program's tile of a grouped GEMM over ``num_cols`` output columns, in the swizzled order:
    (expert, rows, row_mask) as ``expert_row_block``, the column block pid_n and its columns [BLOCK_N]."""
    pid_m, pid_n = swizzle(tl.cdiv(num_slots, BLOCK_M) + num_experts, tl.cdiv(num_cols, BLOCK_N), GROUP_M)
    expert, rows, row_mask = expert_row_block(pid_m, offsets_ptr, num_experts, num_slots, BLOCK_M, P)
    return expert, rows, row_mask, pid_n, pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def expert_row_block(pid_m, offsets_ptr, num_experts, num_slots, BLOCK_M: tl.constexpr, P: tl.constexpr):
    """The expert and block of sorted rows of row-block program ``pid_m``.

    Programs past the last expert block get the idle rows ``[offsets[-1], S)`` instead, one block each
    (there are always enough: see the module docstring's bound), so kernels whose outputs are indexed by
    sorted row can write every element without reading the routed count back to the host.

    Args:
        offsets_ptr: [E] int32 end offsets of each expert's rows (``cumsum(counts_E)``).
        num_slots: S, the rows there are in sorted order.

    Returns:
        expert (``== num_experts``: an idle-row block), rows [BLOCK_M] int64, row_mask [BLOCK_M].
    """
    e_P = tl.arange(0, P)
    real_P = e_P < num_experts
    ends_P = tl.load(offsets_ptr + e_P, mask=real_P, other=0)
    starts_P = tl.load(offsets_ptr + e_P - 1, mask=real_P & (e_P > 0), other=0)
    blocks_P = tl.where(real_P, (ends_P - starts_P + BLOCK_M - 1) // BLOCK_M, 0)
    block_ends_P = tl.cumsum(blocks_P, axis=0)
    num_blocks = tl.sum(blocks_P, axis=0)
    idle = pid_m >= num_blocks
    expert = tl.sum((block_ends_P <= pid_m).to(tl.int32), axis=0)
    mine_P = e_P == expert
    first_block = tl.where(idle, num_blocks, tl.sum(tl.where(mine_P, block_ends_P - blocks_P, 0), axis=0))
    row_start = tl.where(idle, tl.max(ends_P, axis=0), tl.sum(tl.where(mine_P, starts_P, 0), axis=0))
    row_end = tl.where(idle, num_slots, tl.sum(tl.where(mine_P, ends_P, 0), axis=0))
    rows = row_start.to(tl.int64) + (pid_m - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    return tl.where(idle, num_experts, expert), rows, rows < row_end
