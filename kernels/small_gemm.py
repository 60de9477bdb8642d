"""Grouped fp32 GEMMs for experts with few rows, streaming each expert's weight once: the ``small`` engine.

At low consult rates each knowledge expert sees a few dozen rows against a 1024 x 1024 weight, and the GEMM is
bound by reading the weight. A BLAS packs the weight first (an extra read and write of every element), so on a
2-core Xeon every engine measured streamed it at 10-13 GB/s, a third to half of a plain read. ``small_gemm.cpp``
reads it in place, in column panels that stay in L2 while the expert's rows pass over them.

The source is compiled on first use for the running CPU (``-march=native``, OpenMP) into the cache directory of
``kernels.engines`` (``small_gemm/<hash>.so``, the hash over the source, the flags and the CPU model), then
loaded with ctypes. Without a C++ compiler (``$CXX``, else ``c++``) the engine is simply not offered.

Experts with more than ``max_rows`` rows (default ``SMALL_ROWS``) are not small: they run through ``large``, a
dense matmul per expert written into its rows of the result (``torch.mm`` unless the caller passes the engine
``kernels.engines`` measured for such experts). Offsets are read on the host (CPU only). Shapes: R rows sorted by
expert, E experts, I input and O output width.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from pure_reasoner.kernels.routing.metadata import expert_row_ranges

SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# Rows per expert up to which the weight-streaming kernels run; above it the GEMM has enough rows per weight
# element for a BLAS's packed, compute-bound kernel. Measured on a 2-core Intel Xeon (`Intel(R) Xeon(R) Processor`;
# 64 experts, 1024 x 1024, 2 threads; benchmarks.small_gemm): 1.06-1.11x faster than grouped_mm at 32 rows, level
# at 48, 1.04-1.09x slower forward at 64 and 1.25-1.33x at 128.
SMALL_ROWS = 32

# (a [M, I], b [I, O], out [M, O]) -> None: out = a @ b
MatmulInto = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]


def mm_into(a_MI: torch.Tensor, b_IO: torch.Tensor, out_MO: torch.Tensor) -> None:
    """``out = a @ b`` with ``torch.mm`` writing straight into ``out`` (MKL on x86 builds)."""
    torch.mm(a_MI, b_IO, out=out_MO)

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "pr_grouped_nn": [_ptr, _i64, _ptr, _i64, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, ctypes.c_int],
    "pr_grouped_nt": [_ptr, _i64, _ptr, _i64, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, ctypes.c_int],
    "pr_grouped_wgrad": [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, ctypes.c_int],
}


def compiler() -> str | None:
    """The C++ compiler to build with: ``$CXX``, else ``c++`` / ``g++`` on the PATH, else None."""
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return name
    return None


def build(cache_dir: Path, cxx: str) -> Path:
    """Compile the source for this CPU into ``cache_dir`` (once per source, flags and CPU); the library's path.

    Written to a temporary name and renamed, so a concurrent or interrupted build never leaves a partial file.
    Raises RuntimeError with the compiler's message when it fails.
    """
    from pure_reasoner.kernels.engines import cpu_model

    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), cpu_model().encode(), cxx.encode()]))
    path = cache_dir / "small_gemm" / f"{key.hexdigest()[:16]}.so"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.so")
    done = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cxx} failed to build {SOURCE.name}: {done.stderr.strip()[-2000:]}")
    os.replace(tmp, path)
    return path


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first call), or None with a warning when they cannot be built here."""
    from pure_reasoner.kernels.engines import default_cache_path

    cxx = compiler()
    if cxx is None:
        return None
    try:
        lib = ctypes.CDLL(str(build(default_cache_path().parent, cxx)))
    except (RuntimeError, OSError) as err:
        warnings.warn(f"the small-GEMM engine is not available: {err}", stacklevel=2)
        return None
    for name, args in _SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, None
    return lib


def available() -> bool:
    """Whether the engine can run here (builds the kernels on first call)."""
    return library() is not None


def _checked(rows_RI: torch.Tensor, other: torch.Tensor, offsets_E: torch.Tensor, experts: int, inner: int,
             other_rows: int | None = None) -> ctypes.CDLL:
    """The library, after the checks that keep the C kernels inside their buffers (ValueError naming the value):
    CPU float32 operands, ``inner`` columns of the row operand, one offset per expert, offsets within the rows."""
    for t in (rows_RI, other):
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise ValueError(f"the small-GEMM engine takes CPU float32 tensors, got {t.dtype} on {t.device}")
    if rows_RI.dim() != 2 or rows_RI.shape[1] != inner:
        raise ValueError(f"row operand must be [R, {inner}], got {tuple(rows_RI.shape)}")
    if other_rows is not None and other_rows != rows_RI.shape[0]:
        raise ValueError(f"both row operands must have the same rows, got {rows_RI.shape[0]} and {other_rows}")
    if offsets_E.numel() != experts:
        raise ValueError(f"offsets must have one entry per expert ({experts}), got {offsets_E.numel()}")
    if experts and int(offsets_E[-1]) > rows_RI.shape[0]:
        raise ValueError(f"offsets end at {int(offsets_E[-1])}, past the {rows_RI.shape[0]} rows")
    lib = library()
    if lib is None:
        raise RuntimeError("the small-GEMM engine is not available on this machine (no C++ compiler)")
    return lib


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dim (a copy only when it has not)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _ends(offsets_E: torch.Tensor) -> torch.Tensor:
    return offsets_E.to(device="cpu", dtype=torch.int64).contiguous()


def grouped_matmul(x_RI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor,
                   max_rows: int = SMALL_ROWS, large: MatmulInto = mm_into) -> torch.Tensor:
    """Rows ``[offsets[e-1], offsets[e])`` of x times ``w[e]``: [R, O]; rows past ``offsets[-1]`` unwritten.

    Args:
        x_RI: [R, I] rows sorted by expert.
        w_EIO: [E, I, O] weights, contiguous along O, or a transposed view contiguous along I (read as is).
        offsets_E: [E] end offsets.
        max_rows: experts with more rows run through ``large``.
        large: (a [M, I], b [I, O], out [M, O]) writes a @ b into out: the matmul of an expert with more than
            ``max_rows`` rows.
    """
    num_experts, in_dim, out_dim = w_EIO.shape
    lib = _checked(x_RI, w_EIO, offsets_E, num_experts, in_dim)
    x_RI = _row_major(x_RI)
    if w_EIO.stride(2) != 1 and w_EIO.stride(1) != 1:
        w_EIO = w_EIO.contiguous()
    out_RO = x_RI.new_empty(x_RI.shape[0], out_dim)
    ends = _ends(offsets_E)
    args = (x_RI.data_ptr(), x_RI.stride(0))
    tail = (out_RO.data_ptr(), out_RO.stride(0), ends.data_ptr(), num_experts, in_dim, out_dim, max_rows,
            torch.get_num_threads())
    if w_EIO.stride(2) == 1:
        lib.pr_grouped_nn(*args, w_EIO.data_ptr(), w_EIO.stride(0), w_EIO.stride(1), *tail)
    else:
        lib.pr_grouped_nt(*args, w_EIO.data_ptr(), w_EIO.stride(0), w_EIO.stride(2), *tail)
    for e, start, end in expert_row_ranges(ends):
        if end - start > max_rows:
            large(x_RI[start:end], w_EIO[e], out_RO[start:end])
    return out_RO


def grouped_matmul_wgrad(a_RI: torch.Tensor, b_RO: torch.Tensor, offsets_E: torch.Tensor,
                         max_rows: int = SMALL_ROWS, large: MatmulInto = mm_into) -> torch.Tensor:
    """Per expert, the sum over its rows of ``a[r]ᵀ b[r]``: [E, I, O] contiguous, zero for experts with no rows
    (``max_rows`` and ``large`` as in ``grouped_matmul``)."""
    lib = _checked(a_RI, b_RO, offsets_E, offsets_E.numel(), a_RI.shape[-1], b_RO.shape[0])
    a_RI, b_RO = _row_major(a_RI), _row_major(b_RO)
    ends = _ends(offsets_E)
    num_experts, in_dim, out_dim = ends.numel(), a_RI.shape[1], b_RO.shape[1]
    out_EIO = a_RI.new_empty(num_experts, in_dim, out_dim)
    lib.pr_grouped_wgrad(a_RI.data_ptr(), a_RI.stride(0), b_RO.data_ptr(), b_RO.stride(0), out_EIO.data_ptr(),
                         ends.data_ptr(), num_experts, in_dim, out_dim, max_rows, torch.get_num_threads())
    for e, start, end in expert_row_ranges(ends):
        if end - start > max_rows:
            large(a_RI[start:end].t(), b_RO[start:end], out_EIO[e])
    return out_EIO
