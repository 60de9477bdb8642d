"""The one seam between the layer and the knowledge-expert implementations.

Shapes: T tokens, K slots per token, D model dim, F expert width, E experts.

| impl       | runs on                                   | role                                  |
|------------|-------------------------------------------|---------------------------------------|
| torch      | anywhere                                  | fast path on CPU (grouped_mm)         |
| reference  | anywhere                                  | loop oracle for tests                 |
| triton     | CUDA, or CPU with ``TRITON_INTERPRET=1``  | production GPU path                   |
| megablocks | CUDA with ``pip install -e .[gpu]``       | peer backend for GPU benchmarks       |

The optional ones are imported on first use, after their device checks, so importing ``kernels``
never imports triton or megablocks.
"""

from __future__ import annotations

import torch

from pure_reasoner.kernels.backends import check_megablocks, check_triton
from pure_reasoner.kernels.expert_mlp.reference import knowledge_mlp_reference
from pure_reasoner.kernels.expert_mlp.torch_mlp import knowledge_mlp_torch

IMPLS = ("torch", "reference", "triton", "megablocks")


def _check(x_TD, expert_ids_TK, gates_TK, w1_EDF, w3_EDF, w2_EFD) -> None:
    if x_TD.dim() != 2:
        raise ValueError(f"x_TD must be 2-D [T, D], got shape {tuple(x_TD.shape)}")
    num_tokens, dim = x_TD.shape
    num_experts, _, width = w1_EDF.shape
    expected = {
        "expert_ids_TK": (expert_ids_TK, (num_tokens, expert_ids_TK.shape[-1])),
        "gates_TK": (gates_TK, (num_tokens, expert_ids_TK.shape[-1])),
        "w1_EDF": (w1_EDF, (num_experts, dim, width)),
        "w3_EDF": (w3_EDF, (num_experts, dim, width)),
        "w2_EFD": (w2_EFD, (num_experts, width, dim)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
        if tensor.device != x_TD.device:
            raise ValueError(f"{name} is on {tensor.device}, x_TD on {x_TD.device}")
    for name, w in (("w1_EDF", w1_EDF), ("w3_EDF", w3_EDF), ("w2_EFD", w2_EFD)):
        if w.dtype != x_TD.dtype:
            raise ValueError(f"{name} has dtype {w.dtype}, x_TD has {x_TD.dtype}")
    if not gates_TK.is_floating_point():
        raise ValueError(f"gates_TK must be floating point, got {gates_TK.dtype}")


def knowledge_mlp(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    w1_EDF: torch.Tensor,
    w3_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    impl: str = "torch",
    max_rows: int | None = None,
    deterministic: bool = False,
    tf32: bool = False,
    w13_ED2F: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over each token's consulted experts of gate * SwiGLU expert(x).

    Args:
        x_TD: [T, D] tokens.
        expert_ids_TK: [T, K] int expert ids in ``[0, E)``, or -1 for a slot that consults nothing.
        gates_TK: [T, K] gate weights.
        w1_EDF, w3_EDF: [E, D, F] gate and up projections; w2_EFD: [E, F, D] down projection.
        impl: one of ``IMPLS``.
        max_rows: how many sorted routed rows keep their activations for the backward (``torch`` masked
            and ``triton``; a static bound, so nothing is read from the device): rows past it are recomputed
            in the backward, exactly. None keeps all T*K. The other implementations process exactly the
            routed rows.
        deterministic: sum each token's slots in slot order, k = 0..K-1 (no atomics, no scatter-add), so
            the result does not depend on how the routing orders the rows. ``reference`` always does.
        tf32: ``triton`` only: fp32 dots on tensor cores in TF32 (for training); off, exact IEEE fp32.
        w13_ED2F: [E, D, 2F] whose two halves (along the last dim) are w1_EDF and w3_EDF: ``torch`` then runs the
            up-projections as one fused GEMM and puts their gradient on it; the other implementations read the halves.

    Returns:
        y_TD: [T, D].
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _check(x_TD, expert_ids_TK, gates_TK, w1_EDF, w3_EDF, w2_EFD)
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0):
        raise ValueError(f"max_rows must be None or an int >= 0, got {max_rows!r}")
    args = (x_TD, expert_ids_TK, gates_TK, w1_EDF, w3_EDF, w2_EFD)
    if impl == "torch":
        return knowledge_mlp_torch(*args, max_rows=max_rows, deterministic=deterministic, w13_ED2F=w13_ED2F)
    if impl == "reference":
        return knowledge_mlp_reference(*args)
    if impl == "triton":
        check_triton(x_TD, expert_ids_TK)  # weights and gates share x's device; weights its dtype
        from pure_reasoner.kernels.expert_mlp.triton_mlp import knowledge_mlp_triton

        return knowledge_mlp_triton(*args, max_rows=max_rows, deterministic=deterministic, tf32=tf32)
    check_megablocks(x_TD)
    from pure_reasoner.kernels.expert_mlp.megablocks_mlp import knowledge_mlp_megablocks

    return knowledge_mlp_megablocks(*args, deterministic=deterministic)
