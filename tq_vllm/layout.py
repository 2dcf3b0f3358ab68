"""Packed slot layout: the bytes one token of one KV head occupies in the cache.

The paged cache is vLLM's own uint8 tensor, viewed as
``[num_blocks, num_kv_heads, block_size, slot_bytes]`` (vLLM's ``LBHNC`` layout,
the one its CPU attention uses too, so exact boundary layers can share it).
Offsets come from :meth:`tq_vllm.config.Preset.layout`; this module only moves bits.

Byte map of one slot (little-endian; ``G`` = channel groups, 1 or 2)::

    offset                      bytes            content
    0                           2·(G + qjl)      K norms, fp16: group norms, then ‖residual‖ (QJL);
                                                 sign bit of the first = key offset flag
    k.norms.end                 d_g·b_g/8 each   K codes, one LSB-first bitstream per group
    after K codes               m/8 (QJL only)   K QJL signs, bit j of the stream = sign(S r)_j ≥ 0
                                                 (m sketch rows: d for every served preset)
    k.end                       2·G              V norms, fp16
    v.norms.end                 d_g·b_g/8 each   V codes, one bitstream per group
    slot_bytes − padding        padding          zero (slot size is a multiple of 2)

Example, ``tq3.5-mse`` at d = 64: K norms [0, 4), K codes hi (4 bit × 32) [4, 20),
K codes lo (3 bit × 32) [20, 32), V norms [32, 36), V codes [36, 52) and [52, 64):
64 bytes per slot against 256 for bf16 K+V (4.0×).

Bitstream rule: code ``j`` of a ``b``-bit stream occupies stream bits
``[j·b, (j+1)·b)``, stream bit ``k`` is bit ``k mod 8`` of byte ``k // 8``.
Every segment is whole bytes because each group has a multiple of 8 channels.
"""

from __future__ import annotations

import sys

import torch

from tq_vllm.codec import Encoded
from tq_vllm.config import Segment, SlotLayout, TensorLayout

if sys.byteorder != "little":  # fp16 norms are reinterpreted in place
    raise ImportError("tq-vllm's packed layout assumes a little-endian machine")

def _weights(device: torch.device) -> torch.Tensor:
    return (1 << torch.arange(8, device=device, dtype=torch.int32))


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """LSB-first bitstream of ``bits``-bit codes: uint8 ``[..., n]`` → uint8 ``[..., n·bits/8]``."""
    n = codes.shape[-1]
    if (n * bits) % 8:
        raise ValueError(f"{n} codes of {bits} bits are not whole bytes")
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    b = (codes.to(torch.int32)[..., None] >> shifts) & 1  # [..., n, bits]
    b = b.reshape(*codes.shape[:-1], n * bits // 8, 8)
    return (b * _weights(codes.device)).sum(-1).to(torch.uint8)


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., n·bits/8]`` → uint8 codes ``[..., n]``."""
    b = (data.to(torch.int32)[..., None] >> torch.arange(8, device=data.device, dtype=torch.int32)) & 1
    b = b.reshape(*data.shape[:-1], n, bits)
    w = 1 << torch.arange(bits, device=data.device, dtype=torch.int32)
    return (b * w).sum(-1).to(torch.uint8)


def _seg(slots: torch.Tensor, s: Segment) -> torch.Tensor:
    return slots[..., s.offset:s.end]


def _pack_tensor(slots: torch.Tensor, lay: TensorLayout, enc: Encoded) -> None:
    _seg(slots, lay.norms).copy_(enc.norms.contiguous().view(torch.uint8))
    start = 0
    for seg, dg, bg in zip(lay.codes, lay.group_dims, lay.group_bits):
        _seg(slots, seg).copy_(pack_bits(enc.codes[..., start:start + dg], bg))
        start += dg
    if lay.signs is not None:
        _seg(slots, lay.signs).copy_(pack_bits(enc.signs.to(torch.uint8), 1))


def _unpack_tensor(slots: torch.Tensor, lay: TensorLayout) -> Encoded:
    norms = _seg(slots, lay.norms).contiguous().view(torch.float16)
    codes = torch.cat([unpack_bits(_seg(slots, seg), bg, dg)
                       for seg, dg, bg in zip(lay.codes, lay.group_dims, lay.group_bits)], -1)
    signs = None
    if lay.signs is not None:
        signs = unpack_bits(_seg(slots, lay.signs), 1, 8 * lay.signs.nbytes).bool()
    return Encoded(codes=codes, norms=norms, signs=signs)


def pack_slots(layout: SlotLayout, key: Encoded, value: Encoded) -> torch.Tensor:
    """Pack encoded K and V ``[N, H, d]`` into slots: uint8 ``[N, H, slot_bytes]``."""
    n, h, _ = key.codes.shape
    slots = torch.zeros(n, h, layout.slot_bytes, dtype=torch.uint8, device=key.codes.device)
    _pack_tensor(slots, layout.key, key)
    _pack_tensor(slots, layout.value, value)
    return slots


def unpack_slots(layout: SlotLayout, slots: torch.Tensor) -> tuple[Encoded, Encoded]:
    """Unpack uint8 slots ``[..., slot_bytes]`` into (key, value) :class:`Encoded`."""
    if slots.dtype != torch.uint8 or slots.shape[-1] != layout.slot_bytes:
        raise ValueError(
            f"expected uint8 slots of {layout.slot_bytes} bytes, got {slots.dtype} "
            f"with last dim {slots.shape[-1]}"
        )
    return _unpack_tensor(slots, layout.key), _unpack_tensor(slots, layout.value)
