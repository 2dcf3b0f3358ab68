"""Batched PyTorch attention over the packed cache (CPU fallback path).

Unlike :mod:`tq_vllm.reference` (one sequence at a time, the test oracle), decode
here handles the whole batch in a few tensor ops: every sequence's blocks are
gathered at once, padded to the longest sequence and masked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tq_vllm.codec import LayerCodec
from tq_vllm.layout import unpack_slots


def gather_sequences(kv_cache: torch.Tensor, block_table: torch.Tensor, max_len: int) -> torch.Tensor:
    """Slots of positions ``0..max_len-1`` of each sequence: uint8 ``[B, H, S_pad, C]``."""
    nb = math.ceil(max_len / kv_cache.shape[2])
    slots = kv_cache[block_table[:, :nb].long()]  # [B, nb, H, bs, C]
    b, _, h, bs, c = slots.shape
    return slots.permute(0, 2, 1, 3, 4).reshape(b, h, nb * bs, c)


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, codec: LayerCodec, scale: float,
                     out: torch.Tensor) -> None:
    """One query token per sequence. q ``[B, Hq, d]``, writes out ``[B, Hq, d]``."""
    b, hq, d = q.shape
    h = kv_cache.shape[1]
    g = hq // h
    smax = int(seq_lens.max())
    lay = codec.preset.layout(d)
    k_enc, v_enc = unpack_slots(lay, gather_sequences(kv_cache, block_table, smax))
    q_rot = torch.einsum("bhgd,hed->bhge", q.float().view(b, h, g, d), codec.key.rot)
    k_rot = codec.key.decode_rotated(k_enc)  # [B, H, S, d]
    logits = torch.einsum("bhge,bhse->bhgs", q_rot, k_rot) * scale
    pos = torch.arange(k_rot.shape[2], device=q.device)
    logits.masked_fill_((pos[None, :] >= seq_lens[:, None].to(pos.device))[:, None, None], float("-inf"))
    o_rot = torch.einsum("bhgs,bhse->bhge", torch.softmax(logits, -1), codec.value.decode_rotated(v_enc))
    out.copy_(torch.einsum("bhge,hed->bhgd", o_rot, codec.value.rot).reshape(b, hq, d))


def dequantize_sequence(kv_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int,
                        codec: LayerCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded K, V ``[H, seq_len, d]`` float32 of one sequence."""
    lay = codec.preset.layout(codec.key.head_dim)
    k_enc, v_enc = unpack_slots(lay, gather_sequences(kv_cache, block_row[None], seq_len)[0, :, :seq_len])
    k = torch.einsum("hse,hed->hsd", codec.key.decode_rotated(k_enc), codec.key.rot)
    v = torch.einsum("hse,hed->hsd", codec.value.decode_rotated(v_enc), codec.value.rot)
    return k, v


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                      block_table: torch.Tensor, seq_lens_cpu: torch.Tensor,
                      query_start_loc_cpu: torch.Tensor, first: int, codec: LayerCodec,
                      scale: float, out: torch.Tensor, fresh_exact: bool) -> None:
    """Causal attention for sequences ``first..B-1`` (query chunks of any length).

    q ``[T, Hq, d]``, k/v ``[T, H, d]`` (this step's fresh tokens), out ``[T, Hq, d]``.
    A chunk with no cached context attends to the fresh exact K/V when ``fresh_exact``;
    otherwise (and whenever there is context) to the decoded packed cache.
    """
    qsl, sl = query_start_loc_cpu.tolist(), seq_lens_cpu.tolist()
    for i in range(first, len(sl)):
        q0, q1, s = qsl[i], qsl[i + 1], int(sl[i])
        n = q1 - q0
        if n == 0:
            continue
        qq = q[q0:q1].float().transpose(0, 1)[None]  # [1, Hq, L, d]
        if s == n and fresh_exact:
            kk, vv = k[q0:q1].float().transpose(0, 1), v[q0:q1].float().transpose(0, 1)
            o = F.scaled_dot_product_attention(qq, kk[None], vv[None], is_causal=True,
                                               scale=scale, enable_gqa=True)
        else:
            kk, vv = dequantize_sequence(kv_cache, block_table[i], s, codec)
            mask = torch.arange(s)[None, :] <= torch.arange(s - n, s)[:, None]
            o = F.scaled_dot_product_attention(qq, kk[None], vv[None], attn_mask=mask.to(q.device),
                                               scale=scale, enable_gqa=True)
        out[q0:q1] = o[0].transpose(0, 1).to(out.dtype)
