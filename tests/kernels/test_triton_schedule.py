"""What the Triton kernels share (kernels.triton_schedule): the grouped program order, the autotune key's
row bucket, the candidates per dot precision, the pinned config, and the launch's device guard."""

import contextlib

import pytest
import torch
import triton
import triton.language as tl

from pure_reasoner.kernels import triton_schedule
from pure_reasoner.kernels.expert_mlp.triton_down import (
    _down_scatter_bwd_kernel,
    _down_scatter_fwd_kernel,
    _down_swiglu_bwd_kernel,
)
from pure_reasoner.kernels.expert_mlp.triton_up import _gather_swiglu_bwd_kernel, _gather_swiglu_fwd_kernel
from pure_reasoner.kernels.expert_mlp.triton_wgrad import _grouped_wgrad_kernel
from pure_reasoner.kernels.triton_schedule import TileConfigs, pinned_config, row_bucket, swizzle

AUTOTUNED = [_gather_swiglu_fwd_kernel, _gather_swiglu_bwd_kernel, _down_scatter_fwd_kernel, _down_scatter_bwd_kernel,
             _down_swiglu_bwd_kernel, _grouped_wgrad_kernel]


@triton.jit
def _swizzle_probe(out_ptr, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    pid_m, pid_n = swizzle(num_pid_m, num_pid_n, GROUP_M)
    tl.store(out_ptr + 2 * tl.program_id(0), pid_m)
    tl.store(out_ptr + 2 * tl.program_id(0) + 1, pid_n)


@pytest.mark.parametrize("num_m,num_n,group", [(7, 5, 3), (8, 4, 8), (1, 9, 4), (10, 1, 4)],
                         ids=["ragged-last-group", "one-group", "one-row-block", "one-column-block"])
def test_swizzle_visits_every_tile_once_group_by_group(num_m, num_n, group):
    out = torch.full((num_m * num_n, 2), -1, dtype=torch.int32)
    _swizzle_probe[(num_m * num_n,)](out, num_m, num_n, GROUP_M=group)
    tiles = [tuple(t) for t in out.tolist()]
    assert sorted(tiles) == [(m, n) for m in range(num_m) for n in range(num_n)]
    # Programs in launch order stay inside one group of row blocks until all its columns are done.
    groups = [m // group for m, _ in tiles]
    assert groups == sorted(groups)
    for g in set(groups):
        rows = {m for m, _ in tiles if m // group == g}
        cols = [n for m, n in tiles if m // group == g]
        assert cols == sorted(cols) and len(cols) == len(rows) * num_n


def test_row_bucket():
    assert [row_bucket(n) for n in (0, 1, 100, 128, 129, 16384)] == [1, 1, 128, 128, 256, 16384]
    assert row_bucket(10**9) == 2**20


@pytest.mark.parametrize("kernel", AUTOTUNED, ids=lambda k: k.base_fn.__name__)
def test_autotune_key_has_the_row_bucket(kernel):
    """A small eval batch must not fix the config a large training batch then uses."""
    assert kernel.keys[-1] == "row_bucket" and "row_bucket" in kernel.fn.arg_names


def test_candidates_per_precision(monkeypatch):
    monkeypatch.setattr(triton_schedule, "interpreting", lambda: False)  # as on a GPU: every candidate

    def cfg(k, warps=4):
        return triton.Config({"BLOCK_M": 16, "BLOCK_K": k}, num_warps=warps, num_stages=3)

    mma, fma = (cfg(64), cfg(32, 8)), (cfg(16),)
    tiles = TileConfigs(mma=mma, fma=fma, interpreter=cfg(8))
    assert [c.kwargs["BLOCK_K"] for c in tiles.tf32] == [32, 16]  # 4-byte operands: half the K block
    every = tiles.all
    assert len(every) == 5
    kept = {p: [c.kwargs["BLOCK_K"] for c in tiles.prune(every, {}, DOT_PRECISION=p)] for p in (None, "tf32", "ieee")}
    assert kept == {None: [64, 32], "tf32": [32, 16], "ieee": [16]}


def test_pinned_config_is_the_first_candidate_of_the_precision():
    from pure_reasoner.kernels.triton_schedule import ROW_GEMM_TILES as _TILES

    assert len(_down_scatter_fwd_kernel.configs) == 1  # the interpreter's single candidate
    assert pinned_config(_down_scatter_fwd_kernel, {"DOT_PRECISION": "ieee"}) is _down_scatter_fwd_kernel.configs[0]
    assert _TILES.mma[0].kwargs != _TILES.fma[0].kwargs  # so the pin differs per precision on a GPU


def test_launch_makes_the_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device: the launch must switch to its tensors' device."""
    entered = []

    @contextlib.contextmanager
    def fake_guard(device):
        entered.append(device)
        yield

    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append(len(entered))

    monkeypatch.setattr(triton_schedule, "device_guard", fake_guard)
    triton_schedule.launch(Kernel(), (1,), 3, torch.zeros(2), deterministic=False, BLOCK=4)
    assert entered == [torch.device("cpu")] and launched == [1]  # launched inside the guard


def test_device_guard_selects_the_cuda_device(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: seen.append(d) or contextlib.nullcontext())
    with triton_schedule.device_guard(torch.device("cuda", 1)):
        pass
    assert seen == [torch.device("cuda", 1)]
    with triton_schedule.device_guard(torch.device("cpu")):  # the interpreter's tensors: nothing to switch
        pass
    assert len(seen) == 1


def test_pin_configs_env_pins_every_autotuned_launch(monkeypatch):
    calls = []

    class Fn:
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append(("pinned", kw["BLOCK_M"]))

    class Tuned(triton.runtime.Autotuner):
        def __init__(self):
            self.fn, self.early_config_prune = Fn(), None
            self.configs = [triton.Config({"BLOCK_M": 32}), triton.Config({"BLOCK_M": 64})]

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append(("tuned", None))

    triton_schedule.launch(Tuned(), (1,), torch.zeros(1), deterministic=False)
    monkeypatch.setenv(triton_schedule.PIN_CONFIGS_ENV, "1")
    triton_schedule.launch(Tuned(), (1,), torch.zeros(1), deterministic=False)
    assert calls == [("tuned", None), ("pinned", 32)]
