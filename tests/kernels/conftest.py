"""Kernel tests run the Triton kernels through Triton's CPU interpreter when there is no GPU.

Triton reads TRITON_INTERPRET when it decorates a kernel, i.e. when ``kernels.triton_*`` is first
imported. pytest imports this conftest before any test module below it, and nothing imports triton
earlier (``import kernels`` never does), so plain ``python -m pytest`` runs the interpreter suite.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def poison():
    """Fill every torch.empty* with NaN (ints with their max) so an element a kernel forgets to write fails."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was_on, warn_only=was_warn)
    torch.utils.deterministic.fill_uninitialized_memory = fill
