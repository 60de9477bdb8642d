"""Where each optional implementation can run, checked before anything optional is imported.

Triton compiles for CUDA tensors, or runs CPU tensors through its interpreter when the environment
sets ``TRITON_INTERPRET=1`` (read when triton decorates the kernels, i.e. on their first import).
megablocks is an optional CUDA-only dependency (``pip install -e .[gpu]``).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter instead of compiling for a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_triton(*tensors: torch.Tensor) -> None:
    """ValueError unless Triton can run on these tensors (CUDA, or CPU under the interpreter)."""
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreting():
            if t.dtype == torch.bfloat16:
                raise ValueError("the Triton interpreter computes bf16 tl.dot wrongly: use float32/float16 or a GPU")
            continue
        raise ValueError(
            f"impl='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; got a {t.device.type} tensor"
            + (" and TRITON_INTERPRET is not 1" if t.device.type == "cpu" else "")
        )


def check_megablocks(x: torch.Tensor) -> None:
    """ValueError unless megablocks (with its grouped GEMM) is installed and x is on CUDA."""
    for module in ("megablocks", "grouped_gemm"):
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"impl='megablocks' needs the {module!r} package: pip install -e '.[gpu]'")
    if x.device.type != "cuda":
        raise ValueError(f"impl='megablocks' needs CUDA tensors, got a {x.device.type} tensor")
