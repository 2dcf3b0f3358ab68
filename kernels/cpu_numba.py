"""Numba CPU kernels over the packed cache (jit code only; launchers in ``cpu_ops``).

The cache is passed as a flat uint8 array plus element strides of vLLM's
``[num_blocks, H, block_size, slot]`` view, so any strided view works. Slot
fields are read with the byte map of :mod:`tq_vllm.layout`, described to the
kernels by small int arrays (``TensorDesc`` in ``cpu_ops``)::

    desc[0] = norm byte offset        desc[1] = number of groups G
    desc[2] = QJL sign byte offset (-1: none)
    desc[3 + 3g : 6 + 3g] = (code byte offset, bits, channels) of group g
    desc[3 + 3G] = trellis state bits S (0: scalar codes)
    desc[4 + 3G] = row stride of the trellis tables (0: scalar codes)

Centroids come as ``lut``: per rotated coordinate ``[d, W]`` for scalar codes; for
trellis codes (``tq_vllm.trellis``) the decode tables ``[G, stride]``, coordinate ``k`` of
group ``g`` reading ``lut[g, (code_k << S) | state]`` where the state is the ``S`` stream
bits before the code (zero at the group's start). Their codes are searched before the
store (:func:`trellis_encode_kernel`, or the native kernel: the reference's Viterbi search
with its float32 arithmetic) and handed to :func:`store_kernel`.

Keys with feedback rounding (``tq_vllm.codec``, the ``tq{b}`` presets) are rounded in the
store one coordinate at a time, each error fed into the later coordinates through the
head's ``[d, d]`` matrix ``F`` (``O(d²)`` per key instead of ``O(d)``); decode reads the
codes as any others.

Keys with the offset choice (``tq_vllm.codec``): the first norm's sign bit (bit 7 of
byte ``desc[0] + 1``) flags a key stored with its offset; norms are read as magnitudes
and a flagged key's logit gets ``⟨q, o⟩`` (per query head, from the launcher) taken off.

Decode works token by token inside one (sequence, KV head, split) task: the
token's key is decoded once into a ``d``-float register tile (rotated domain,
norms applied), scored against all ``G`` query heads of the KV head (so each
block is read once per KV head, not once per query head), the QJL bias is added
from the sign bits, and the value tile updates an online softmax. Nothing
dequantized is ever written to memory.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

@njit(inline="always", cache=True)
def _half(lo, hi):
    """IEEE fp16 (two little-endian bytes) → float."""
    u = np.int32(lo) | (np.int32(hi) << 8)
    e = (u >> 10) & 0x1F
    f = u & 0x3FF
    if e == 0:
        v = math.ldexp(np.float64(f), -24)
    elif e == 31:
        v = np.inf if f == 0 else np.nan
    else:
        v = math.ldexp(np.float64(f | 0x400), e - 25)
    return -v if (u >> 15) & 1 else v


@njit(inline="always", cache=True)
def _code_at(cache, off, k, bits):
    """Code ``k`` of a ``bits``-bit LSB-first stream starting at byte ``off``."""
    bp = k * bits
    byte = off + (bp >> 3)
    sh = bp & 7
    w = np.int32(cache[byte]) >> sh
    if sh + bits > 8:
        w |= np.int32(cache[byte + 1]) << (8 - sh)
    return w & ((1 << bits) - 1)


@njit(inline="always", cache=True)
def _decode_tensor(cache, base, desc, lut, out):
    """Rotated-domain MSE reconstruction of one K or V slot into ``out`` [d]."""
    ngroups = desc[1]
    state_bits = desc[3 + 3 * ngroups]
    j0 = 0
    for g in range(ngroups):
        nb = base + desc[0] + 2 * g
        norm = abs(_half(cache[nb], cache[nb + 1]))  # sign bit: the key offset flag
        off = base + desc[3 + 3 * g]
        bits = desc[4 + 3 * g]
        dim = desc[5 + 3 * g]
        if state_bits > 0:
            state = 0
            for k in range(dim):
                w = (_code_at(cache, off, k, bits) << state_bits) | state
                out[j0 + k] = norm * lut[g, w]
                state = w >> bits
        else:
            for k in range(dim):
                out[j0 + k] = norm * lut[j0 + k, _code_at(cache, off, k, bits)]
        j0 += dim


@njit(inline="always", cache=True)
def _sign_dot(cache, off, q, d):
    """``Σ_j q[j]·(±1)`` for the QJL sign bits starting at byte ``off``."""
    s = 0.0
    for j in range(d):
        bit = (cache[off + (j >> 3)] >> (j & 7)) & 1
        s += q[j] if bit else -q[j]
    return s


@njit(parallel=True, fastmath=True, cache=True)
def decode_kernel(cache, s_blk, s_head, s_tok, block_table, seq_lens, q_rot, q_sk, q_off,
                  has_off, scale, kdesc, lut_k, qjl_scale, vdesc, lut_v, num_kv_heads, block_size,
                  n_splits, split_tokens, acc_out, m_out, l_out):
    """Split-KV decode, all query heads of a KV head together.

    q_rot, q_sk: float32 [B, Hq, d] (rotated / sketched-rotated queries).
    q_off: float32 [B, Hq] ``⟨q, o⟩``, taken off flagged keys' logits when ``has_off``.
    acc_out: float32 [B, Hq, n_splits, d]; m_out, l_out: float32 [B, Hq, n_splits].
    """
    nseq, hq, d = q_rot.shape
    g_per = hq // num_kv_heads
    has_qjl = kdesc[2] >= 0
    for task in prange(nseq * num_kv_heads * n_splits):
        b = task // (num_kv_heads * n_splits)
        rem = task % (num_kv_heads * n_splits)
        h = rem // n_splits
        sp = rem % n_splits
        seq = seq_lens[b]
        t0 = sp * split_tokens  # fixed runs: a sequence's splits do not depend on the batch
        t1 = min(seq, t0 + split_tokens)
        m = np.full(g_per, -np.inf, dtype=np.float32)
        l = np.zeros(g_per, dtype=np.float32)
        acc = np.zeros((g_per, d), dtype=np.float32)
        kt = np.empty(d, dtype=np.float32)
        vt = np.empty(d, dtype=np.float32)
        s = np.empty(g_per, dtype=np.float32)
        for t in range(t0, t1):
            base = block_table[b, t // block_size] * s_blk + h * s_head + (t % block_size) * s_tok
            _decode_tensor(cache, base, kdesc, lut_k, kt)
            if has_qjl:
                gb = base + kdesc[0] + 2 * (kdesc[1])
                gamma = _half(cache[gb], cache[gb + 1]) * qjl_scale
            flagged = has_off and (cache[base + kdesc[0] + 1] & 0x80) != 0
            for g in range(g_per):
                qh = h * g_per + g
                acc_s = 0.0
                for j in range(d):
                    acc_s += q_rot[b, qh, j] * kt[j]
                if has_qjl:
                    acc_s += gamma * _sign_dot(cache, base + kdesc[2], q_sk[b, qh], d)
                if flagged:
                    acc_s -= q_off[b, qh]
                s[g] = acc_s * scale
            _decode_tensor(cache, base, vdesc, lut_v, vt)
            for g in range(g_per):
                m_new = max(m[g], s[g])
                corr = math.exp(m[g] - m_new)
                p = math.exp(s[g] - m_new)
                l[g] = l[g] * corr + p
                for j in range(d):
                    acc[g, j] = acc[g, j] * corr + p * vt[j]
                m[g] = m_new
        for g in range(g_per):
            qh = h * g_per + g
            m_out[b, qh, sp] = m[g]
            l_out[b, qh, sp] = l[g]
            for j in range(d):
                acc_out[b, qh, sp, j] = acc[g, j]


@njit(inline="always", cache=True)
def _half_bits(v):
    """float32 value ``v`` in [0, 65504] → IEEE fp16 bits, round half to even
    (what ``tensor.to(torch.float16)`` does)."""
    x = np.float64(v)
    if x < 6.103515625e-05:  # below 2**-14: subnormal, steps of 2**-24
        return np.int64(np.rint(x * 16777216.0))
    m, e2 = math.frexp(x)  # x = m · 2**e2, m in [0.5, 1)
    e = e2 - 1
    q = np.int64(np.rint(math.ldexp(x, 10 - e)))  # in [1024, 2048]
    if q == 2048:
        q = 1024
        e += 1
    return np.int64(((e + 15) << 10) | (q - 1024))


@njit(inline="always", cache=True)
def _put_half(cache, off, v):
    b = _half_bits(v)
    cache[off] = b & 0xFF
    cache[off + 1] = (b >> 8) & 0xFF


@njit(inline="always", cache=True)
def _first_least(cost):
    """Index of the first least entry of ``cost`` (0 if all are inf): a search's final state."""
    state = 0
    best = np.float32(np.inf)
    for p in range(cost.shape[0]):
        if cost[p] < best:
            best = cost[p]
            state = p
    return state


@njit(inline="always", cache=True)
def _viterbi(u, table, bits, state_bits, cost, nxt, back, path):
    """Trellis codes of one row ``u`` [n] of unit-scale coordinates into ``path`` [n]: the
    reference's search (``tq_vllm.trellis.encode``) with its float32 arithmetic, branch
    order and ties. Scratch: ``cost``, ``nxt`` float32 ``[2**S]``, ``back`` uint8
    ``[n, 2**S]``."""
    dim = u.shape[0]
    nc = 1 << bits
    nh = 1 << (state_bits - bits)
    n_states = 1 << state_bits
    for p in range(n_states):
        cost[p] = np.float32(np.inf)
    cost[0] = np.float32(0.0)
    for i in range(dim):
        x = u[i]
        for c in range(nc):
            for hi in range(nh):
                best = np.float32(np.inf)
                arg = 0
                w0 = (c << state_bits) | (hi << bits)
                p0 = hi << bits
                for t in range(nc):
                    e = x - table[w0 | t]
                    tot = cost[p0 | t] + e * e
                    if tot < best:
                        best = tot
                        arg = t
                nxt[(c << (state_bits - bits)) | hi] = best
                back[i, (c << (state_bits - bits)) | hi] = arg
        for p in range(n_states):
            cost[p] = nxt[p]
    state = _first_least(cost)
    for i in range(dim - 1, -1, -1):
        path[i] = state >> (state_bits - bits)
        state = ((state & (nh - 1)) << bits) | back[i, state]


@njit(parallel=True, cache=True)
def trellis_encode_kernel(u, table, bits, state_bits, codes):
    """Trellis codes ``codes`` uint8 [R, n] of unit-scale rows ``u`` float32 [R, n] (one
    channel group each) for the decode table ``table`` float32 [2**(S + bits)]."""
    rows, dim = u.shape
    n_states = 1 << state_bits
    for r in prange(rows):
        cost = np.empty(n_states, dtype=np.float32)
        nxt = np.empty(n_states, dtype=np.float32)
        back = np.empty((dim, n_states), dtype=np.uint8)
        _viterbi(u[r], table, bits, state_bits, cost, nxt, back, codes[r])


@njit(parallel=True, cache=True)
def trellis_encode_fed_kernel(y, norms, head, fb, wt, tables, bits, state_bits, codes):
    """Trellis codes ``codes`` uint8 [R, d] of rotated rows ``y`` float32 [R, d] searched
    against a query weight: ``tq_vllm.trellis.encode_fed``'s codes with its float32
    arithmetic, branch order and ties (the native kernel's fallback). ``norms`` [R, G],
    ``head`` int64 [R] into ``fb`` [H, d, d] and ``wt`` [H, d], ``tables`` [G, stride],
    ``bits`` int64 [G]."""
    rows, d = y.shape
    groups = bits.shape[0]
    dg = d // groups
    ns = 1 << state_bits
    for r in prange(rows):
        cost = np.empty(ns, dtype=np.float32)
        nxt = np.empty(ns, dtype=np.float32)
        fbs = np.zeros((2, ns, d), dtype=np.float32)  # survivors' rows, by step parity
        carried = np.zeros(d, dtype=np.float32)
        back = np.empty((dg, ns), dtype=np.uint8)
        h = head[r]
        for g in range(groups):
            R = bits[g]
            nc = 1 << R
            nh = 1 << (state_bits - R)
            a0 = g * dg
            n = norms[r, g]
            for p in range(ns):
                cost[p] = np.float32(np.inf)
                for j in range(a0, d):
                    fbs[0, p, j] = carried[j]
            cost[0] = np.float32(0.0)
            for k in range(dg):
                i = a0 + k
                cur = fbs[k % 2]
                new = fbs[(k + 1) % 2]
                wi = wt[h, i]
                yi = y[r, i]
                for c in range(nc):
                    for hi in range(nh):
                        best = np.float32(np.inf)
                        arg = 0
                        ba = np.float32(0.0)
                        for t in range(nc):
                            p = (hi << R) | t
                            tg = yi - cur[p, i]
                            e = tg - n * tables[g, (c << state_bits) | p]
                            tot = cost[p] + (wi * e) * e
                            if tot < best:
                                best = tot
                                arg = t
                                ba = e
                        q = (c << (state_bits - R)) | hi
                        nxt[q] = best
                        back[k, q] = arg
                        src = (hi << R) | arg
                        for j in range(i + 1, d):
                            new[q, j] = cur[src, j] + ba * fb[h, i, j]
                for p in range(ns):
                    cost[p] = nxt[p]
            state = _first_least(cost)
            last = fbs[dg % 2]
            for j in range(d):
                carried[j] = last[state, j] if j >= a0 + dg else np.float32(0.0)
            for k in range(dg - 1, -1, -1):
                codes[r, a0 + k] = state >> (state_bits - R)
                state = ((state & (nh - 1)) << R) | back[k, state]


@njit(inline="always", cache=True)
def _encode_tensor(y, slot, cache, desc, bounds, lut, norm_correction, sketch, work, resid,
                   tcodes, t, hh, fb, use_fb, fed):
    """Quantize one rotated vector ``y`` [d] into the (zeroed) slot at byte ``slot``.

    Returns (norms saturated to the fp16 maximum, float32 residual norm ``‖y − ŷ‖`` —
    computed for QJL or when ``resid`` — else 0). ``work`` is a [d] float32 scratch row
    (the reconstruction, then the residual); ``tcodes[t, hh]`` [d] the vector's trellis
    codes, searched beforehand (:func:`trellis_encode_kernel`; not read for scalar codes).
    With ``use_fb`` scalar codes round with feedback (``tq_vllm.codec``): coordinate ``j``
    is rounded from ``fed[j]`` (``y`` plus the earlier coordinates' errors times
    ``fb[hh, i, j]``, float32, product then difference); ``fed`` is a [d] scratch row."""
    want_r = resid or desc[2] >= 0
    d = y.shape[0]
    ngroups = desc[1]
    state_bits = desc[3 + 3 * ngroups]
    saturated = 0
    if use_fb:
        for j in range(d):
            fed[j] = y[j]
    j0 = 0
    for g in range(ngroups):
        dim = desc[5 + 3 * g]
        bits = desc[4 + 3 * g]
        seg = slot + desc[3 + 3 * g]
        ss = 0.0
        for k in range(dim):
            ss += np.float64(y[j0 + k]) * np.float64(y[j0 + k])
        n = np.float32(math.sqrt(ss))
        inv = n if n > np.float32(1e-30) else np.float32(1e-30)
        cn = 0.0
        state = 0
        for k in range(dim):
            if state_bits > 0:
                code = np.int64(tcodes[t, hh, j0 + k])
                w = (code << state_bits) | state
                c = lut[g, w]
                state = w >> bits
            else:
                u = (fed[j0 + k] if use_fb else y[j0 + k]) / inv
                code = 0
                for i in range(bounds.shape[1]):
                    if bounds[g, i] < u:
                        code += 1
                c = lut[j0 + k, code]
                if use_fb:
                    err = fed[j0 + k] - c * inv
                    row = fb[hh, j0 + k]
                    for jj in range(j0 + k + 1, d):
                        fed[jj] = fed[jj] - err * row[jj]
            bp = k * bits
            cache[seg + (bp >> 3)] |= (code << (bp & 7)) & 0xFF
            if (bp & 7) + bits > 8:
                cache[seg + (bp >> 3) + 1] |= code >> (8 - (bp & 7))
            work[j0 + k] = c
            cn += np.float64(c) * np.float64(c)
        if norm_correction:
            c_norm = np.float32(math.sqrt(cn))
            if c_norm > np.float32(0.0):
                n = n / (c_norm if c_norm > np.float32(1e-30) else np.float32(1e-30))
        if n > np.float32(65504.0):
            n = np.float32(65504.0)
            saturated += 1
        _put_half(cache, slot + desc[0] + 2 * g, n)
        if want_r:  # reconstruction with the stored (fp16) norm, for the residual
            nh = _half(cache[slot + desc[0] + 2 * g], cache[slot + desc[0] + 2 * g + 1])
            for k in range(dim):
                work[j0 + k] = np.float32(nh) * work[j0 + k]
        j0 += dim
    gamma = np.float32(0.0)
    if want_r:
        rr = 0.0
        for j in range(d):
            work[j] = y[j] - work[j]
            rr += np.float64(work[j]) * np.float64(work[j])
        gamma = np.float32(math.sqrt(rr))
    if desc[2] >= 0:
        for i in range(d):
            acc = 0.0
            for j in range(d):
                acc += sketch[i, j] * np.float64(work[j])
            if acc >= 0.0:
                cache[slot + desc[2] + (i >> 3)] |= 1 << (i & 7)
        g16 = gamma
        if g16 > np.float32(65504.0):
            g16 = np.float32(65504.0)
            saturated += 1
        _put_half(cache, slot + desc[0] + 2 * ngroups, g16)
    return saturated, gamma


@njit(parallel=True, cache=True)
def store_kernel(yk, yk_alt, has_off, k_bytes, yv, slots, cache, s_blk, s_head, s_tok,
                 block_size, slot_bytes, kdesc, k_bounds, k_lut, k_nc, sketch, vdesc, v_bounds,
                 v_lut, v_nc, k_codes, k_alt_codes, v_codes, k_fb, k_use_fb, k_flags,
                 flags_given, saturated):
    """Quantize rotated K/V ``[N, H, d]`` and write slots ``slots[N]`` (all valid).

    With ``has_off`` each key is also encoded from ``yk_alt`` (``y + R_h o``) and that
    encoding, flagged, replaces the first (the slot's leading ``k_bytes``) when its
    residual is strictly smaller. The slot is zeroed first, so padding stays zero;
    ``saturated[i]`` counts the kept norms of token i clamped to the fp16 range.
    Trellis codes come searched (uint8 ``[N, H, d]`` each of ``k_codes``, ``k_alt_codes``,
    ``v_codes``; read only for a tensor with trellis codes). With ``k_use_fb`` keys round
    with feedback through ``k_fb`` ``[H, d, d]`` float32 (:func:`_encode_tensor`). With
    ``flags_given`` (the offset choice by norm) the keys come chosen and ``k_flags[t, h]``
    (uint8 ``[N, H]``) sets their flags."""
    n, h, d = yk.shape
    for task in prange(n * h):
        t = task // h
        hh = task % h
        sm = slots[t]
        base = (sm // block_size) * s_blk + hh * s_head + (sm % block_size) * s_tok
        for i in range(slot_bytes):
            cache[base + i] = 0
        work = np.empty(d, dtype=np.float32)
        fed = np.empty(d, dtype=np.float32)
        sat, gamma = _encode_tensor(yk[t, hh], base, cache, kdesc, k_bounds, k_lut, k_nc,
                                    sketch, work, has_off, k_codes, t, hh, k_fb, k_use_fb, fed)
        if has_off:
            alt = np.zeros(k_bytes, dtype=np.uint8)
            sat_alt, gamma_alt = _encode_tensor(yk_alt[t, hh], 0, alt, kdesc, k_bounds, k_lut,
                                                k_nc, sketch, work, True, k_alt_codes, t, hh,
                                                k_fb, k_use_fb, fed)
            if gamma_alt < gamma:
                for i in range(k_bytes):
                    cache[base + i] = alt[i]
                cache[base + kdesc[0] + 1] |= 0x80
                sat = sat_alt
        elif flags_given and k_flags[t, hh]:
            cache[base + kdesc[0] + 1] |= 0x80
        sat_v, _ = _encode_tensor(yv[t, hh], base, cache, vdesc, v_bounds, v_lut, v_nc, sketch,
                                  work, False, v_codes, t, hh, k_fb, False, fed)
        saturated[task] = sat + sat_v
