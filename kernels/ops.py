"""Launchers: validate inputs, then dispatch to the fastest kernel for the device.

CPU: batched PyTorch (:mod:`tq_vllm.kernels.cpu_torch`).
"""

from __future__ import annotations

import torch

from tq_vllm import reference
from tq_vllm.codec import LayerCodec
from tq_vllm.kernels import cpu_torch


def _check_cache(kv_cache: torch.Tensor, codec: LayerCodec) -> None:
    reference.check_cache(kv_cache, codec)


def store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
          slot_mapping: torch.Tensor, codec: LayerCodec) -> None:
    """Quantize and write ``[T, H, d]`` K/V at ``slot_mapping`` ``[T]`` (-1 skipped)."""
    reference.tq_store(key, value, kv_cache, slot_mapping, codec)


def decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, codec: LayerCodec, scale: float, out: torch.Tensor) -> None:
    """Decode attention: q/out ``[B, Hq, d]``, block_table ``[B, M]``, seq_lens ``[B]``."""
    _check_cache(kv_cache, codec)
    if q.dim() != 3 or out.shape != q.shape or block_table.shape[0] != q.shape[0]:
        raise ValueError(f"decode: q {tuple(q.shape)}, out {tuple(out.shape)}, "
                         f"block_table {tuple(block_table.shape)} disagree")
    if q.shape[1] % kv_cache.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {kv_cache.shape[1]}")
    cpu_torch.decode_attention(q, kv_cache, block_table, seq_lens, codec, scale, out)


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
            block_table: torch.Tensor, seq_lens_cpu: torch.Tensor,
            query_start_loc_cpu: torch.Tensor, first: int, codec: LayerCodec, scale: float,
            out: torch.Tensor, fresh_exact: bool) -> None:
    """Causal attention for query chunks of sequences ``first..``; see cpu_torch."""
    _check_cache(kv_cache, codec)
    cpu_torch.prefill_attention(q, k, v, kv_cache, block_table, seq_lens_cpu,
                                query_start_loc_cpu, first, codec, scale, out, fresh_exact)
