"""Triton split-KV decode attention over the packed cache (jit code only).

Launcher: :func:`tq_vllm.kernels.triton_ops.decode`. One program per (sequence,
KV head, split) handles all ``G`` query heads of its KV head together (rows padded
to ``G_PAD``), so every cache block is read once per KV head. Per tile of
``BLOCK_N`` tokens it decodes the key codes to rotated-domain ``[BLOCK_N, D/2]``
half tiles (group norm × per-coordinate centroid; codes unpacked from whole words),
scores them against the rotated queries
(``q_rot = R_h q``, done once by the launcher), adds the QJL bias
``γ · ⟨c·S q_rot, ±1⟩`` straight from the sign bits, runs an online softmax and
accumulates the decoded value tile, all in fp32. Each split writes its partial
``(acc, m, l)``; :func:`tq_reduce_kernel` merges splits by log-sum-exp and the
launcher rotates the result back once.

Slot fields follow :mod:`tq_vllm.layout`; a K/V tensor is described by constexprs:
``NG`` groups of ``D // NG`` channels with ``B0``/``B1`` code bits, byte offsets of
its fp16 norms (``NORM``: group norms then the QJL residual norm), of each group's
LSB-first code stream (``C0``/``C1``) and of the QJL sign bits (``SIGN``).

Keys with the offset choice (``K_OFF``): norms are read as magnitudes; the first key
norm's sign bit flags a key stored with its offset ``o``, whose logit then loses
``⟨q, o⟩`` (one float per query head, ``qo_ptr``, from the launcher).

Trellis codes (``K_TS``/``V_TS`` state bits, 0 for scalar codes; :mod:`tq_vllm.trellis`):
the codebook rows are the groups' decode tables, read at each code's window — the code
and the ``TS`` stream bits before it, cut from a run's word and the word of the run
before it (:func:`unpack_windows`); everything after the lookup is the scalar path.
"""

import triton
import triton.language as tl


@triton.jit
def load_half(ptr, mask):
    """fp16 (little-endian byte pair at ``ptr``) → fp32; masked lanes read 0."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def field_half(base, mask, s_byte, OFF: tl.constexpr, A4: tl.constexpr):
    """The fp16 at byte ``OFF`` (even) of the slots at ``base`` ``[N]`` → fp32 (masked: 0);
    with ``A4`` (see :func:`_words`) cut from the aligned int32 word holding it."""
    if A4:
        w = tl.load(base.to(tl.pointer_type(tl.int32)) + OFF // 4, mask=mask, other=0)
        bits = (w.to(tl.uint32, bitcast=True) >> ((OFF % 4) * 8)) & 0xFFFF
        return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return load_half(base + OFF * s_byte, mask)


@triton.jit
def _words(base, run_mask, s_byte, OFF: tl.constexpr, BITS: tl.constexpr, DH: tl.constexpr,
           A4: tl.constexpr):
    """int32 ``[N, DH/8]``: run ``w`` of 8 ``BITS``-bit codes at byte ``OFF + w·BITS`` of
    the slots at ``base`` ``[N]``, gathered into one word (0 where ``run_mask`` is off).

    With ``A4`` (every slot starts 4-byte aligned, bytes contiguous: the launcher checks)
    a run is cut from the aligned int32 word holding its first byte and, where it
    straddles, the next one: one or two word loads instead of ``BITS`` byte loads. Bits
    above the run's ``8·BITS`` are then the next bytes' (callers mask them off); no word
    outside the slot is read."""
    w8 = tl.arange(0, DH // 8)
    if A4:
        byte = tl.maximum(OFF + w8 * BITS, 0)  # a masked run before the field: any address
        sh = ((byte % 4) * 8).to(tl.uint32)
        two = run_mask & ((byte % 4) + BITS > 4)[None, :]
        p = base.to(tl.pointer_type(tl.int32))[:, None] + (byte // 4)[None, :]
        lo = tl.load(p, mask=run_mask, other=0).to(tl.uint32, bitcast=True)
        hi = tl.load(p + 1, mask=two, other=0).to(tl.uint32, bitcast=True)
        word = (lo >> sh[None, :]) | (hi << ((32 - sh) % 32)[None, :])  # hi = 0 where sh = 0
        return word.to(tl.int32, bitcast=True)
    else:
        k = tl.arange(0, 4)
        byte = OFF + w8[:, None] * BITS + k[None, :]  # [DH/8, 4]
        m = run_mask[:, :, None] & (k < BITS)[None, None, :]
        b = tl.load(base[:, None, None] + (byte * s_byte)[None, :, :], mask=m, other=0).to(tl.int32)
        return tl.sum(b << (8 * k)[None, None, :], axis=2)  # disjoint bytes


@triton.jit
def unpack_codes(base, mask, s_byte, OFF: tl.constexpr, BITS: tl.constexpr,
                 N: tl.constexpr, DH: tl.constexpr, A4: tl.constexpr):
    """``DH`` consecutive ``BITS``-bit LSB-first codes at byte ``OFF`` of the slots at
    byte pointers ``base`` ``[N]``: int32 ``[N, DH]`` (masked tokens give 0).

    8 codes are exactly ``BITS`` bytes: each such run is gathered into one int32 word
    (``BITS`` ≤ 4) and split by shifts, so a code costs a fraction of a byte load and
    no straddle logic (a per-code byte load cost 255 registers and 12.5% occupancy)."""
    runs = mask[:, None] & (tl.arange(0, DH // 8) >= 0)[None, :]
    word = _words(base, runs, s_byte, OFF, BITS, DH, A4)
    codes = (word[:, :, None] >> (BITS * tl.arange(0, 8))[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (N, DH))


@triton.jit
def unpack_windows(base, mask, s_byte, OFF: tl.constexpr, BITS: tl.constexpr, N: tl.constexpr,
                   DH: tl.constexpr, TS: tl.constexpr, FIRST: tl.constexpr, A4: tl.constexpr):
    """Trellis windows int32 ``[N, DH]`` of the ``DH`` ``BITS``-bit codes at byte ``OFF``
    (:func:`tq_vllm.trellis.windows`): code ``k``'s stream bits ``[BITS·k − TS, BITS·k +
    BITS)``, zeros before the group's start (``FIRST``: this half starts its group; else
    its first run continues the half before).

    A run's word above the word of the run before it (``16·BITS`` bits in int64) holds
    every window of the run: one shift and mask per code, as :func:`unpack_codes` splits
    a word (``TS ≤ 8·BITS``: the launcher checks)."""
    w8 = tl.arange(0, DH // 8)
    runs = mask[:, None] & (w8 >= 0)[None, :]
    word = _words(base, runs, s_byte, OFF, BITS, DH, A4)
    if FIRST:
        runs = runs & (w8 > 0)[None, :]
    prev = _words(base, runs, s_byte, OFF - BITS, BITS, DH, A4)
    low = prev.to(tl.int64) & ((1 << (8 * BITS)) - 1)  # int32 → int64 sign-extends 4-byte runs
    ext = (word.to(tl.int64) << (8 * BITS)) | low  # [N, DH/8]
    shift = 8 * BITS - TS + BITS * tl.arange(0, 8)
    win = (ext[:, :, None] >> shift[None, None, :]) & ((1 << (TS + BITS)) - 1)
    return tl.reshape(win.to(tl.int32), (N, DH))


@triton.jit
def unpack_group(base, mask, s_byte, OFF: tl.constexpr, BITS: tl.constexpr, N: tl.constexpr,
                 DH: tl.constexpr, TS: tl.constexpr, FIRST: tl.constexpr, A4: tl.constexpr):
    """What a half reads from its codebook or table row: codes (``TS`` = 0) or trellis
    windows, int32 ``[N, DH]``."""
    if TS:
        out = unpack_windows(base, mask, s_byte, OFF, BITS, N, DH, TS, FIRST, A4)
    else:
        out = unpack_codes(base, mask, s_byte, OFF, BITS, N, DH, A4)
    return out


@triton.jit
def decode_half(base, mask, s_byte, lut_ptr, HALF: tl.constexpr, N: tl.constexpr,
                D: tl.constexpr, NG: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr,
                W: tl.constexpr, NORM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
                TS: tl.constexpr, A4: tl.constexpr):
    """Rotated-domain MSE reconstruction ``[N, D/2]`` of coordinates
    ``[HALF·D/2, (HALF+1)·D/2)`` of the slots at ``base`` ``[N]`` (masked tokens: 0);
    ``lut_ptr``: the group codebooks ``[NG, W]``, or with trellis codes (``TS`` state
    bits, 0: scalar codes) the group decode tables ``[NG, W]`` read at each code's window.
    With two channel groups the halves are the groups; with one, the group's stream
    is cut in the middle (``D/2`` codes of ``B0`` bits are whole bytes)."""
    DH: tl.constexpr = D // 2
    if NG == 2:
        nrm = field_half(base, mask, s_byte, NORM + 2 * HALF, A4)
        if HALF == 0:
            codes = unpack_group(base, mask, s_byte, C0, B0, N, DH, TS, True, A4)
        else:
            codes = unpack_group(base, mask, s_byte, C1, B1, N, DH, TS, True, A4)
    else:
        nrm = field_half(base, mask, s_byte, NORM, A4)
        codes = unpack_group(base, mask, s_byte, C0 + HALF * (DH * B0 // 8), B0, N, DH, TS,
                             HALF == 0, A4)
    row = HALF if NG == 2 else 0  # the codebook (table) of the half's group
    cent = tl.load(lut_ptr + row * W + codes)
    return tl.abs(nrm)[:, None] * cent  # a key norm's sign bit is the offset flag


@triton.jit
def offset_flag(base, mask, s_byte, NORM: tl.constexpr, A4: tl.constexpr):
    """Key offset flags ``[N]`` float32 (1 = stored with its offset): the sign bit of the
    first norm, bit 7 of its high byte (with ``A4``: of the aligned word holding it)."""
    if A4:
        w = tl.load(base.to(tl.pointer_type(tl.int32)) + NORM // 4, mask=mask, other=0)
        flag = (w.to(tl.uint32, bitcast=True) >> ((NORM % 4) * 8 + 15)) & 1
    else:
        flag = (tl.load(base + (NORM + 1) * s_byte, mask=mask, other=0) >> 7) & 1
    return flag.to(tl.float32)


@triton.jit
def qjl_half(base, mask, s_byte, HALF: tl.constexpr, N: tl.constexpr, D: tl.constexpr,
             SIGN: tl.constexpr, A4: tl.constexpr):
    """±1 QJL signs ``[N, D/2]`` float32 of sketch coordinates ``[HALF·D/2, …)``."""
    DH: tl.constexpr = D // 2
    bits = unpack_codes(base, mask, s_byte, SIGN + HALF * (DH // 8), 1, N, DH, A4)
    return bits.to(tl.float32) * 2.0 - 1.0


@triton.jit
def tq_decode_kernel(
    q_ptr, qsk_ptr,  # float32 [B, Hq, D] contiguous: R_h q and qjl_scale · S R_h q
    qo_ptr,  # float32 [B, Hq]: ⟨q, o⟩ (read only with K_OFF)
    cache_ptr, s_blk, s_head, s_tok, s_byte,  # uint8 cache, element strides
    bt_ptr, bt_stride, seq_ptr, block_size, split_tokens,
    lutk_ptr, lutv_ptr, scale,
    acc_ptr, m_ptr, l_ptr,  # float32 [B, Hq, S, D], [B, Hq, S], [B, Hq, S]
    num_q_heads, num_splits,
    D: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    K_NG: tl.constexpr, K_B0: tl.constexpr, K_B1: tl.constexpr, K_W: tl.constexpr,
    K_NORM: tl.constexpr, K_C0: tl.constexpr, K_C1: tl.constexpr, K_SIGN: tl.constexpr,
    K_QJL: tl.constexpr, K_OFF: tl.constexpr, K_TS: tl.constexpr,
    V_NG: tl.constexpr, V_B0: tl.constexpr, V_B1: tl.constexpr, V_W: tl.constexpr,
    V_NORM: tl.constexpr, V_C0: tl.constexpr, V_C1: tl.constexpr, V_TS: tl.constexpr,
    DOT_PREC: tl.constexpr, A4: tl.constexpr,
):
    """Grid ``(B, H, S)``: tokens ``[s·split_tokens, (s+1)·split_tokens)`` of sequence
    ``b``, KV head ``h``, for its ``G`` query heads."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    seq = tl.load(seq_ptr + b).to(tl.int32)
    t0 = sp * split_tokens
    t1 = tl.minimum(seq, t0 + split_tokens)

    g = tl.arange(0, G_PAD)
    gmask = g < G
    DH: tl.constexpr = D // 2
    j = tl.arange(0, DH)  # the head dim is handled as two halves (see decode_half)
    qrow = (b.to(tl.int64) * num_q_heads + h * G + g) * D
    q0 = tl.load(q_ptr + qrow[:, None] + j[None, :], mask=gmask[:, None], other=0.0)
    q1 = tl.load(q_ptr + qrow[:, None] + DH + j[None, :], mask=gmask[:, None], other=0.0)
    if K_QJL:
        qs0 = tl.load(qsk_ptr + qrow[:, None] + j[None, :], mask=gmask[:, None], other=0.0)
        qs1 = tl.load(qsk_ptr + qrow[:, None] + DH + j[None, :], mask=gmask[:, None], other=0.0)
    if K_OFF:
        qo = tl.load(qo_ptr + b.to(tl.int64) * num_q_heads + h * G + g, mask=gmask, other=0.0)

    m = tl.full((G_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((G_PAD,), tl.float32)
    acc0 = tl.zeros((G_PAD, DH), tl.float32)
    acc1 = tl.zeros((G_PAD, DH), tl.float32)
    head_off = h.to(tl.int64) * s_head
    row = bt_ptr + b.to(tl.int64) * bt_stride
    for start in range(t0, t1, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < t1
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
        s = tl.where(valid[None, :], s * scale, float("-inf"))
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

    out = (b.to(tl.int64) * num_q_heads + h * G + g) * num_splits + sp
    tl.store(m_ptr + out, m, mask=gmask)
    tl.store(l_ptr + out, l, mask=gmask)
    tl.store(acc_ptr + out[:, None] * D + j[None, :], acc0, mask=gmask[:, None])
    tl.store(acc_ptr + out[:, None] * D + DH + j[None, :], acc1, mask=gmask[:, None])


@triton.jit
def tq_reduce_kernel(acc_ptr, m_ptr, l_ptr, o_ptr, num_splits, D: tl.constexpr):
    """Grid ``(B·Hq,)``: merge the splits of one query head by log-sum-exp into
    ``o`` float32 ``[B·Hq, D]`` (rotated domain), in split order, one at a time: a
    trailing empty split (``m = -inf``, ``l = 0``, ``acc = 0``) scales by exactly 1 and
    adds exactly 0, so the result does not depend on how many splits the batch's longest
    sequence needed. An empty sequence gives zeros."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, D)
    base = row * num_splits
    m_run = tl.load(m_ptr + base)
    l_run = tl.load(l_ptr + base)
    o = tl.load(acc_ptr + base * D + j)
    for s in range(1, num_splits):
        m_s = tl.load(m_ptr + base + s)
        l_s = tl.load(l_ptr + base + s)
        a_s = tl.load(acc_ptr + (base + s) * D + j)
        m_new = tl.maximum(m_run, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_safe)
        beta = tl.exp(m_s - m_safe)
        l_run = l_run * alpha + l_s * beta
        o = o * alpha + a_s * beta
        m_run = m_new
    o = tl.where(l_run > 0, o / tl.where(l_run > 0, l_run, 1.0), 0.0)
    tl.store(o_ptr + row * D + j, o)
