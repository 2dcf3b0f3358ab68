"""Triton store kernel: quantize rotated K/V and write packed cache slots (jit code only).

The launcher (:func:`tq_vllm.kernels.triton_ops.store`) zeroes non-finite vectors,
rotates K and V with torch and calls :func:`tq_store_kernel` once; each program
encodes ``BLOCK_T`` tokens of one KV head, K then V, and writes their slots by
``slot_mapping`` (``-1`` and out-of-range slots are skipped).

Every float operation reproduces :meth:`tq_vllm.codec.TensorQuantizer.encode`
bit for bit, given the same rotated input:

* norms are sums of squares accumulated in float64 (squares of float32 values are
  exact there, so the order of the sum does not matter), square root in float64,
  rounded once to float32, as ``codec._norm`` does;
* ``y / n`` is correctly rounded (``div_rn``: plain ``/`` is approximate on NVIDIA
  GPUs) and codes count the group's boundaries strictly below it
  (``torch.bucketize``, ``right=False``; padded boundaries are ``+inf``);
* the QJL residual ``r = y − n̂·c`` is float32 (the launch passes
  ``enable_fp_fusion=False`` so it is not contracted into an FMA) and the sign of
  ``S r`` comes from a float64 ``tl.dot`` of float32 inputs, as in the codec;
* key offset choice (``OFF``): the key is also encoded from ``y + R_h o`` (added by the
  launcher, as the codec adds it) and that encoding is kept, flagged in the first
  norm's sign bit, where its residual norm is strictly smaller;
* feedback rounding (``FB``, keys of ``tq{b}``): coordinates rounded in turn, each
  from ``w_i / n_g`` where ``w`` is ``y`` with the earlier errors ``(w_i − c_i·n_g)``
  times row ``i`` of the head's ``F`` ``[D, D]`` taken off (float32, product then
  difference, unfused), as ``TensorQuantizer.feedback_codes`` does;
* trellis codes (``TS`` state bits): the launcher searches them
  (:mod:`tq_vllm.kernels.triton_trellis`) and passes codes and unit values; norms, norm
  correction, residuals, the offset choice and the packing are the scalar codes' own
  (a trellis stream is packed as the scalar codes are).

Tensor descriptors (all ``tl.constexpr``), per K/V: ``NG`` groups of ``D // NG``
channels, code bits ``B0``/``B1`` (``B0 ≥ B1``), byte offsets of the norms
(``NORM``), of each group's code stream (``C0``/``C1``) and of the QJL signs
(``SIGN``).
"""

import triton
import triton.language as tl

# Globals read inside @triton.jit code must be constexprs: compiled Triton rejects
# plain module floats (the interpreter accepts them, so only a GPU run shows it).
_TINY = tl.constexpr(1e-30)  # codec._TINY: clamp of the norm before dividing
_FP16_MAX = tl.constexpr(65504.0)


@triton.jit
def _norm(sq, sel):
    """float32 norm from float64 squares ``[R, D]`` over the columns where ``sel``."""
    # float64 sqrt is correctly rounded everywhere (sqrt_rn is float32-only)
    return tl.sqrt(tl.sum(tl.where(sel, sq, 0.0), axis=1)).to(tl.float32)


@triton.jit
def _bucket(v, bnd_ptr, NBND: tl.constexpr):
    """Number of boundaries strictly below ``v``; ``bnd_ptr`` broadcasts against ``v``."""
    code = tl.zeros(v.shape, tl.int32)
    for k in tl.static_range(NBND):
        code += (v > tl.load(bnd_ptr + k)).to(tl.int32)
    return code


@triton.jit
def _fp16(x):
    """fp32 → fp16 saturated to the fp16 range (codec._to_fp16)."""
    return tl.minimum(x, _FP16_MAX).to(tl.float16)


@triton.jit
def _store_half(ptr, x, mask):
    """Write fp32 ``x`` as little-endian saturated fp16 at byte pointers ``ptr``."""
    _store_half_signed(ptr, x, x != x, mask)


@triton.jit
def _store_half_signed(ptr, x, sign, mask):
    """:func:`_store_half` of ``x`` ≥ 0 with the sign bit set where ``sign`` (the key
    offset flag)."""
    u = _fp16(x).to(tl.uint16, bitcast=True)
    tl.store(ptr, (u & 255).to(tl.uint8), mask=mask)
    tl.store(ptr + 1, ((u >> 8) | (sign.to(tl.uint16) << 7)).to(tl.uint8), mask=mask)


@triton.jit
def _corrected(n, cent_sq, sel):
    """Norm correction: ``n / ‖c[idx]‖`` where that norm is positive."""
    cn = _norm(cent_sq, sel)
    return tl.where(cn > 0, tl.math.div_rn(n, tl.maximum(cn, _TINY)), n)


@triton.jit
def _feedback_codes(y, j, n0, n1, lut_ptr, bnd_ptr, fb_ptr, D: tl.constexpr, NG: tl.constexpr,
                    NBND: tl.constexpr, W: tl.constexpr):
    """Codes ``[R, D]`` int32 and unit centroids of rotated vectors ``y`` ``[R, D]`` by
    feedback rounding with the head's ``F`` at ``fb_ptr`` (``[D, D]`` float32, row-major)."""
    DG: tl.constexpr = D // NG
    code = tl.zeros(y.shape, tl.int32)
    cent = tl.zeros(y.shape, tl.float32)
    w = y
    for i in range(D):  # sequential: coordinate i is rounded after the errors before it
        sel = (j == i)[None, :]
        w_i = tl.sum(tl.where(sel, w, 0.0), axis=1)  # one nonzero term: exact
        g = i // DG
        n_i = tl.maximum(tl.where(g == 1, n1, n0), _TINY)
        c_i = _bucket(tl.math.div_rn(w_i, n_i), bnd_ptr + g * 16, NBND)
        v_i = tl.load(lut_ptr + g * W + c_i)
        err = w_i - v_i * n_i
        w = w - err[:, None] * tl.load(fb_ptr + i * D + j)[None, :]  # F[i, j] = 0 for j ≤ i
        code = tl.where(sel, c_i[:, None], code)
        cent = tl.where(sel, v_i[:, None], cent)
    return code, cent


@triton.jit
def _quantize(y, j, gid, in1, lut_ptr, bnd_ptr, given_code, given_cent, rows, row_mask, fb_ptr,
              D: tl.constexpr, NG: tl.constexpr, NBND: tl.constexpr, W: tl.constexpr,
              NCORR: tl.constexpr, TS: tl.constexpr, FB: tl.constexpr):
    """Codes ``[R, D]``, their unit centroids, and the group norms to store (``s0``, ``s1``
    ``[R]`` float32, corrected with ``NCORR``) of rotated vectors ``y`` ``[R, D]``. Trellis
    codes (``TS`` > 0) come searched, with their unit values, from ``given_code`` /
    ``given_cent`` (``[T·H, D]``, rows ``rows``); with ``FB`` scalar codes round with
    feedback (:func:`_feedback_codes`)."""
    y64 = y.to(tl.float64)
    sq = y64 * y64
    n0 = _norm(sq, ~in1)
    n1 = n0
    if NG == 2:
        n1 = _norm(sq, in1)
    if TS:
        at = rows[:, None] + j[None, :]
        code = tl.load(given_code + at, mask=row_mask[:, None], other=0).to(tl.int32)
        cent = tl.load(given_cent + at, mask=row_mask[:, None], other=0.0)
    elif FB:
        code, cent = _feedback_codes(y, j, n0, n1, lut_ptr, bnd_ptr, fb_ptr, D, NG, NBND, W)
    else:
        n_j = tl.where(in1, n1[:, None], n0[:, None])
        code = _bucket(tl.math.div_rn(y, tl.maximum(n_j, _TINY)), bnd_ptr + gid[None, :] * 16,
                       NBND)
        cent = tl.load(lut_ptr + gid[None, :] * W + code)  # unit centroid, group codebook [NG, W]
    s0 = n0
    s1 = n1
    if NCORR:
        c64 = cent.to(tl.float64)
        s0 = _corrected(n0, c64 * c64, ~in1)
        if NG == 2:
            s1 = _corrected(n1, c64 * c64, in1)
    return code, cent, s0, s1


@triton.jit
def _residual(y, cent, s0, s1, in1):
    """``y − n̂·c`` float32 ``[R, D]`` with the stored (fp16) group norms ``n̂``."""
    h_j = tl.where(in1, _fp16(s1).to(tl.float32)[:, None], _fp16(s0).to(tl.float32)[:, None])
    return y - h_j * cent


@triton.jit
def _encode_tensor(y_ptr, ya_ptr, row_off, row_mask, dst, s_byte, lut_ptr, bnd_ptr, sk_ptr,
                   code_ptr, cent_ptr, codea_ptr, centa_ptr, fb_ptr, flag_ptr, flag_off,
                   D: tl.constexpr, NG: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr,
                   NBND: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr,
                   C0: tl.constexpr, C1: tl.constexpr, SIGN: tl.constexpr, QJL: tl.constexpr,
                   NCORR: tl.constexpr, OFF: tl.constexpr, FLAGS: tl.constexpr, TS: tl.constexpr,
                   FB: tl.constexpr, BLOCK_T: tl.constexpr, SK_COLS: tl.constexpr):
    """Encode ``BLOCK_T`` rotated vectors of one of K/V and write their slot fields; with
    ``OFF``, also from ``ya`` (``y + R_h o``), keeping the encoding of smaller residual;
    with ``FLAGS`` (the offset choice made by norm) ``y`` comes chosen and its flags are
    read at ``flag_ptr + flag_off``. Trellis codes (``TS``) of ``y`` / ``ya`` come searched:
    ``code_ptr``/``cent_ptr``, ``codea_ptr``/``centa_ptr``; with ``FB`` the head's feedback
    matrix is at ``fb_ptr``."""
    DG: tl.constexpr = D // NG
    j = tl.arange(0, D)
    gid = j // DG
    in1 = (gid == 1)[None, :]  # coordinate belongs to the second group
    every = (j >= 0)[None, :]
    y = tl.load(y_ptr + row_off[:, None] + j[None, :], mask=row_mask[:, None], other=0.0)
    code, cent, s0, s1 = _quantize(y, j, gid, in1, lut_ptr, bnd_ptr, code_ptr, cent_ptr, row_off,
                                   row_mask, fb_ptr, D, NG, NBND, W, NCORR, TS, FB)
    r = y
    if QJL or OFF:
        r = _residual(y, cent, s0, s1, in1)
    flag = s0 != s0  # all False (norms are never NaN)
    if FLAGS:
        flag = tl.load(flag_ptr + flag_off, mask=row_mask, other=0) != 0
    if OFF:
        ya = tl.load(ya_ptr + row_off[:, None] + j[None, :], mask=row_mask[:, None], other=0.0)
        code_a, cent_a, s0_a, s1_a = _quantize(ya, j, gid, in1, lut_ptr, bnd_ptr, codea_ptr,
                                               centa_ptr, row_off, row_mask, fb_ptr, D, NG, NBND,
                                               W, NCORR, TS, FB)
        r_a = _residual(ya, cent_a, s0_a, s1_a, in1)
        r64 = r.to(tl.float64)
        ra64 = r_a.to(tl.float64)
        flag = _norm(ra64 * ra64, every) < _norm(r64 * r64, every)
        code = tl.where(flag[:, None], code_a, code)
        s0 = tl.where(flag, s0_a, s0)
        s1 = tl.where(flag, s1_a, s1)
        r = tl.where(flag[:, None], r_a, r)

    # stored group norms, fp16 (the first carries the offset flag)
    _store_half_signed(dst + NORM * s_byte, s0, flag, row_mask)
    if NG == 2:
        _store_half(dst + (NORM + 2) * s_byte, s1, row_mask)

    # bit-pack: 8 codes of b bits are exactly b bytes of the group's LSB-first stream
    cc = tl.arange(0, D // 8)
    hi = cc * 8 >= DG
    bits = tl.where(hi, B1, B0)
    word = tl.sum(tl.reshape(code, (BLOCK_T, D // 8, 8))
                  << (tl.arange(0, 8)[None, None, :] * bits[None, :, None]), axis=2)
    off = tl.where(hi, C1 + (cc - DG // 8) * B1, C0 + cc * B0)
    for k in tl.static_range(B0):  # B0 ≥ B1: the outlier group never has fewer bits
        tl.store(dst[:, None] + (off + k)[None, :] * s_byte,
                 ((word >> (8 * k)) & 255).to(tl.uint8),
                 mask=row_mask[:, None] & (k < bits)[None, :])

    if QJL:
        # residual against the reconstruction from the stored fp16 norms
        r64 = r.to(tl.float64)
        _store_half(dst + (NORM + 2 * NG) * s_byte, _norm(r64 * r64, every), row_mask)
        for cb in tl.static_range(D // SK_COLS):
            cols = cb * SK_COLS + tl.arange(0, SK_COLS)
            st = tl.load(sk_ptr + cols[None, :] * D + j[:, None]).to(tl.float64)  # S[cols, :]ᵀ
            pos = (tl.dot(r64, st, input_precision="ieee", out_dtype=tl.float64) >= 0).to(tl.int32)
            byte = tl.sum(tl.reshape(pos, (BLOCK_T, SK_COLS // 8, 8))
                          << tl.arange(0, 8)[None, None, :], axis=2)
            sb = cb * (SK_COLS // 8) + tl.arange(0, SK_COLS // 8)
            tl.store(dst[:, None] + (SIGN + sb)[None, :] * s_byte, byte.to(tl.uint8),
                     mask=row_mask[:, None])


@triton.jit
def tq_store_kernel(
    yk_ptr, yka_ptr, yv_ptr,  # float32 [T, H, D] contiguous: rotated K, K + R_h o, V
    # (non-finite rows zeroed; yka read only with K_OFF)
    slot_ptr,  # int64 [T]: cache slot per token, -1 = skip
    cache_ptr, s_blk, s_head, s_tok, s_byte,  # uint8 cache and its element strides
    num_tokens, num_heads, block_size, num_slots,
    lutk_ptr, bndk_ptr, sketch_ptr, lutv_ptr, bndv_ptr,  # codec tables (see launcher)
    # trellis codes (uint8) and unit values (float32), [T, H, D] each: K, K + R_h o, V
    # (read only for a tensor with K_TS / V_TS > 0)
    kc_ptr, kv_ptr, kac_ptr, kav_ptr, vc_ptr, vv_ptr,
    fbk_ptr,  # float32 [H, D, D]: the keys' feedback matrices (read only with K_FB)
    flag_ptr,  # uint8 [T, H]: offset flags of keys chosen by norm (read only with K_FLAGS)
    D: tl.constexpr, BLOCK_T: tl.constexpr, SK_COLS: tl.constexpr,
    K_NG: tl.constexpr, K_B0: tl.constexpr, K_B1: tl.constexpr, K_NBND: tl.constexpr,
    K_W: tl.constexpr, K_NORM: tl.constexpr, K_C0: tl.constexpr, K_C1: tl.constexpr,
    K_SIGN: tl.constexpr, K_QJL: tl.constexpr, K_NCORR: tl.constexpr, K_OFF: tl.constexpr,
    K_FLAGS: tl.constexpr, K_TS: tl.constexpr, K_FB: tl.constexpr,
    V_NG: tl.constexpr, V_B0: tl.constexpr, V_B1: tl.constexpr, V_NBND: tl.constexpr,
    V_W: tl.constexpr, V_NORM: tl.constexpr, V_C0: tl.constexpr, V_C1: tl.constexpr,
    V_NCORR: tl.constexpr, V_TS: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_T), H)``: tokens ``[pid0·BLOCK_T, …)`` of KV head ``pid1``."""
    h = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = t < num_tokens
    slot = tl.load(slot_ptr + t, mask=in_range, other=-1).to(tl.int64)
    row_mask = in_range & (slot >= 0) & (slot < num_slots)
    slot = tl.where(row_mask, slot, 0)
    dst = (cache_ptr + (slot // block_size) * s_blk + h.to(tl.int64) * s_head
           + (slot % block_size) * s_tok)
    row = t.to(tl.int64) * num_heads + h
    row_off = row * D
    _encode_tensor(yk_ptr, yka_ptr, row_off, row_mask, dst, s_byte, lutk_ptr, bndk_ptr,
                   sketch_ptr, kc_ptr, kv_ptr, kac_ptr, kav_ptr,
                   fbk_ptr + h.to(tl.int64) * D * D, flag_ptr, row, D, K_NG, K_B0, K_B1, K_NBND,
                   K_W, K_NORM, K_C0, K_C1, K_SIGN, K_QJL, K_NCORR, K_OFF, K_FLAGS, K_TS, K_FB,
                   BLOCK_T, SK_COLS)
    _encode_tensor(yv_ptr, yv_ptr, row_off, row_mask, dst, s_byte, lutv_ptr, bndv_ptr,
                   sketch_ptr, vc_ptr, vv_ptr, vc_ptr, vv_ptr, fbk_ptr, flag_ptr, row, D, V_NG,
                   V_B0, V_B1, V_NBND, V_W, V_NORM, V_C0, V_C1, 0, False, V_NCORR, False, False,
                   V_TS, False, BLOCK_T, SK_COLS)
