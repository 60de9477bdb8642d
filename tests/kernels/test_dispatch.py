"""The impl seam: every name in IMPLS is reachable, and the optional backends fail clearly."""

import importlib.util
import subprocess
import sys

import pytest
import torch
from kernel_inputs import as_oracle_input, assert_outputs_and_grads, mlp_inputs

from pure_reasoner.kernels import IMPLS, knowledge_mlp
from pure_reasoner.kernels.expert_mlp.reference import knowledge_mlp_reference
from pure_reasoner.moe import KnowledgeConfig


def _inputs():
    x_TD = torch.randn(4, 16)
    ids_TK = torch.tensor([[0, 1], [1, -1], [-1, -1], [0, 0]])
    weights = [torch.randn(2, 16, 16) for _ in range(3)]
    return x_TD, ids_TK, torch.rand(4, 2), *weights


def test_config_accepts_every_impl():
    for impl in IMPLS:
        assert KnowledgeConfig(impl=impl).impl == impl
    with pytest.raises(ValueError, match="knowledge.impl"):
        KnowledgeConfig(impl="cuda-magic")


def test_megablocks_not_installed_is_a_clear_error():
    if importlib.util.find_spec("megablocks") is not None:
        pytest.skip("megablocks is installed here")
    with pytest.raises(ValueError, match="megablocks"):
        knowledge_mlp(*_inputs(), impl="megablocks")


def test_megablocks_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # pretend it is installed
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        knowledge_mlp(*_inputs(), impl="megablocks")


def test_torch_and_reference_never_load_the_triton_kernels():
    """Only impl='triton' loads our Triton modules (``*.triton_*``). (Calling any torch.library custom op makes
    torch import torch._dynamo, which imports the ``triton`` package itself if installed; that is torch's doing.)
    The last lines check that the filter sees such a module once one is imported."""
    code = (
        "import sys, torch\n"
        "from pure_reasoner import kernels\n"
        "x = torch.randn(4, 16); w = torch.randn(2, 16, 16)\n"
        "ids = torch.tensor([[0, 1], [1, -1], [-1, -1], [0, 0]])\n"
        "for impl in ('torch', 'reference'):\n"
        "    kernels.knowledge_mlp(x, ids, torch.rand(4, 2), w, w, w, impl=impl)\n"
        "def ours(): return [m for m in sys.modules if m.startswith('pure_reasoner.kernels.') and '.triton_' in m]\n"
        "assert not ours(), ours()\n"
        "import pure_reasoner.kernels.expert_mlp.triton_mlp\n"
        "assert 'pure_reasoner.kernels.expert_mlp.triton_mlp' in ours(), ours()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


_MEGABLOCKS_READY = torch.cuda.is_available() and importlib.util.find_spec("megablocks") is not None


@pytest.mark.skipif(not _MEGABLOCKS_READY, reason="megablocks runs on CUDA with pip install -e .[gpu]: "
                    "this machine has no CUDA device or no megablocks")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_megablocks_matches_the_oracle(dtype):
    """The megablocks adapter (our routing and combine around megablocks' grouped GEMMs) equals the loop oracle
    in float64, output and every gradient; idle slots included (megablocks' own gather could not take them)."""
    inputs = mlp_inputs(37, 64, 96, 5, 2, 0.3, dtype)
    tri = knowledge_mlp(*inputs, impl="megablocks")
    ref_inputs = [as_oracle_input(t) for t in inputs]
    ref = knowledge_mlp_reference(*ref_inputs)
    floats = [inputs[0], *inputs[2:]]
    assert_outputs_and_grads(tri, ref, floats, [ref_inputs[0], *ref_inputs[2:]], ["x", "gates", "w1", "w3", "w2"],
                             dtype)
