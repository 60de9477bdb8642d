"""Shared test settings: exact fp32 matmuls, a fixed seed per test, Triton's interpreter without a GPU.

TRITON_INTERPRET is read when a Triton kernel is decorated, i.e. when ``kernels.triton_*`` is first
imported — possibly while collecting tests/benchmarks, before tests/kernels' conftest. So it is set
here, in the root conftest, which pytest imports before any test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
