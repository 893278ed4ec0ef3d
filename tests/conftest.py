"""Shared fixtures: deterministic seeds and small models used across the tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits():
    from structadmm.models import load_digits_split

    return load_digits_split()
