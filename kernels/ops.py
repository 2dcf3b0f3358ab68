"""Device dispatch for the backend: CPU kernels on CPU, Triton kernels on CUDA.

Every entry point has a same-named pure-PyTorch reference in :mod:`tq_vllm.reference`
(``store`` ↔ ``tq_store``, ``decode``/``prefill`` ↔ ``tq_paged_attention``).
"""

from __future__ import annotations

import torch

from tq_vllm import reference
from tq_vllm.calibration import LayerTransform
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
          slot_mapping: torch.Tensor, codec: LayerCodec,
          transform: LayerTransform | None = None) -> None:
    """Quantize and write ``[T, H, d]`` K/V at ``slot_mapping`` ``[T]`` (-1 skipped):
    ``transform.keys(key)`` / ``transform.values(value)`` when a transform is given. The
    launchers validate their inputs."""
    impl = _impl(kv_cache.device)
    if impl.FUSES_TRANSFORMS:
        impl.store(key, value, kv_cache, slot_mapping, codec, transform=transform)
    else:
        if transform is not None:
            key, value = transform.keys(key), transform.values(value)
        impl.store(key, value, kv_cache, slot_mapping, codec)


def decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, codec: LayerCodec, scale: float, out: torch.Tensor,
           transform: LayerTransform | None = None) -> None:
    """Decode attention: q/out ``[B, Hq, d]``, block_table ``[B, M]``, seq_lens ``[B]``; the
    queries are ``transform.queries(q)`` when a transform is given. The launchers validate
    their inputs."""
    impl = _impl(q.device)
    if impl.FUSES_TRANSFORMS:
        impl.decode(q, kv_cache, block_table, seq_lens, codec, scale, out, transform=transform)
    else:
        q = q if transform is None else transform.queries(q)
        impl.decode(q, kv_cache, block_table, seq_lens, codec, scale, out)


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
            block_table: torch.Tensor, seq_lens_cpu: torch.Tensor,
            query_start_loc_cpu: torch.Tensor, first: int, codec: LayerCodec, scale: float,
            out: torch.Tensor, fresh_exact: bool) -> None:
    """Causal attention for query chunks of sequences ``first..`` (see cpu_ops.prefill)."""
    reference.check_cache(kv_cache, codec)
    _impl(q.device).prefill(q, k, v, kv_cache, block_table, seq_lens_cpu, query_start_loc_cpu,
                            first, codec, scale, out, fresh_exact)
