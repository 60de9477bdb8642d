"""The kernel fuzzer, short (the long run: ``python scripts/fuzz_kernels.py --cases 300``), and proof it can fail."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_kernels.py"


@pytest.fixture(scope="module")
def fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_fuzz(fuzz_module):
    kinds, failures = fuzz_module.fuzz(25, seed=1)
    assert failures == []
    assert sum(kinds.values()) == 25 and set(fuzz_module.EDGES) <= set(kinds)


@pytest.mark.parametrize("bug", ["output", "grad"])
def test_fuzz_catches_a_wrong_kernel(fuzz_module, monkeypatch, bug):
    from pure_reasoner.kernels.expert_mlp import torch_mlp as kernels_expert_mlp_torch_mlp

    real = kernels_expert_mlp_torch_mlp.knowledge_mlp_torch

    def wrong(x_TD, ids_TK, gates_TK, w1, w3, w2, **options):
        if bug == "output":
            return real(x_TD, ids_TK, gates_TK, w1, w3, w2, **options) * 1.001
        return real(x_TD, ids_TK, gates_TK.detach(), w1, w3, w2, **options)  # drops the gates' gradient

    monkeypatch.setattr(kernels_expert_mlp_torch_mlp, "knowledge_mlp_torch", wrong)
    _, failures = fuzz_module.fuzz(10, seed=1)
    assert len(failures) >= 5, failures
