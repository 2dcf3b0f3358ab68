"""Triton chunked-prefill attention over the packed cache (jit code only).

Launcher: :func:`tq_vllm.kernels.triton_ops.prefill`. A query chunk of ``n`` tokens
of a sequence of ``s`` tokens (its own K/V already stored) attends causally to cache
positions ``0..s-n+i``. One program per (work item, KV head): a work item is a tile
of ``BLOCK_M`` consecutive query tokens of one sequence, and the program holds all
``G`` query heads of its KV head for them as ``BLOCK_M × G_PAD`` rows, so each
decoded K/V tile serves every query row of the KV head. KV tiles stop at the tile's
last causal position. Scores come from the codes as in decode (rotated queries,
QJL bias from the sign bits); fp32 online softmax; output in the rotated domain.
"""

import triton
import triton.language as tl

from tq_vllm.kernels.triton_decode import decode_half, field_half, offset_flag, qjl_half


@triton.jit
def tq_prefill_kernel(
    q_ptr, qsk_ptr,  # float32 [T, Hq, D] contiguous: R_h q and qjl_scale · S R_h q
    qo_ptr,  # float32 [T, Hq]: ⟨q, o⟩ (read only with K_OFF)
    o_ptr,  # float32 [T, Hq, D]: rotated-domain output (only the work items' rows written)
    work_ptr,  # int32 [W, 5]: (sequence, first query token of the tile, q_start, q_end, seq_len)
    cache_ptr, s_blk, s_head, s_tok, s_byte,
    bt_ptr, bt_stride, block_size,
    lutk_ptr, lutv_ptr, scale, num_q_heads,
    D: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_NG: tl.constexpr, K_B0: tl.constexpr, K_B1: tl.constexpr, K_W: tl.constexpr,
    K_NORM: tl.constexpr, K_C0: tl.constexpr, K_C1: tl.constexpr, K_SIGN: tl.constexpr,
    K_QJL: tl.constexpr, K_OFF: tl.constexpr, K_TS: tl.constexpr,
    V_NG: tl.constexpr, V_B0: tl.constexpr, V_B1: tl.constexpr, V_W: tl.constexpr,
    V_NORM: tl.constexpr, V_C0: tl.constexpr, V_C1: tl.constexpr, V_TS: tl.constexpr,
    DOT_PREC: tl.constexpr, A4: tl.constexpr,
):
    """Grid ``(W, H)``."""
    wi = tl.program_id(0)
    h = tl.program_id(1)
    seq_idx = tl.load(work_ptr + wi * 5)
    tile0 = tl.load(work_ptr + wi * 5 + 1)
    q_end = tl.load(work_ptr + wi * 5 + 3)
    seq_len = tl.load(work_ptr + wi * 5 + 4)

    r = tl.arange(0, BLOCK_M * G_PAD)
    tok = tile0 + r // G_PAD
    g = r % G_PAD
    rmask = (tok < q_end) & (g < G)
    qpos = seq_len - q_end + tok  # cache position of each row's query token
    DH: tl.constexpr = D // 2
    j = tl.arange(0, DH)  # the head dim is handled as two halves (see decode_half)
    qrow = (tok.to(tl.int64) * num_q_heads + h * G + g) * D
    q0 = tl.load(q_ptr + qrow[:, None] + j[None, :], mask=rmask[:, None], other=0.0)
    q1 = tl.load(q_ptr + qrow[:, None] + DH + j[None, :], mask=rmask[:, None], other=0.0)
    if K_QJL:
        qs0 = tl.load(qsk_ptr + qrow[:, None] + j[None, :], mask=rmask[:, None], other=0.0)
        qs1 = tl.load(qsk_ptr + qrow[:, None] + DH + j[None, :], mask=rmask[:, None], other=0.0)
    if K_OFF:
        qo = tl.load(qo_ptr + tok.to(tl.int64) * num_q_heads + h * G + g, mask=rmask, other=0.0)

    kv_end = seq_len - q_end + tl.minimum(tile0 + BLOCK_M, q_end)
    m = tl.full((BLOCK_M * G_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M * G_PAD,), tl.float32)
    acc0 = tl.zeros((BLOCK_M * G_PAD, DH), tl.float32)
    acc1 = tl.zeros((BLOCK_M * G_PAD, DH), tl.float32)
    head_off = h.to(tl.int64) * s_head
    row = bt_ptr + seq_idx.to(tl.int64) * bt_stride
    for start in range(0, kv_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < kv_end
        blk = tl.load(row + pos // block_size, mask=valid, other=0).to(tl.int64)
        base = cache_ptr + blk * s_blk + head_off + (pos % block_size).to(tl.int64) * s_tok
        k0 = decode_half(base, valid, s_byte, lutk_ptr, 0, BLOCK_N, D, K_NG, K_B0, K_B1, K_W,
                         K_NORM, K_C0, K_C1, K_TS, A4)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        k1 = decode_half(base, valid, s_byte, lutk_ptr, 1, BLOCK_N, D, K_NG, K_B0, K_B1, K_W,
                         K_NORM, K_C0, K_C1, K_TS, A4)
        s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        if K_QJL:
            pm0 = qjl_half(base, valid, s_byte, 0, BLOCK_N, D, K_SIGN, A4)
            sq = tl.dot(qs0, tl.trans(pm0), input_precision=DOT_PREC)
            pm1 = qjl_half(base, valid, s_byte, 1, BLOCK_N, D, K_SIGN, A4)
            sq += tl.dot(qs1, tl.trans(pm1), input_precision=DOT_PREC)
            s += sq * field_half(base, valid, s_byte, K_NORM + 2 * K_NG, A4)[None, :]
        if K_OFF:
            s -= qo[:, None] * offset_flag(base, valid, s_byte, K_NORM, A4)[None, :]
        causal = valid[None, :] & (pos[None, :] <= qpos[:, None])
        s = tl.where(causal, s * scale, float("-inf"))
        # every row sees position 0 in the first tile, so m is finite from then on
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v0 = decode_half(base, valid, s_byte, lutv_ptr, 0, BLOCK_N, D, V_NG, V_B0, V_B1, V_W,
                         V_NORM, V_C0, V_C1, V_TS, A4)
        acc0 = acc0 * alpha[:, None] + tl.dot(p, v0, input_precision=DOT_PREC)
        v1 = decode_half(base, valid, s_byte, lutv_ptr, 1, BLOCK_N, D, V_NG, V_B0, V_B1, V_W,
                         V_NORM, V_C0, V_C1, V_TS, A4)
        acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=DOT_PREC)
        m = m_new

    tl.store(o_ptr + qrow[:, None] + j[None, :], acc0 / l[:, None], mask=rmask[:, None])
    tl.store(o_ptr + qrow[:, None] + DH + j[None, :], acc1 / l[:, None], mask=rmask[:, None])
