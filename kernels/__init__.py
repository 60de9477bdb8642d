"""Pure ops for the knowledge path, one folder per op, each with its oracle beside its fast paths; and the
dense linear the rest of the model uses (oneDNN GEMMs on CPU fp32).

    routing/            routing metadata: reference, torch path, Triton kernel
    expert_mlp/         the knowledge experts' MLP: reference, torch path, Triton kernels, megablocks, dispatch
    onednn_gemm.py, onednn_linear.py     grouped and dense fp32 GEMMs through oneDNN; ``Linear``
    small_gemm.py, small_gemm.cpp        grouped fp32 GEMMs for experts with few rows, built for the running CPU
    engines.py          which engine runs each class of CPU fp32 GEMM, measured on the running machine
    triton_schedule.py  what every Triton kernel shares: row-block schedule, launch, the autotune table
    triton_aot.py       ahead-of-time compile of every Triton kernel for GPUs this machine does not have
    backends.py         where each optional implementation can run

Importing this package never imports triton; the Triton implementations load on first use.
"""

from pure_reasoner.kernels.expert_mlp.dispatch import IMPLS, knowledge_mlp
from pure_reasoner.kernels.onednn_gemm import dense_matmul_engines
from pure_reasoner.kernels.onednn_linear import Linear, linear
from pure_reasoner.kernels.routing.metadata import NOT_CONSULTED, RoutingMeta, routing_metadata

__all__ = ["IMPLS", "NOT_CONSULTED", "Linear", "RoutingMeta", "dense_matmul_engines", "knowledge_mlp", "linear",
           "routing_metadata"]

from pure_reasoner.toplevel import defer_to_installed

# Imported as a bare top-level name from the repository root: the installed package of that name wins.
defer_to_installed(__name__, __file__)
