"""Shared test settings: exact fp32 matmuls, a fixed seed per test, Triton's interpreter without a GPU.

TRITON_INTERPRET is read when a Triton kernel is decorated, i.e. when ``kernels.triton_*`` is first
imported — possibly while collecting tests/benchmarks, before tests/kernels' conftest. So it is set
here, in the root conftest, which pytest imports before any test module.

The GEMM engine choice (``kernels.engines``) is cached in a directory of this test run, not the user's.
"""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("PURE_REASONER_CACHE_DIR", tempfile.mkdtemp(prefix="pure_reasoner_cache_"))

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
