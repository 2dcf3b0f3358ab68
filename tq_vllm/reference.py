"""Reference paged store and attention over the packed cache (pure PyTorch).

This is the oracle every kernel is tested against; it is never on a hot path.

Shapes (vLLM conventions)::

    kv_cache       uint8 [num_blocks, num_kv_heads, block_size, slot_bytes]
    slot_mapping   long  [T]           cache slot of each new token, -1 = padding
    block_table    int   [B, max_blocks_per_seq]
    seq_lens       int   [B]           tokens in the cache per sequence, new ones included
    query_start_loc int  [B + 1]       cumulative query lengths

    seq:  |<------------- seq_len ------------->|
          |<-- context (cached) -->|<-- query -->|

A query token at position ``p`` attends to cache positions ``0..p`` (causal).
Decode is the case query length 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tq_vllm.codec import LayerCodec
from tq_vllm.layout import pack_slots, unpack_slots


def check_cache(kv_cache: torch.Tensor, codec: LayerCodec) -> None:
    """Raise unless ``kv_cache`` is a uint8 ``[B, H, N, slot_bytes]`` cache for ``codec``."""
    slot_bytes = codec.preset.layout(codec.key.head_dim).slot_bytes
    h = codec.key.rot.shape[0]
    if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 4:
        raise ValueError(f"kv_cache must be uint8 [blocks, heads, block_size, slot], got "
                         f"{kv_cache.dtype} {tuple(kv_cache.shape)}")
    if kv_cache.shape[1] != h or kv_cache.shape[3] != slot_bytes:
        raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)} does not match "
                         f"{h} KV heads × {slot_bytes}-byte slots of {codec.preset.name}")


def tq_store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor, codec: LayerCodec) -> None:
    """Quantize ``key``/``value`` ``[T, H, d]`` and write them at ``slot_mapping`` ``[T]``.

    Slots ``-1`` are skipped. Out-of-range slots raise before anything is written.
    """
    check_cache(kv_cache, codec)
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key and value must both be [T, H, d], got {tuple(key.shape)} "
                         f"and {tuple(value.shape)}")
    if slot_mapping.shape != key.shape[:1]:
        raise ValueError(f"slot_mapping must be [{key.shape[0]}], got {tuple(slot_mapping.shape)}")
    num_blocks, _, block_size, _ = kv_cache.shape
    sm = slot_mapping.long()
    valid = sm >= 0
    if bool((sm[valid] >= num_blocks * block_size).any()):
        raise IndexError(f"slot_mapping has slots beyond the cache's {num_blocks * block_size}")
    sm = sm[valid]
    if sm.numel() == 0:
        return
    lay = codec.preset.layout(codec.key.head_dim)
    slots = pack_slots(lay, codec.key.encode(key[valid]), codec.value.encode(value[valid]))
    blk, off = sm // block_size, sm % block_size
    heads = torch.arange(kv_cache.shape[1], device=kv_cache.device)
    kv_cache[blk[:, None], heads[None, :], off[:, None]] = slots


def gather_slots(kv_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Slots of positions ``0..seq_len-1`` of one sequence: uint8 ``[seq_len, H, slot_bytes]``."""
    block_size = kv_cache.shape[2]
    pos = torch.arange(seq_len, device=kv_cache.device)
    blk = block_row.long()[pos // block_size]
    return kv_cache[blk, :, pos % block_size].reshape(seq_len, kv_cache.shape[1], -1)


def _head_map(num_q_heads: int, num_kv_heads: int, device) -> torch.Tensor:
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    return torch.arange(num_q_heads, device=device) // (num_q_heads // num_kv_heads)


def _causal_mask(q_len: int, seq_len: int, device) -> torch.Tensor:
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)
    return torch.arange(seq_len, device=device)[None, :] <= q_pos[:, None]  # [L, S]


def tq_paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                       codec: LayerCodec, scale: float | None = None) -> torch.Tensor:
    """Causal attention of ``query`` ``[T, Hq, d]`` over the packed cache.

    Scores come from the codes (query rotated once, MSE part in the rotated domain,
    QJL bias from the sign bits); values are decoded in the rotated domain and the
    weighted sum is rotated back once. Returns float32 ``[T, Hq, d]``.
    """
    check_cache(kv_cache, codec)
    t, hq, d = query.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lay = codec.preset.layout(d)
    head_of = _head_map(hq, kv_cache.shape[1], query.device)
    out = torch.zeros(t, hq, d, dtype=torch.float32, device=query.device)
    qsl, sl = query_start_loc.tolist(), seq_lens.tolist()
    for b in range(len(sl)):
        q0, q1, s = qsl[b], qsl[b + 1], int(sl[b])
        if q1 == q0:
            continue
        if q1 - q0 > s:
            raise ValueError(f"sequence {b}: query length {q1 - q0} exceeds seq_len {s}")
        k_enc, v_enc = unpack_slots(lay, gather_slots(kv_cache, block_table[b], s))
        q_rot = codec.key.rotate(query[q0:q1].float(), head_of)  # [L, Hq, d]
        logits = codec.key.scores(q_rot, k_enc, head_of) * scale  # [L, Hq, S]
        logits = logits.masked_fill(~_causal_mask(q1 - q0, s, query.device)[:, None], float("-inf"))
        p = torch.softmax(logits, dim=-1)
        v_rot = codec.value.decode_rotated(v_enc)[:, head_of]  # [S, Hq, d]
        out[q0:q1] = codec.value.unrotate(torch.einsum("lht,thd->lhd", p, v_rot), head_of)
    return out


def dequantize_sequence(kv_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int,
                        codec: LayerCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded (key, value) ``[seq_len, H, d]`` float32 of one sequence."""
    lay = codec.preset.layout(codec.key.head_dim)
    k_enc, v_enc = unpack_slots(lay, gather_slots(kv_cache, block_row, seq_len))
    return codec.key.decode(k_enc), codec.value.decode(v_enc)


def fresh_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Causal attention of a prompt chunk with no cached context over its own fresh K/V
    (``fast-prefill``): ``query`` ``[L, Hq, d]``, ``key``/``value`` ``[L, H, d]`` →
    ``[L, Hq, d]``, by torch's SDPA in the inputs' dtype when they share one (a bf16 model's:
    vLLM's own attention also runs in bf16; on the 2-core Xeon host bf16 SDPA took 40 ms
    per layer of a 4k prompt against 113 ms in float32, its outputs within the bf16
    rounding of the float32 ones), else in float32."""
    dt = query.dtype if query.dtype == key.dtype == value.dtype else torch.float32
    o = F.scaled_dot_product_attention(*(x.to(dt).transpose(0, 1)[None] for x in (query, key, value)),
                                       is_causal=True, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def exact_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    scale: float | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Causal attention of ``query`` ``[L, Hq, d]`` over ``key``/``value`` ``[S, H, d]``
    (the last ``L`` positions are the queries'), computed in ``dtype`` (inputs, products,
    softmax, output; float32 by default). Returns ``[L, Hq, d]`` in ``dtype``."""
    lq, hq, d = query.shape
    s = key.shape[0]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    head_of = _head_map(hq, key.shape[1], query.device)
    k, v = key.to(dtype)[:, head_of], value.to(dtype)[:, head_of]
    logits = torch.einsum("lhd,thd->lht", query.to(dtype), k) * scale
    logits = logits.masked_fill(~_causal_mask(lq, s, query.device)[:, None], float("-inf"))
    return torch.einsum("lht,thd->lhd", torch.softmax(logits, -1), v)
