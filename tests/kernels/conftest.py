"""Shared helpers for the kernel tests: tiny ragged paged caches built by the reference."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("TQ_TEST_DEVICE", "cpu"))
"""Where the Triton kernel tests run: ``cpu`` (default, CI) runs the kernels on CPU
tensors through the Triton interpreter; ``TQ_TEST_DEVICE=cuda`` compiles them for the
GPU and runs the same tests there (reference included)."""
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before any test module imports triton

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_reference import build_cache as _build_cache  # noqa: E402


def make_cache(*args, device: torch.device = DEVICE, **kwargs):
    """:func:`test_reference.build_cache` on the kernel tests' device (:data:`DEVICE`)."""
    return _build_cache(*args, device=device, **kwargs)


@pytest.fixture
def build_cache():
    """The :func:`make_cache` builder (test modules cannot import this conftest)."""
    return make_cache


@pytest.fixture
def device() -> torch.device:
    """The device the kernel tests run on (:data:`DEVICE`)."""
    return DEVICE
