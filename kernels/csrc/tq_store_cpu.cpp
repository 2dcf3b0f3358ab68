// tq-vllm: the store on the CPU — rotate, quantize and pack K/V into their paged slots.
//
// Same arithmetic as kernels/cpu_numba.py's store_kernel (and so tq_vllm.reference.tq_store,
// bit for bit: tests/kernels/test_cpu_ops.py compares the bytes):
//   - the rotation y = R_h x summed in float64 (R_h's float32 entries; a product of two
//     float32 values is exact in float64, so a fused multiply-add rounds as the
//     reference's product-then-sum does), each y_e over k = 0..d-1 in order, rounded once to
//     float32. The reference's einsum sums in another order: the two differ by ~1e-16
//     relative, which reaches a float32 y only where a sum lies that close to a rounding
//     point, and a code or fp16 norm only where that y also sits on a boundary;
//     a vector with a NaN/Inf coordinate is stored as zeros and counted;
//   - per channel group: the float32 norm (float64 sum of squares), codes by counting the
//     decision boundaries below u = y / n (float32) — for keys with feedback rounding u
//     is the fed coordinate, each error times the head's row F_j subtracted from the later
//     coordinates (float32, product then difference) — or trellis codes searched
//     beforehand (tq_vllm.trellis, read from k_codes / v_codes);
//   - norm correction, fp16 norms (round to nearest even, clamped at 65504 and counted),
//     the residual with the stored norm, QJL signs from the float64 sketch;
//   - keys with the offset choice are also encoded from y + R_h o, and that encoding,
//     flagged (bit 7 of the first norm's high byte), kept when its residual is smaller;
//     with the choice made by norm (the trellis presets) the launcher passes the chosen
//     vectors and their flags.
// One task = (PAIR_TOKENS consecutive tokens, KV head); each slot is zeroed first, so
// padding bytes stay zero. A task's vectors sit side by side in SIMD lanes, one per lane,
// through the rotation (rotate_lanes; at most W / 2 of them rotate a vector at a time:
// rotate_rows) and the rounding of scalar codes (encode_codes, keys beside their offset
// alternatives when both fit one vector's lanes); a task of one or two tokens, and
// trellis codes (which read their searched codes), round a vector at a time (encode_rows).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "tq_cpu_common.h"

namespace {

// The rotation's float64 accumulators: ROT_OUTS outputs of a task's W vectors (one per
// lane, two float64 halves each) stay in registers across the d multiply-adds (2 x
// ROT_OUTS accumulators + the two halves of x_k + a broadcast entry of R fit the 32 zmm /
// 16 ymm registers); head_dim must be a multiple of ROT_OUTS. Each entry of R (float32,
// widened once per task) feeds all W vectors.
constexpr int ROT_OUTS = W == 16 ? 8 : 4;
// At most W / 2 live vectors rotate a vector at a time (rotate_rows: lanes would waste
// over half the multiply-adds): ROT_ROW_VECS x ROT_ROW_TOKENS float64 accumulators +
// ROT_ROW_VECS vectors of R^T + a broadcast coordinate (21 of the 32 zmm, 13 of the 16
// ymm); head_dim must be a multiple of ROT_ROW_VECS * WD.
constexpr int ROT_ROW_VECS = 4;
constexpr int ROT_ROW_TOKENS = W == 16 ? 4 : 2;

constexpr float HALF_MAX = 65504.0f;  // largest finite fp16: norms clamp here
constexpr float TINY = 1e-30f;        // floor of a norm used as a divisor
constexpr int MAX_KEY_BYTES = 4 * MAX_D;  // the offset choice's scratch slot (a key needs < d + 64)
// Tokens per task: one SIMD lane per vector when codes are rounded (encode_codes), so a
// task's values fill a vector's W lanes and its keys with their offset alternatives two
// (with feedback rounding each coordinate waits on the one before it: lanes are chains
// rounded side by side, one instruction a step for all of them).
constexpr int PAIR_TOKENS = W;  // the feedback matrix is per head: a task's tokens share one
constexpr int TRELLIS_LOCKSTEP = 8;  // trellis vectors decoded side by side (encode_rows)
// Tasks of at most this many tokens (a decode step of a batch of 1 or 2) rotate and round
// a vector at a time (rotate_rows, encode_rows: keys with their alternatives, then values,
// the chains in lockstep) instead of in lanes. With feedback a vector's rounding costs
// ~d^2 / (2 W) vector operations there against d^2 / 2 for a lane vector's W together;
// lockstep hides less latency, though: measured (d 64, 3 heads) the lanes win from 3.
constexpr int ROW_ENCODE_MAX = 2;

// One float32 matrix row segment as WD doubles (exact).
inline VD load_widen(const float* p) {
#if defined(__AVX512F__)
  return _mm512_cvtps_pd(_mm256_loadu_ps(p));
#else
  return _mm256_cvtps_pd(_mm_loadu_ps(p));
#endif
}

inline void put_half(uint8_t* p, float v) {
  const uint16_t h = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  std::memcpy(p, &h, 2);
}

// Packs n codes of `bits` bits into seg's zeroed bytes, little-endian bit order (code k at
// bit k * bits): built in a register, each byte written once.
inline void pack_codes(const int32_t* codes, int n, int bits, uint8_t* seg) {
  uint64_t acc = 0;
  int nb = 0, o = 0;
  for (int k = 0; k < n; ++k) {
    acc |= (uint64_t)codes[k] << nb;
    nb += bits;
    for (; nb >= 8; nb -= 8, acc >>= 8) seg[o++] |= (uint8_t)acc;
  }
  if (nb > 0) seg[o] |= (uint8_t)acc;
}

// The QJL part of a key's slot: the signs of sketch [d, d] (float64) times its residual
// w[j * stride] (j < d), and the residual's norm gamma as fp16 (clamped at 65504, counted
// in sat).
inline void put_qjl(const Desc& D, const double* sketch, const float* w, int stride, int d,
                    float gamma, uint8_t* slot, int64_t& sat) {
  for (int i = 0; i < d; ++i) {
    double acc = 0.0;
    for (int j = 0; j < d; ++j) acc += sketch[(int64_t)i * d + j] * (double)w[j * stride];
    if (acc >= 0.0) slot[D.sign_off + (i >> 3)] |= (uint8_t)(1 << (i & 7));
  }
  if (gamma > HALF_MAX) {
    gamma = HALF_MAX;
    ++sat;
  }
  put_half(slot + D.norm_off + 2 * D.ngroups, gamma);
}

// What encode reads for one of K/V.
struct Tensor {
  Desc desc;
  const float* books;   // [G, 16] codebooks, or trellis tables [G, desc.tab_stride]
  const float* bounds;  // [G, 16] decision boundaries, +inf padded
  bool norm_correction;
};

// ------------------------------------------------ W vectors side by side, one per lane
// Float64 halves of a float vector (exact) and back (each lane rounded once), for the
// norms' and the residual's float64 sums, lane by lane in coordinate order.
#if defined(__AVX512F__)
struct VD2 { __m512d lo, hi; };
inline VD2 widen2(V v) {
  return {_mm512_cvtps_pd(_mm512_castps512_ps256(v)),
          _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))};
}
inline V narrow2(VD2 x) {
  const __m256 lo = _mm512_cvtpd_ps(x.lo), hi = _mm512_cvtpd_ps(x.hi);
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)),
                                             _mm256_castps_pd(hi), 1));
}
inline VD2 sqrt2(VD2 x) { return {_mm512_sqrt_pd(x.lo), _mm512_sqrt_pd(x.hi)}; }
inline VI zeroi() { return _mm512_setzero_si512(); }
inline void storei(int32_t* p, VI v) { _mm512_storeu_si512(p, v); }
// the count of decision boundaries b[0..NB) below each lane of u (NB = 2^bits - 1: the
// +inf padding above is never below)
template <int NB>
inline VI count_below_lanes(const float* b, V u) {
  const VI one = _mm512_set1_epi32(1);
  VI a0 = zeroi(), a1 = zeroi();  // two chains of adds: the compares run side by side
  for (int i = 0; i + 1 < NB; i += 2) {
    a0 = _mm512_mask_add_epi32(a0, _mm512_cmp_ps_mask(set1(b[i]), u, _CMP_LT_OQ), a0, one);
    a1 = _mm512_mask_add_epi32(a1, _mm512_cmp_ps_mask(set1(b[i + 1]), u, _CMP_LT_OQ), a1, one);
  }
  if (NB % 2)
    a0 = _mm512_mask_add_epi32(a0, _mm512_cmp_ps_mask(set1(b[NB - 1]), u, _CMP_LT_OQ), a0, one);
  return _mm512_add_epi32(a0, a1);
}
inline VI or_shifted(VI acc, VI x, int n) {  // acc | x << n
  return _mm512_or_si512(acc, _mm512_sll_epi32(x, _mm_cvtsi32_si128(n)));
}
inline VI loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
inline V select_gt(V a, V b, V x, V y) {  // lanes: a > b ? x : y
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), y, x);
}
inline V to_half_and_back(V x) {  // round to fp16 (nearest even) and widen
  return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#else
struct VD2 { __m256d lo, hi; };
inline VD2 widen2(V v) {
  return {_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))};
}
inline V narrow2(VD2 x) { return _mm256_set_m128(_mm256_cvtpd_ps(x.hi), _mm256_cvtpd_ps(x.lo)); }
inline VD2 sqrt2(VD2 x) { return {_mm256_sqrt_pd(x.lo), _mm256_sqrt_pd(x.hi)}; }
inline VI zeroi() { return _mm256_setzero_si256(); }
inline void storei(int32_t* p, VI v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
template <int NB>
inline VI count_below_lanes(const float* b, V u) {
  VI a0 = zeroi(), a1 = zeroi();  // a true compare is -1: subtracted
  for (int i = 0; i + 1 < NB; i += 2) {
    a0 = _mm256_sub_epi32(a0, _mm256_castps_si256(_mm256_cmp_ps(set1(b[i]), u, _CMP_LT_OQ)));
    a1 = _mm256_sub_epi32(a1, _mm256_castps_si256(_mm256_cmp_ps(set1(b[i + 1]), u, _CMP_LT_OQ)));
  }
  if (NB % 2)
    a0 = _mm256_sub_epi32(a0, _mm256_castps_si256(_mm256_cmp_ps(set1(b[NB - 1]), u, _CMP_LT_OQ)));
  return _mm256_add_epi32(a0, a1);
}
inline VI or_shifted(VI acc, VI x, int n) {
  return _mm256_or_si256(acc, _mm256_sll_epi32(x, _mm_cvtsi32_si128(n)));
}
inline VI loadi(const int32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline V select_gt(V a, V b, V x, V y) {
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_GT_OQ));
}
inline V to_half_and_back(V x) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif
inline VD2 square_add(V x, VD2 acc) {  // acc + x * x per lane in float64 (the product exact)
  const VD2 w = widen2(x);
  return {fmaddd(w.lo, w.lo, acc.lo), fmaddd(w.hi, w.hi, acc.hi)};
}

// yt [d][W] = R xt: lane r of xt [d][W] (float64) is vector r, R^T [d, d] float32 (its
// entries exact in float64); each output summed over k = 0..d-1 in order, one fused
// multiply-add a term, rounded once to float32.
void rotate_lanes(const double (*xt)[W], const float* rot_t, int d, float (*yt)[W]) {
  static_assert(ROT_OUTS == WD, "an output block's R^T entries are one widened vector a row");
  constexpr int H2 = W / 2;  // lanes per float64 half
  alignas(64) double rb[MAX_D][ROT_OUTS];  // R^T[:, e0 : e0 + ROT_OUTS] in float64
  for (int e0 = 0; e0 < d; e0 += ROT_OUTS) {
    for (int k = 0; k < d; ++k) storeud(rb[k], load_widen(rot_t + (int64_t)k * d + e0));
    VD lo[ROT_OUTS], hi[ROT_OUTS];
    for (int e = 0; e < ROT_OUTS; ++e) lo[e] = hi[e] = zerod();
    for (int k = 0; k < d; ++k) {
      const VD xl = loadud(xt[k]), xh = loadud(xt[k] + H2);
      for (int e = 0; e < ROT_OUTS; ++e) {
        const VD m = set1d(rb[k][e]);
        lo[e] = fmaddd(m, xl, lo[e]);
        hi[e] = fmaddd(m, xh, hi[e]);
      }
    }
    for (int e = 0; e < ROT_OUTS; ++e) storeu(yt[e0 + e], narrow2(VD2{lo[e], hi[e]}));
  }
}

// The same sums for NT vectors x[t] [d] (float32) into y[t] [d], a vector at a time:
// ROT_ROW_VECS vectors of R^T's row k feed the NT vectors' outputs, WD to an accumulator.
// Lanes only pay when most of them are live: a task of a few tokens (decode) rotates so.
template <int NT>
void rotate_rows(const float* const* x, const float* rot_t, int d, float* const* y) {
  for (int e0 = 0; e0 < d; e0 += ROT_ROW_VECS * WD) {
    VD acc[NT][ROT_ROW_VECS];
    for (int t = 0; t < NT; ++t)
      for (int j = 0; j < ROT_ROW_VECS; ++j) acc[t][j] = zerod();
    for (int k = 0; k < d; ++k) {
      const float* r = rot_t + (int64_t)k * d + e0;
      VD m[ROT_ROW_VECS];
      for (int j = 0; j < ROT_ROW_VECS; ++j) m[j] = load_widen(r + j * WD);
      for (int t = 0; t < NT; ++t) {
        const VD xk = set1d((double)x[t][k]);
        for (int j = 0; j < ROT_ROW_VECS; ++j) acc[t][j] = fmaddd(m[j], xk, acc[t][j]);
      }
    }
    for (int t = 0; t < NT; ++t)
      for (int j = 0; j < ROT_ROW_VECS; ++j) store_floats(y[t] + e0 + j * WD, acc[t][j]);
  }
}

// rotate_rows over n vectors, ROT_ROW_TOKENS at a time.
inline void rotate_rows_n(const float* const* x, int n, const float* rot_t, int d,
                          float* const* y) {
  int t = 0;
  for (; t + ROT_ROW_TOKENS <= n; t += ROT_ROW_TOKENS)
    rotate_rows<ROT_ROW_TOKENS>(x + t, rot_t, d, y + t);
  for (; t < n; ++t) rotate_rows<1>(x + t, rot_t, d, y + t);
}

// Coordinates held in registers while a group is rounded: W of them (16 zmm of the 32, 8
// ymm of the 16, beside the error, the centroids and the compare temporaries).
constexpr int BK = W;

// Rounds coordinates [j0, j0 + dim) of W vectors (lanes; rows yt[j] [W]) to NB + 1
// centroids: codes into kt, centroids into ct, their squares summed into cn (float64, in
// coordinate order). With feedback (fb [d, d]) coordinate j is rounded as fed by every
// earlier error e_i (i < j, in order: x_j - e_i * F[i][j], product then difference) and
// its own error kept in et[j]: block by block, the earlier blocks' errors applied on load.
template <int NB>
void round_group(int j0, int dim, int d, V inv, const Book& book, const float* bounds,
                 const float* fb, const float (*yt)[W], float (*et)[W], float (*ct)[W],
                 int32_t (*kt)[W], VD2& cn) {
  for (int b0 = j0; b0 < j0 + dim; b0 += BK) {
    V x[BK];
    for (int i = 0; i < BK; ++i) x[i] = loadu(yt[b0 + i]);
    if (fb != nullptr)
      for (int j = 0; j < b0; ++j) {
        const V e = loadu(et[j]);
        const float* row = fb + (int64_t)j * d + b0;
        for (int i = 0; i < BK; ++i) x[i] = sub(x[i], mul(e, set1(row[i])));
      }
    for (int i = 0; i < BK; ++i) {
      const VI code = count_below_lanes<NB>(bounds, div_(x[i], inv));
      const V c = lookup<4>(book, code);
      storei(kt[b0 + i], code);
      storeu(ct[b0 + i], c);
      cn = square_add(c, cn);
      if (fb != nullptr) {
        const V e = sub(x[i], mul(c, inv));
        storeu(et[b0 + i], e);
        const float* row = fb + (int64_t)(b0 + i) * d + b0;
        for (int i2 = i + 1; i2 < BK; ++i2) x[i2] = sub(x[i2], mul(e, set1(row[i2])));
      }
    }
  }
}

// Quantizes R <= W rotated vectors, lane r of yt [d][W] (lanes from R on: zeros), with
// scalar codes into their zeroed slots (the tensor's byte map): the same operations, in
// the same order per vector, as one vector at a time (tq_vllm.reference's encode), W
// vectors per instruction.
// With feedback rounding (fb: the head's feedback matrix [d, d], or null) each coordinate
// waits on the one before it: across lanes the chains advance together.
// gamma[r]: the residual norm ||y - y_hat|| (float32; computed when want_r or for QJL,
// else 0); norms clamped to the fp16 range are added to sat[r].
void encode_codes(int R, const float (*yt)[W], int d, uint8_t* const* slot, const Tensor& T,
                  const double* sketch, const float* fb, bool want_r, int64_t* sat,
                  float* gamma) {
  const Desc& D = T.desc;
  want_r = want_r || D.sign_off >= 0;
  alignas(64) float et[MAX_D][W];    // the feedback errors (fb)
  alignas(64) float ct[MAX_D][W];    // centroids, then the residual (want_r)
  alignas(64) int32_t kt[MAX_D][W];  // codes
  alignas(64) float lane[W];
  alignas(64) int32_t words[W];
  int j0 = 0;
  for (int g = 0; g < D.ngroups; ++g) {
    const int dim = (int)D.dim[g], bits = (int)D.bits[g];
    const Book book = make_book(T.books + g * 16);
    const float* bounds = T.bounds + g * 16;
    VD2 ss{zerod(), zerod()}, cn{zerod(), zerod()};
    for (int k = 0; k < dim; ++k) ss = square_add(loadu(yt[j0 + k]), ss);
    V n = narrow2(sqrt2(ss));
    const V inv = vmax(n, set1(TINY));  // n > TINY ? n : TINY
    switch (bits) {
      case 1: round_group<1>(j0, dim, d, inv, book, bounds, fb, yt, et, ct, kt, cn); break;
      case 2: round_group<3>(j0, dim, d, inv, book, bounds, fb, yt, et, ct, kt, cn); break;
      case 3: round_group<7>(j0, dim, d, inv, book, bounds, fb, yt, et, ct, kt, cn); break;
      default: round_group<15>(j0, dim, d, inv, book, bounds, fb, yt, et, ct, kt, cn); break;
    }
    // codes packed 8 at a time (8 x bits bits: bits whole bytes), lane by lane
    uint8_t* seg[W];
    for (int r = 0; r < R; ++r) seg[r] = slot[r] + D.seg_off[g];
    for (int k = 0; k < dim; k += 8) {
      VI w = zeroi();
      for (int i = 0; i < 8; ++i) w = or_shifted(w, loadi(kt[j0 + k + i]), i * bits);
      storei(words, w);
      for (int r = 0; r < R; ++r) std::memcpy(seg[r] + k / 8 * bits, &words[r], bits);
    }
    if (T.norm_correction) {  // n / max(|c|, TINY) where |c| > 0
      const V c_norm = narrow2(sqrt2(cn));
      n = select_gt(c_norm, zero(), div_(n, vmax(c_norm, set1(TINY))), n);
    }
    storeu(lane, n);
    for (int r = 0; r < R; ++r) {
      if (lane[r] > HALF_MAX) {
        lane[r] = HALF_MAX;
        ++sat[r];
      }
      put_half(slot[r] + D.norm_off + 2 * g, lane[r]);
    }
    if (want_r) {  // reconstruction with the stored (fp16) norm, for the residual
      const V nh = to_half_and_back(loadu(lane));
      for (int j = j0; j < j0 + dim; ++j) storeu(ct[j], mul(nh, loadu(ct[j])));
    }
    j0 += dim;
  }
  for (int r = 0; r < R; ++r) gamma[r] = 0.f;
  if (!want_r) return;
  VD2 rr{zerod(), zerod()};
  for (int j = 0; j < d; ++j) {
    const V w = sub(loadu(yt[j]), loadu(ct[j]));
    storeu(ct[j], w);
    rr = square_add(w, rr);
  }
  storeu(lane, narrow2(sqrt2(rr)));
  for (int r = 0; r < R; ++r) {
    gamma[r] = lane[r];
    if (D.sign_off >= 0) put_qjl(D, sketch, &ct[0][r], W, d, gamma[r], slot[r], sat[r]);
  }
}

// Quantizes R rotated vectors y[r] [d] into their zeroed slots in lockstep, a vector at a
// time: trellis codes (codes[r]: searched beforehand, tq_vllm.trellis), or scalar codes for
// a task of a few tokens (ROW_ENCODE_MAX: lanes would mostly be idle), each error fed to
// the later coordinates of its own vector (fb) with whole vectors of F_j; gamma and sat as
// encode_codes.
template <int R>
void encode_rows(const float* const* y, int d, uint8_t* const* slot, const Tensor& T,
                 const double* sketch, const float* fb, const uint8_t* const* codes,
                 bool want_r, int64_t* sat, float* gamma) {
  const Desc& D = T.desc;
  want_r = want_r || D.sign_off >= 0;
  alignas(64) float work[R][MAX_D];
  alignas(64) float fed[R][MAX_D];
  alignas(64) int32_t code_buf[R][MAX_D];  // a group's codes, packed after its loop
  if (fb != nullptr)
    for (int r = 0; r < R; ++r) std::copy(y[r], y[r] + d, fed[r]);
  int j0 = 0;
  for (int g = 0; g < D.ngroups; ++g) {
    const int dim = (int)D.dim[g], bits = (int)D.bits[g];
    const int64_t S = D.trellis;
    const float* book = T.books + g * (S ? D.tab_stride : 16);
    const float* bounds = T.bounds + g * 16;
    float n[R], inv[R];
    double cn[R];
    int64_t state[R];
    double ss[R];
    for (int r = 0; r < R; ++r) ss[r] = 0.0;
    for (int k = 0; k < dim; ++k)  // the R sums side by side, each in coordinate order
      for (int r = 0; r < R; ++r) ss[r] += (double)y[r][j0 + k] * (double)y[r][j0 + k];
    for (int r = 0; r < R; ++r) {
      n[r] = (float)std::sqrt(ss[r]);
      inv[r] = n[r] > TINY ? n[r] : TINY;
      cn[r] = 0.0;
      state[r] = 0;
    }
    for (int k = 0; k < dim; ++k) {
      const int j = j0 + k;
      for (int r = 0; r < R; ++r) {
        int code;
        float c;
        if (S) {
          code = codes[r][j];
          const int64_t w = ((int64_t)code << S) | state[r];
          c = book[w];
          state[r] = w >> bits;
        } else {
          code = count_below(bounds, (fb != nullptr ? fed[r][j] : y[r][j]) / inv[r]);
          c = book[code];
          if (fb != nullptr) {
            // the later coordinates take err * F_j (product, then difference); whole
            // aligned vectors from the one holding j + 1: the earlier lanes are spent
            const V err = set1(fed[r][j] - c * inv[r]);
            const float* row = fb + (int64_t)j * d;
            for (int jj = (j + 1) / W * W; jj < d; jj += W)
              storeu(fed[r] + jj, sub(loadu(fed[r] + jj), mul(err, loadu(row + jj))));
          }
        }
        code_buf[r][k] = code;
        work[r][j] = c;
        cn[r] += (double)c * (double)c;
      }
    }
    for (int r = 0; r < R; ++r) {
      pack_codes(code_buf[r], dim, bits, slot[r] + D.seg_off[g]);
      if (T.norm_correction) {
        const float c_norm = (float)std::sqrt(cn[r]);
        if (c_norm > 0.f) n[r] = n[r] / (c_norm > TINY ? c_norm : TINY);
      }
      if (n[r] > HALF_MAX) {
        n[r] = HALF_MAX;
        ++sat[r];
      }
      put_half(slot[r] + D.norm_off + 2 * g, n[r]);
      if (want_r) {  // reconstruction with the stored (fp16) norm, for the residual
        const float nh = half_at(slot[r] + D.norm_off + 2 * g);
        for (int k = 0; k < dim; ++k) work[r][j0 + k] = nh * work[r][j0 + k];
      }
    }
    j0 += dim;
  }
  for (int r = 0; r < R; ++r) gamma[r] = 0.f;
  if (!want_r) return;
  double rr[R];
  for (int r = 0; r < R; ++r) rr[r] = 0.0;
  for (int j = 0; j < d; ++j)  // the R sums side by side, each in coordinate order
    for (int r = 0; r < R; ++r) {
      work[r][j] = y[r][j] - work[r][j];
      rr[r] += (double)work[r][j] * (double)work[r][j];
    }
  for (int r = 0; r < R; ++r) {
    gamma[r] = (float)std::sqrt(rr[r]);
    if (D.sign_off >= 0) put_qjl(D, sketch, work[r], 1, d, gamma[r], slot[r], sat[r]);
  }
}

// Vectors y[r] [d], r < n <= W, as lanes of yt [d][W] (lanes from n on: zeros).
template <typename T, typename U>
void to_lanes(const T* const* y, int n, int d, U (*yt)[W]) {
  for (int j = 0; j < d; ++j)
    for (int r = 0; r < W; ++r) yt[j][r] = r < n ? (U)y[r][j] : (U)0;
}

// encode_rows over R <= TRELLIS_LOCKSTEP vectors, R read at run time.
inline void encode_rows_n(int R, const float* const* y, int d, uint8_t* const* slot,
                          const Tensor& T, const double* sketch, const float* fb,
                          const uint8_t* const* codes, bool want_r, int64_t* sat, float* gamma) {
  switch (R) {
    case 1: encode_rows<1>(y, d, slot, T, sketch, fb, codes, want_r, sat, gamma); break;
    case 2: encode_rows<2>(y, d, slot, T, sketch, fb, codes, want_r, sat, gamma); break;
    case 3: encode_rows<3>(y, d, slot, T, sketch, fb, codes, want_r, sat, gamma); break;
    case 4: encode_rows<4>(y, d, slot, T, sketch, fb, codes, want_r, sat, gamma); break;
    case 5: encode_rows<5>(y, d, slot, T, sketch, fb, codes, want_r, sat, gamma); break;
    case 6: encode_rows<6>(y, d, slot, T, sketch, fb, codes, want_r, sat, gamma); break;
    case 7: encode_rows<7>(y, d, slot, T, sketch, fb, codes, want_r, sat, gamma); break;
    default: encode_rows<8>(y, d, slot, T, sketch, fb, codes, want_r, sat, gamma); break;
  }
}

// Encodes R rotated vectors y[r] [d] (any count): scalar codes W at a time in lanes,
// trellis codes TRELLIS_LOCKSTEP at a time. fb: the keys' feedback matrix (scalar codes
// only); codes[r]: trellis codes [d].
inline void encode_any(int R, const float* const* y, int d, uint8_t* const* slot, const Tensor& T,
                       const double* sketch, const float* fb, const uint8_t* const* codes,
                       bool want_r, int64_t* sat, float* gamma) {
  if (T.desc.trellis == 0) {
    alignas(64) float yt[MAX_D][W];
    for (int r = 0; r < R; r += W) {
      const int n = std::min(W, R - r);
      to_lanes(y + r, n, d, yt);
      encode_codes(n, yt, d, slot + r, T, sketch, fb, want_r, sat + r, gamma + r);
    }
    return;
  }
  for (int r = 0; r < R; r += TRELLIS_LOCKSTEP)
    encode_rows_n(std::min(TRELLIS_LOCKSTEP, R - r), y + r, d, slot + r, T, sketch, nullptr,
                  codes + r, want_r, sat + r, gamma + r);
}

// Shapes and codes the kernel handles (0), or -2.
int check_store(int64_t d, const int64_t* kdesc_p, const int64_t* vdesc_p, int64_t k_bytes,
                int64_t slot_bytes) {
  if (d > MAX_D || d % ROT_OUTS || d % (ROT_ROW_VECS * WD) || k_bytes > slot_bytes ||
      k_bytes > MAX_KEY_BYTES)
    return -2;
  for (const int64_t* desc : {kdesc_p, vdesc_p}) {
    if (desc[1] < 1 || desc[1] > 2) return -2;
    for (int64_t g = 0; g < desc[1]; ++g)
      // 16-entry codebooks, groups of whole register blocks
      if (desc[4 + 3 * g] < 1 || desc[4 + 3 * g] > 4 || desc[5 + 3 * g] % BK) return -2;
  }
  return 0;
}

}  // namespace

// Store N tokens' K/V, k/v [N, H, d] of dtype in_dt (DT_*; token t's row at t * k_row /
// t * v_row elements, its heads d apart): the model's vectors (rot_k, rot_v = R_h^T
// [H, d, d] float32), first transformed as load_row says by
// k_mean / k_scale / v_mean / v_scale [H, d] (each null when off), or already rotated
// float32 (rot_k and rot_v null: the trellis path rotates and searches first).
// slots [N] (negative: skipped); every slot is checked before any write.
//   k_off_rot [H, d] R_h o, or null (no choice by residual); k_flags [N, H] uint8: the
//   offset choice made (by norm) and k the chosen vectors, or null; k_bytes: the key's bytes
//   kdesc/vdesc, k_books/v_books, k_bounds/v_bounds [G, 16]: see Tensor
//   sketch [d, d] float64 or null; k_fb [H, d, d] or null; k_codes, k_alt_codes, v_codes
//   trellis codes [N, H, d] or null
//   counts [3] out: non-finite keys, non-finite values, norms clamped to fp16
// Returns 0; -1 when a slot is beyond the cache's num_slots (nothing written); -2 when a
// shape is outside what the kernel handles.
extern "C" int tq_store_cpu(
    const void* k, const void* v, int in_dt, int64_t k_row, int64_t v_row, const float* k_mean,
    const float* k_scale, const float* v_mean, const float* v_scale,
    const int64_t* slots, int64_t N, int64_t H, int64_t d,
    uint8_t* cache, int64_t s_blk, int64_t s_head, int64_t s_tok, int64_t num_slots,
    int64_t block_size, int64_t slot_bytes, const float* rot_k, const float* rot_v,
    const float* k_off_rot, const uint8_t* k_flags, int64_t k_bytes, const int64_t* kdesc_p,
    const float* k_books,
    const float* k_bounds, int k_nc, const int64_t* vdesc_p, const float* v_books,
    const float* v_bounds, int v_nc, const double* sketch, const float* k_fb,
    const uint8_t* k_codes, const uint8_t* k_alt_codes, const uint8_t* v_codes,
    int64_t* counts, int num_threads) {
  if (check_store(d, kdesc_p, vdesc_p, k_bytes, slot_bytes)) return -2;
  for (int64_t t = 0; t < N; ++t)
    if (slots[t] >= num_slots) return -1;
  const Tensor K{read_desc(kdesc_p), k_books, k_bounds, k_nc != 0};
  const Tensor Vt{read_desc(vdesc_p), v_books, v_bounds, v_nc != 0};
  const bool rotated = rot_k == nullptr;
  if (!rotated && (K.desc.trellis || Vt.desc.trellis)) return -2;  // trellis: rotated first
  int64_t bad_k = 0, bad_v = 0, sat_all = 0;
  // One task = (PAIR_TOKENS consecutive tokens, KV head): their vectors side by side, one
  // per SIMD lane, through the rotation and the rounding (with the offset choice each key
  // beside its alternative).
  const int64_t groups = (N + PAIR_TOKENS - 1) / PAIR_TOKENS;
#pragma omp parallel for schedule(static) num_threads(num_threads) reduction(+ : bad_k, bad_v, sat_all)
  for (int64_t task = 0; task < groups * H; ++task) {
    const int64_t h = task % H, t0 = task / H * PAIR_TOKENS;
    int64_t ti[PAIR_TOKENS];  // the live tokens' (token, head) indices into k, v and codes
    int nl = 0;
    for (int64_t t = t0; t < std::min(N, t0 + PAIR_TOKENS); ++t)
      if (slots[t] >= 0) ti[nl++] = t * H + h;
    if (nl == 0) continue;
    alignas(64) float xk[PAIR_TOKENS][MAX_D], xv[PAIR_TOKENS][MAX_D];  // rows: model's or rotated
    uint8_t* slot[PAIR_TOKENS];
    const uint8_t *kc[PAIR_TOKENS], *vc[PAIR_TOKENS];
    const float *xks[PAIR_TOKENS], *xvs[PAIR_TOKENS];
    const int64_t ib = dtype_bytes(in_dt);
    for (int i = 0; i < nl; ++i) {
      const int64_t t = ti[i] / H, sm = slots[t];
      slot[i] = cache + (sm / block_size) * s_blk + h * s_head + (sm % block_size) * s_tok;
      std::memset(slot[i], 0, slot_bytes);
      load_row(static_cast<const uint8_t*>(k) + (t * k_row + h * d) * ib, in_dt, d,
               k_mean ? k_mean + h * d : nullptr, k_scale ? k_scale + h * d : nullptr, false, xk[i]);
      load_row(static_cast<const uint8_t*>(v) + (t * v_row + h * d) * ib, in_dt, d,
               v_mean ? v_mean + h * d : nullptr, v_scale ? v_scale + h * d : nullptr, false, xv[i]);
      if (!rotated) {  // a non-finite vector is stored as zeros (rotated: +0 throughout)
        if (!all_finite(xk[i], d)) std::fill(xk[i], xk[i] + d, 0.f), ++bad_k;
        if (!all_finite(xv[i], d)) std::fill(xv[i], xv[i] + d, 0.f), ++bad_v;
      }
      xks[i] = xk[i], xvs[i] = xv[i];
      kc[i] = k_codes != nullptr ? k_codes + ti[i] * d : nullptr;
      vc[i] = v_codes != nullptr ? v_codes + ti[i] * d : nullptr;
    }
    const float* fb = k_fb != nullptr ? k_fb + h * d * d : nullptr;
    float gamma[2 * PAIR_TOKENS];
    int64_t sat[2 * PAIR_TOKENS] = {}, vsat[PAIR_TOKENS] = {};
    uint8_t alt_slot[PAIR_TOKENS][MAX_KEY_BYTES];  // the offset alternatives' key bytes
    uint8_t* kslot[2 * PAIR_TOKENS];  // the keys' slots, then their alternatives'
    uint8_t* const* alt_ptr = kslot + nl;
    for (int i = 0; i < nl; ++i) kslot[i] = slot[i];
    for (int i = 0; i < nl && k_off_rot != nullptr; ++i) {
      std::memset(alt_slot[i], 0, k_bytes);
      kslot[nl + i] = alt_slot[i];
    }
    const float* o = k_off_rot != nullptr ? k_off_rot + h * d : nullptr;
    float vgamma[PAIR_TOKENS];
    if (!rotated) {
      alignas(64) float yk[W / 2][MAX_D], yv[W / 2][MAX_D];  // rotated a vector at a time
      float *kp[W / 2], *vp[W / 2];
      for (int i = 0; i < W / 2; ++i) kp[i] = yk[i], vp[i] = yv[i];
      if (2 * nl <= W) {
        rotate_rows_n(xks, nl, rot_k + h * d * d, (int)d, kp);
        rotate_rows_n(xvs, nl, rot_v + h * d * d, (int)d, vp);
      }
      if (nl <= ROW_ENCODE_MAX) {  // rounded a vector at a time too
        static_assert(4 * ROW_ENCODE_MAX <= W, "keys and alternatives fit the row buffers");
        for (int i = 0; i < nl && o != nullptr; ++i)  // the alternatives y + R_h o after the keys
          for (int64_t j = 0; j < d; ++j) yk[nl + i][j] = yk[i][j] + o[j];
        encode_rows_n(o != nullptr ? 2 * nl : nl, kp, (int)d, kslot, K, sketch, fb, nullptr,
                      o != nullptr, sat, gamma);
        encode_rows_n(nl, vp, (int)d, slot, Vt, sketch, nullptr, nullptr, false, vsat, vgamma);
      } else {  // lanes = tokens from here on
        alignas(64) float ykt[MAX_D][W], yvt[MAX_D][W];
        if (2 * nl <= W) {
          to_lanes(kp, nl, (int)d, ykt);
          to_lanes(vp, nl, (int)d, yvt);
        } else {
          alignas(64) double xt[MAX_D][W];
          to_lanes(xks, nl, (int)d, xt);
          rotate_lanes(xt, rot_k + h * d * d, (int)d, ykt);
          to_lanes(xvs, nl, (int)d, xt);
          rotate_lanes(xt, rot_v + h * d * d, (int)d, yvt);
        }
        if (o != nullptr && 2 * nl <= W) {  // keys in lanes [0, nl), alternatives y + R_h o after
          for (int64_t j = 0; j < d; ++j)
            for (int i = 0; i < nl; ++i) ykt[j][nl + i] = ykt[j][i] + o[j];
          encode_codes(2 * nl, ykt, (int)d, kslot, K, sketch, fb, true, sat, gamma);
        } else {
          encode_codes(nl, ykt, (int)d, slot, K, sketch, fb, o != nullptr, sat, gamma);
          if (o != nullptr) {  // the alternatives in the key lanes
            for (int64_t j = 0; j < d; ++j) storeu(ykt[j], add(loadu(ykt[j]), set1(o[j])));
            encode_codes(nl, ykt, (int)d, alt_ptr, K, sketch, fb, true, sat + nl, gamma + nl);
          }
        }
        encode_codes(nl, yvt, (int)d, slot, Vt, sketch, nullptr, false, vsat, vgamma);
      }
    } else {
      encode_any(nl, xks, (int)d, slot, K, sketch, fb, kc, o != nullptr, sat, gamma);
      if (o != nullptr) {
        alignas(64) float alt[PAIR_TOKENS][MAX_D];
        const float* alts[PAIR_TOKENS];
        const uint8_t* ac[PAIR_TOKENS];
        for (int i = 0; i < nl; ++i) {
          for (int64_t j = 0; j < d; ++j) alt[i][j] = xk[i][j] + o[j];
          alts[i] = alt[i];
          ac[i] = k_alt_codes != nullptr ? k_alt_codes + ti[i] * d : nullptr;
        }
        encode_any(nl, alts, (int)d, alt_ptr, K, sketch, fb, ac, true, sat + nl, gamma + nl);
      }
      encode_any(nl, xvs, (int)d, slot, Vt, sketch, nullptr, vc, false, vsat, vgamma);
    }
    for (int i = 0; i < nl; ++i) {  // each key or its alternative (flagged), whichever is closer
      if (o != nullptr && gamma[nl + i] < gamma[i]) {
        std::memcpy(slot[i], alt_slot[i], k_bytes);
        slot[i][K.desc.norm_off + 1] |= 0x80;
        sat[i] = sat[nl + i];
      } else if (o == nullptr && k_flags != nullptr && k_flags[ti[i]]) {
        slot[i][K.desc.norm_off + 1] |= 0x80;
      }
      sat_all += sat[i] + vsat[i];
    }
  }
  counts[0] = bad_k;
  counts[1] = bad_v;
  counts[2] = sat_all;
  return 0;
}
