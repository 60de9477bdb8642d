"""Fixtures for the training-stack tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def dist_info():
    """A one-rank gloo process group for in-process engine tests (shared by the whole session)."""
    from pure_reasoner.train.dist import init_distributed

    return init_distributed()
