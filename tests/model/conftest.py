"""Fixtures of the model tests."""

from __future__ import annotations

import pytest

from vmad.model.build import build_vmad
from vmad.model.vmad import VMADModel


@pytest.fixture(scope="module")
def tiny() -> VMADModel:
    """The tiny preset with random weights, built once per test module."""
    return build_vmad("tiny")
