"""Fixtures for the reliability tests (the one-rank process group is the training tests' own)."""

from tests.train.conftest import dist_info  # noqa: F401
