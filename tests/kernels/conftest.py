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

from tq_vllm.codec import LayerCodec
from tq_vllm.config import PRESETS
from tq_vllm.reference import tq_store

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_reference import key_offset, random_keys  # noqa: E402


def make_cache(name: str, dim: int, kv_heads: int, block_size: int, seq_lens: list[int],
                dtype: torch.dtype = torch.float32, spare_blocks: int = 3, layer: int = 3,
                device: torch.device = DEVICE):
    """Random K/V of ragged sequences stored by :func:`reference.tq_store` through
    scattered blocks of a cache pre-filled with random bytes (as tests/test_reference.py).
    Drawn on the CPU (same bits on every device), then moved to ``device``.

    Returns (codec, cache, block_table int32 [B, M], [(k, v)] per sequence, unused blocks).
    """
    preset = PRESETS[name]
    perms = [torch.stack([torch.randperm(dim) for _ in range(kv_heads)])
             if preset.transform.calibrated_split and c.split else None
             for c in (preset.key, preset.value)]  # calibrated outlier halves: any order
    offset = key_offset(preset, kv_heads, dim)
    codec = LayerCodec.create(preset, dim, kv_heads, layer=layer, key_perm=perms[0],
                              value_perm=perms[1], key_offset=offset)
    slot = preset.layout(dim).slot_bytes
    per_seq = [max(1, -(-s // block_size)) for s in seq_lens]
    num_blocks = sum(per_seq) + spare_blocks
    cache = torch.randint(0, 256, (num_blocks, kv_heads, block_size, slot), dtype=torch.uint8)
    order = torch.randperm(num_blocks)
    table = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32)
    used = 0
    for b, n in enumerate(per_seq):
        table[b, :n] = order[used:used + n]
        used += n
    kv = []
    for b, s in enumerate(seq_lens):
        k, v = random_keys(s, kv_heads, dim, offset).to(dtype), torch.randn(s, kv_heads, dim).to(dtype)
        pos = torch.arange(s)
        tq_store(k, v, cache, table[b, pos // block_size].long() * block_size + pos % block_size,
                 codec)
        kv.append((k, v))
    if device.type != "cpu":
        codec, cache, table = codec.to(device), cache.to(device), table.to(device)
        kv = [(k.to(device), v.to(device)) for k, v in kv]
    return codec, cache, table, kv, order[used:]


@pytest.fixture
def build_cache():
    """The :func:`make_cache` builder (test modules cannot import this conftest)."""
    return make_cache


@pytest.fixture
def device() -> torch.device:
    """The device the kernel tests run on (:data:`DEVICE`)."""
    return DEVICE
