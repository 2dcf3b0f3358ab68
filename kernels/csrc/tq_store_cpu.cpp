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
// padding bytes stay zero.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "tq_cpu_common.h"

namespace {

// The rotation's float64 accumulators: ROT_VECS vectors of WD outputs (32 with AVX-512,
// 16 with AVX2) for each of up to ROT_TOKENS tokens stay in registers across a pass's d
// multiply-adds (ROT_VECS x ROT_TOKENS accumulators + ROT_VECS matrix vectors + the
// broadcasts fit the 32 zmm / 16 ymm registers); head_dim must be a multiple of
// ROT_VECS * WD. Each matrix vector loaded feeds ROT_TOKENS tokens (one token a pass read
// R's d x d entries once per token), and R is read as the float32 R^T the decode kernel
// uses for the queries (widened exactly): half the bytes of a float64 copy, one table
// for both kernels (a float64 R^T with four tokens a pass timed the same alone, within
// the ~5% run-to-run noise; in vLLM the tables come from L3 after every layer's GEMMs).
constexpr int ROT_VECS = 4;
constexpr int ROT_TOKENS = W == 16 ? 4 : 2;

constexpr float HALF_MAX = 65504.0f;  // largest finite fp16: norms clamp here
constexpr float TINY = 1e-30f;        // floor of a norm used as a divisor
constexpr int MAX_KEY_BYTES = 4 * MAX_D;  // the offset choice's scratch slot (a key needs < d + 64)
// Tokens per task: with feedback rounding each coordinate waits on the one before it, so
// several tokens' keys (and their offset alternatives: 2 chains a token) side by side keep
// the core busy where one token's 2 chains left it waiting (store of 2048 tokens, d 64, 3
// heads, interleaved A/B: 2 tokens 0.79x, 4 tokens 0.72-0.74x the time of 1).
constexpr int PAIR_TOKENS = 4;  // the feedback matrix is per head: a task's tokens share one

inline void put_half(uint8_t* p, float v) {
  const uint16_t h = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  std::memcpy(p, &h, 2);
}

// One float32 matrix row segment as WD doubles (exact).
inline VD load_widen(const float* p) {
#if defined(__AVX512F__)
  return _mm512_cvtps_pd(_mm256_loadu_ps(p));
#else
  return _mm256_cvtps_pd(_mm_loadu_ps(p));
#endif
}

// Whether every coordinate of x [d] is finite.
inline bool all_finite(const float* x, int d) {
  bool finite = true;
  for (int k = 0; k < d; ++k) finite &= std::isfinite(x[k]);
  return finite;
}

// y_t [d] = R x_t for NT vectors in float64 sums (R's float32 entries, rot_t = R^T [d, d]
// float32): each output element summed over k = 0..d-1 in order, one fused multiply-add
// per term, rounded once to float32.
template <int NT>
void rotate_fixed(const float* const* x, const float* rot_t, int d, float* const* y) {
  for (int e0 = 0; e0 < d; e0 += ROT_VECS * WD) {
    VD acc[NT][ROT_VECS];
    for (int t = 0; t < NT; ++t)
      for (int j = 0; j < ROT_VECS; ++j) acc[t][j] = zerod();
    for (int k = 0; k < d; ++k) {
      const float* r = rot_t + (int64_t)k * d + e0;
      VD m[ROT_VECS];
      for (int j = 0; j < ROT_VECS; ++j) m[j] = load_widen(r + j * WD);
      for (int t = 0; t < NT; ++t) {
        const VD xk = set1d((double)x[t][k]);
        for (int j = 0; j < ROT_VECS; ++j) acc[t][j] = fmaddd(xk, m[j], acc[t][j]);
      }
    }
    for (int t = 0; t < NT; ++t)
      for (int j = 0; j < ROT_VECS; ++j) store_floats(y[t] + e0 + j * WD, acc[t][j]);
  }
}

// rotate_fixed over n <= PAIR_TOKENS vectors, ROT_TOKENS at a time.
void rotate(const float* const* x, int n, const float* rot_t, int d, float* const* y) {
  int t = 0;
  for (; t + ROT_TOKENS <= n; t += ROT_TOKENS) rotate_fixed<ROT_TOKENS>(x + t, rot_t, d, y + t);
  for (; t < n; ++t) rotate_fixed<1>(x + t, rot_t, d, y + t);
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

// What encode reads for one of K/V.
struct Tensor {
  Desc desc;
  const float* books;   // [G, 16] codebooks, or trellis tables [G, desc.tab_stride]
  const float* bounds;  // [G, 16] decision boundaries, +inf padded
  bool norm_correction;
};

// Quantizes R rotated vectors y[r] [d] into their zeroed slots (the tensor's byte map),
// in lockstep: with feedback rounding each coordinate waits on the one before it (divide,
// compare, look up, feed back: tens of cycles), so R independent vectors side by side
// keep the core busy (PAIR_TOKENS keys of one head, each with its offset alternative: R up
// to 2 x PAIR_TOKENS). fb: the head's feedback matrix [d, d] (scalar codes) or null;
// codes[r]: trellis codes [d] or null.
// gamma[r]: the residual norm ||y - y_hat|| (float32; computed when want_r or for QJL,
// else 0); norms clamped to the fp16 range are added to sat[r].
template <int R>
void encode(const float* const* y, int d, uint8_t* const* slot, const Tensor& T,
            const double* sketch, const float* fb, const uint8_t* const* codes, bool want_r,
            int64_t* sat, float* gamma) {
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
    if (D.sign_off < 0) continue;
    for (int i = 0; i < d; ++i) {
      double acc = 0.0;
      for (int j = 0; j < d; ++j) acc += sketch[(int64_t)i * d + j] * (double)work[r][j];
      if (acc >= 0.0) slot[r][D.sign_off + (i >> 3)] |= (uint8_t)(1 << (i & 7));
    }
    float g16 = gamma[r];
    if (g16 > HALF_MAX) {
      g16 = HALF_MAX;
      ++sat[r];
    }
    put_half(slot[r] + D.norm_off + 2 * D.ngroups, g16);
  }
}

// encode over R = 1 .. 2 * PAIR_TOKENS vectors, R read at run time.
inline void encode_any(int R, const float* const* y, int d, uint8_t* const* slot, const Tensor& T,
                       const double* sketch, const float* fb, const uint8_t* const* codes,
                       bool want_r, int64_t* sat, float* gamma) {
  switch (R) {
    case 1: encode<1>(y, d, slot, T, sketch, fb, codes, want_r, sat, gamma); break;
    case 2: encode<2>(y, d, slot, T, sketch, fb, codes, want_r, sat, gamma); break;
    case 3: encode<3>(y, d, slot, T, sketch, fb, codes, want_r, sat, gamma); break;
    case 4: encode<4>(y, d, slot, T, sketch, fb, codes, want_r, sat, gamma); break;
    case 5: encode<5>(y, d, slot, T, sketch, fb, codes, want_r, sat, gamma); break;
    case 6: encode<6>(y, d, slot, T, sketch, fb, codes, want_r, sat, gamma); break;
    case 7: encode<7>(y, d, slot, T, sketch, fb, codes, want_r, sat, gamma); break;
    default: encode<8>(y, d, slot, T, sketch, fb, codes, want_r, sat, gamma); break;
  }
}

// Shapes and codes the kernel handles (0), or -2.
int check_store(int64_t d, const int64_t* kdesc_p, const int64_t* vdesc_p, int64_t k_bytes,
                int64_t slot_bytes) {
  if (d > MAX_D || d % (ROT_VECS * WD) || k_bytes > slot_bytes || k_bytes > MAX_KEY_BYTES) return -2;
  for (const int64_t* desc : {kdesc_p, vdesc_p}) {
    if (desc[1] < 1 || desc[1] > 2) return -2;
    for (int64_t g = 0; g < desc[1]; ++g)
      if (desc[4 + 3 * g] < 1 || desc[4 + 3 * g] > 4) return -2;  // 16-entry codebooks
  }
  return 0;
}

}  // namespace

// Store N tokens' K/V, k/v [N, H, d] of dtype in_dt (DT_*; token t's row at t * k_row /
// t * v_row elements, its heads d apart): the model's vectors (rot_k_t, rot_v_t =
// R_h^T [H, d, d] float32, summed in float64), first transformed as load_row says by
// k_mean / k_scale / v_mean / v_scale [H, d] (each null when off), or already rotated
// float32 (rot_k_t and rot_v_t null: the trellis path rotates and searches first).
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
    int64_t block_size, int64_t slot_bytes, const float* rot_k_t, const float* rot_v_t,
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
  const bool rotated = rot_k_t == nullptr;
  int64_t bad_k = 0, bad_v = 0, sat_all = 0;
  // One task = (PAIR_TOKENS consecutive tokens, KV head): their keys (with the offset
  // choice, each with its alternative) run through encode in lockstep, up to
  // 2 x PAIR_TOKENS independent feedback-rounding chains side by side.
  const int64_t groups = (N + PAIR_TOKENS - 1) / PAIR_TOKENS;
#pragma omp parallel for schedule(static) num_threads(num_threads) reduction(+ : bad_k, bad_v, sat_all)
  for (int64_t task = 0; task < groups * H; ++task) {
    const int64_t h = task % H, t0 = task / H * PAIR_TOKENS;
    int64_t ti[PAIR_TOKENS];  // the live tokens' (token, head) indices into k, v and codes
    int nl = 0;
    for (int64_t t = t0; t < std::min(N, t0 + PAIR_TOKENS); ++t)
      if (slots[t] >= 0) ti[nl++] = t * H + h;
    if (nl == 0) continue;
    alignas(64) float yk[PAIR_TOKENS][MAX_D];
    alignas(64) float yv[PAIR_TOKENS][MAX_D];
    uint8_t* slot[PAIR_TOKENS];
    const uint8_t *kc[PAIR_TOKENS], *vc[PAIR_TOKENS];
    alignas(64) float xk[PAIR_TOKENS][MAX_D], xv[PAIR_TOKENS][MAX_D];
    const float *xks[PAIR_TOKENS], *xvs[PAIR_TOKENS];
    float *yks[PAIR_TOKENS], *yvs[PAIR_TOKENS];
    const int64_t ib = dtype_bytes(in_dt);
    for (int i = 0; i < nl; ++i) {
      const int64_t t = ti[i] / H, sm = slots[t];
      slot[i] = cache + (sm / block_size) * s_blk + h * s_head + (sm % block_size) * s_tok;
      std::memset(slot[i], 0, slot_bytes);
      float* xki = rotated ? yk[i] : xk[i];
      float* xvi = rotated ? yv[i] : xv[i];
      load_row(static_cast<const uint8_t*>(k) + (t * k_row + h * d) * ib, in_dt, d,
               k_mean ? k_mean + h * d : nullptr, k_scale ? k_scale + h * d : nullptr, false, xki);
      load_row(static_cast<const uint8_t*>(v) + (t * v_row + h * d) * ib, in_dt, d,
               v_mean ? v_mean + h * d : nullptr, v_scale ? v_scale + h * d : nullptr, false, xvi);
      if (!rotated) {  // a non-finite vector is stored as zeros (rotated: +0 throughout)
        if (!all_finite(xki, (int)d)) std::fill(xki, xki + d, 0.f), ++bad_k;
        if (!all_finite(xvi, (int)d)) std::fill(xvi, xvi + d, 0.f), ++bad_v;
      }
      xks[i] = xk[i], xvs[i] = xv[i], yks[i] = yk[i], yvs[i] = yv[i];
      kc[i] = k_codes != nullptr ? k_codes + ti[i] * d : nullptr;
      vc[i] = v_codes != nullptr ? v_codes + ti[i] * d : nullptr;
    }
    if (!rotated) {
      rotate(xks, nl, rot_k_t + h * d * d, (int)d, yks);
      rotate(xvs, nl, rot_v_t + h * d * d, (int)d, yvs);
    }
    const float* fb = k_fb != nullptr ? k_fb + h * d * d : nullptr;
    float gamma[2 * PAIR_TOKENS];
    int64_t sat[2 * PAIR_TOKENS] = {};
    if (k_off_rot != nullptr) {  // each key and its offset alternative side by side
      alignas(64) float alt[PAIR_TOKENS][MAX_D];
      uint8_t alt_slot[PAIR_TOKENS][MAX_KEY_BYTES];
      const float* o = k_off_rot + h * d;
      const float* ys[2 * PAIR_TOKENS];
      uint8_t* ss[2 * PAIR_TOKENS];
      const uint8_t* cs[2 * PAIR_TOKENS];
      for (int i = 0; i < nl; ++i) {
        for (int64_t j = 0; j < d; ++j) alt[i][j] = yk[i][j] + o[j];
        std::memset(alt_slot[i], 0, k_bytes);
        ys[2 * i] = yk[i];
        ys[2 * i + 1] = alt[i];
        ss[2 * i] = slot[i];
        ss[2 * i + 1] = alt_slot[i];
        cs[2 * i] = kc[i];
        cs[2 * i + 1] = k_alt_codes != nullptr ? k_alt_codes + ti[i] * d : nullptr;
      }
      encode_any(2 * nl, ys, (int)d, ss, K, sketch, fb, cs, true, sat, gamma);
      for (int i = 0; i < nl; ++i) {
        if (gamma[2 * i + 1] < gamma[2 * i]) {
          std::memcpy(slot[i], alt_slot[i], k_bytes);
          slot[i][K.desc.norm_off + 1] |= 0x80;
          sat[2 * i] = sat[2 * i + 1];
        }
        sat_all += sat[2 * i];
      }
    } else {
      const float* ys[PAIR_TOKENS];
      for (int i = 0; i < nl; ++i) ys[i] = yk[i];
      encode_any(nl, ys, (int)d, slot, K, sketch, fb, kc, false, sat, gamma);
      for (int i = 0; i < nl; ++i) {
        if (k_flags != nullptr && k_flags[ti[i]]) slot[i][K.desc.norm_off + 1] |= 0x80;
        sat_all += sat[i];
      }
    }
    const float* ys[PAIR_TOKENS];
    for (int i = 0; i < nl; ++i) ys[i] = yv[i];
    int64_t vsat[PAIR_TOKENS] = {};
    encode_any(nl, ys, (int)d, slot, Vt, sketch, nullptr, vc, false, vsat, gamma);
    for (int i = 0; i < nl; ++i) sat_all += vsat[i];
  }
  counts[0] = bad_k;
  counts[1] = bad_v;
  counts[2] = sat_all;
  return 0;
}
