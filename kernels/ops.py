"""Device dispatch for the backend: CPU kernels on CPU, Triton kernels on CUDA.

Every entry point has a same-named pure-PyTorch reference in :mod:`tq_vllm.reference`
(``store`` ↔ ``tq_store``, ``decode``/``prefill`` ↔ ``tq_paged_attention``).
"""

from __future__ import annotations

import torch

from tq_vllm import reference
from tq_vllm.codec import LayerCodec


def _impl(device: torch.device):
    if device.type == "cpu":
        from tq_vllm.kernels import cpu_ops

        return cpu_ops
    if device.type == "cuda":
        from tq_vllm.kernels import triton_ops

        return triton_ops
    raise NotImplementedError(f"tq-vllm has no kernels for {device.type} tensors")


def store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
          slot_mapping: torch.Tensor, codec: LayerCodec) -> None:
    """Quantize and write ``[T, H, d]`` K/V at ``slot_mapping`` ``[T]`` (-1 skipped)."""
    reference.check_cache(kv_cache, codec)
    if key.shape != value.shape or key.dim() != 3 or slot_mapping.shape != key.shape[:1]:
        raise ValueError(f"store: key {tuple(key.shape)}, value {tuple(value.shape)}, "
                         f"slot_mapping {tuple(slot_mapping.shape)} disagree")
    _impl(kv_cache.device).store(key, value, kv_cache, slot_mapping, codec)


def decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, codec: LayerCodec, scale: float, out: torch.Tensor) -> None:
    """Decode attention: q/out ``[B, Hq, d]``, block_table ``[B, M]``, seq_lens ``[B]``."""
    reference.check_cache(kv_cache, codec)
    if q.dim() != 3 or out.shape != q.shape or block_table.shape[0] != q.shape[0]:
        raise ValueError(f"decode: q {tuple(q.shape)}, out {tuple(out.shape)}, "
                         f"block_table {tuple(block_table.shape)} disagree")
    if q.shape[1] % kv_cache.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {kv_cache.shape[1]}")
    _impl(q.device).decode(q, kv_cache, block_table, seq_lens, codec, scale, out)


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
            block_table: torch.Tensor, seq_lens_cpu: torch.Tensor,
            query_start_loc_cpu: torch.Tensor, first: int, codec: LayerCodec, scale: float,
            out: torch.Tensor, fresh_exact: bool) -> None:
    """Causal attention for query chunks of sequences ``first..`` (see cpu_ops.prefill)."""
    reference.check_cache(kv_cache, codec)
    _impl(q.device).prefill(q, k, v, kv_cache, block_table, seq_lens_cpu, query_start_loc_cpu,
                            first, codec, scale, out, fresh_exact)
