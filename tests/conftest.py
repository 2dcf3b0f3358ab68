"""Shared fixtures: fixed seeds, small shapes."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
