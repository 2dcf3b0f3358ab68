// tq-vllm: what the CPU kernels (tq_decode_cpu.cpp, tq_store_cpu.cpp) share: the slot
// descriptor (kernels/cpu_numba.py documents its layout), fp16 and little-endian byte
// reads, and the SIMD primitives of the two builds (AVX-512: W = 16 float lanes; AVX2 +
// FMA + F16C: W = 8). Everything here has internal linkage: each source file gets its own.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int MAX_D = 256;  // largest supported head_dim
constexpr int MAX_G = 16;   // largest supported query heads per KV head

struct Desc {
  int64_t norm_off, ngroups, sign_off;
  int64_t seg_off[2], bits[2], dim[2];
  int64_t trellis, tab_stride;  // trellis state bits S and table row stride (0: scalar codes)
};

Desc read_desc(const int64_t* p) {
  Desc d{};
  d.norm_off = p[0];
  d.ngroups = p[1];
  d.sign_off = p[2];
  for (int g = 0; g < d.ngroups; ++g) {
    d.seg_off[g] = p[3 + 3 * g];
    d.bits[g] = p[4 + 3 * g];
    d.dim[g] = p[5 + 3 * g];
  }
  d.trellis = p[3 + 3 * d.ngroups];
  d.tab_stride = p[4 + 3 * d.ngroups];
  return d;
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// B little-endian bytes as one integer, built in registers: a partial memcpy into a
// stack word would store and reload it (a store-forwarding stall on every chunk).
template <int B>
inline uint32_t load_le(const uint8_t* p) {
  if constexpr (B == 1) return p[0];
  if constexpr (B == 2) { uint16_t v; std::memcpy(&v, p, 2); return v; }
  if constexpr (B == 3) { uint16_t v; std::memcpy(&v, p, 2); return v | ((uint32_t)p[2] << 16); }
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---------------------------------------------------------------- model-dtype rows
// The kernels read queries, keys and values and write outputs in the model's dtype
// (vLLM's tensors, no float32 copies): code 0 float32, 1 bfloat16, 2 float16.
constexpr int DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2;

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN as 0x7FC0: c10::BFloat16's conversion (torch's .to(bfloat16))
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Element i of a row of dtype dt, as float (exact).
inline float elem_at(const void* row, int dt, int64_t i) {
  if (dt == DT_BF16) return bf16_to_float(static_cast<const uint16_t*>(row)[i]);
  if (dt == DT_F16) return _cvtsh_ss(static_cast<const uint16_t*>(row)[i]);
  return static_cast<const float*>(row)[i];
}

// x rounded to dtype dt and back to float (round to nearest even, as torch's .to(dt)).
inline float round_to(float x, int dt) {
  if (dt == DT_BF16) return bf16_to_float(float_to_bf16(x));
  if (dt == DT_F16) return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return x;
}

// dst [n] of dtype dt = src [n] rounded (as torch's copy_ into a dt tensor).
inline void store_row(const float* src, int64_t n, int dt, void* dst) {
  if (dt == DT_BF16) {
    for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[i] = float_to_bf16(src[i]);
  } else if (dt == DT_F16) {
    for (int64_t i = 0; i < n; ++i)
      static_cast<uint16_t*>(dst)[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    std::memcpy(dst, src, n * sizeof(float));
  }
}

inline int64_t dtype_bytes(int dt) { return dt == DT_F32 ? 4 : 2; }

// ---------------------------------------------------------------------------- simd
// W float lanes per vector; 8 codes of B bits are exactly B bytes of the stream.
#if defined(__AVX512F__)
constexpr int W = 16;
using V = __m512;
using VI = __m512i;
struct Book { __m512 cb; };  // 16 centroids in one register
inline V loadu(const float* p) { return _mm512_loadu_ps(p); }
inline void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V set1(float x) { return _mm512_set1_ps(x); }
inline V zero() { return _mm512_setzero_ps(); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline V div_(V a, V b) { return _mm512_div_ps(a, b); }
// W elements i.. of a row of dtype dt as float (exact)
inline V load_elems(const void* row, int dt, int64_t i) {
  const auto* h = reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + i);
  if (dt == DT_BF16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(h)), 16));
  if (dt == DT_F16) return _mm512_cvtph_ps(_mm256_loadu_si256(h));
  return _mm512_loadu_ps(static_cast<const float*>(row) + i);
}
// x rounded to dtype dt and back, lane by lane as round_to
inline V round_to_v(V x, int dt) {
  if (dt == DT_BF16) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
    const __m512i mag = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
    const __mmask16 nan = _mm512_cmp_epu32_mask(mag, _mm512_set1_epi32(0x7f800000), _MM_CMPINT_NLE);
    const __m512i hi = _mm512_slli_epi32(_mm512_srli_epi32(r, 16), 16);
    return _mm512_castsi512_ps(_mm512_mask_mov_epi32(hi, nan, _mm512_set1_epi32(0x7fc00000)));
  }
  if (dt == DT_F16)
    return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return x;
}
inline bool finite_lanes(V x) {  // exponent field not all ones in every lane
  const __m512i e = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7f800000));
  return _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(0x7f800000)) == 0;
}

inline float reduce_add(V v) { return _mm512_reduce_add_ps(v); }
inline float reduce_max(V v) { return _mm512_reduce_max_ps(v); }
inline VI lane_shifts(int bits) {
  return _mm512_mullo_epi32(_mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0),
                            _mm512_set1_epi32(bits));
}
inline Book make_book(const float* c) { return {_mm512_loadu_ps(c)}; }
// W 32-bit little-endian words, lane i's at base + offs[i] (any alignment)
inline VI gather_words(const uint8_t* base, VI offs) { return _mm512_i32gather_epi32(offs, base, 1); }
inline VI shift_right(VI v, int n) { return _mm512_srl_epi32(v, _mm_cvtsi32_si128(n)); }
// lane i: first + i * stride
inline VI lane_offsets(int64_t first, int64_t stride) {
  return _mm512_add_epi32(_mm512_set1_epi32((int)first),
                          _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32((int)stride)));
}
// W consecutive codes at byte p: lanes 0-7 from the first B bytes, 8-15 from the next B.
// Not masked: a lane holds its code in the low B bits and its neighbours' bits above.
template <int B>
inline VI codes(const uint8_t* p, VI shifts) {
  const uint32_t w0 = load_le<B>(p), w1 = load_le<B>(p + B);
  __m512i w = _mm512_inserti32x8(_mm512_castsi256_si512(_mm256_set1_epi32((int)w0)),
                                 _mm256_set1_epi32((int)w1), 1);
  return _mm512_srlv_epi32(w, shifts);
}
template <int B>
inline V lookup(const Book& b, VI idx) { return _mm512_permutexvar_ps(idx, b.cb); }
inline V exp2i(V n) { return _mm512_scalef_ps(set1(1.0f), n); }
// dst[k * ds + i] = src[i * ss + k] for i, k < 16 (a 16 x 16 block, rows ss / ds floats apart)
inline void transpose_block(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ss);
  for (int i = 0; i < 16; i += 2) {  // pairs of rows interleaved: 32-bit elements
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 64-bit pairs: each 128-bit lane holds a 4 x 4 block
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 16; i += 8)  // 128-bit lanes of rows 4 apart
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {  // and of rows 8 apart
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
  for (int k = 0; k < 16; ++k) _mm512_storeu_ps(dst + k * ds, r[k]);
}
inline V round_near(V t) { return _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// Store: WD double lanes (the rotation's float64 sums) and the count of decision
// boundaries below u among 16 (padded with +inf, never below).
constexpr int WD = 8;
using VD = __m512d;
inline VD zerod() { return _mm512_setzero_pd(); }
inline VD set1d(double x) { return _mm512_set1_pd(x); }
inline VD loadud(const double* p) { return _mm512_loadu_pd(p); }
inline void storeud(double* p, VD v) { _mm512_storeu_pd(p, v); }
inline VD fmaddd(VD a, VD b, VD c) { return _mm512_fmadd_pd(a, b, c); }
inline void store_floats(float* p, VD v) { _mm256_storeu_ps(p, _mm512_cvtpd_ps(v)); }
inline int count_below(const float* bounds16, float u) {
  return __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(bounds16), _mm512_set1_ps(u), _CMP_LT_OQ));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr int W = 8;
using V = __m256;
using VI = __m256i;
struct Book { __m256 lo, hi; };  // centroids 0-7 and 8-15
inline V loadu(const float* p) { return _mm256_loadu_ps(p); }
inline void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V set1(float x) { return _mm256_set1_ps(x); }
inline V zero() { return _mm256_setzero_ps(); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline V div_(V a, V b) { return _mm256_div_ps(a, b); }
inline V load_elems(const void* row, int dt, int64_t i) {
  const auto* h = reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + i);
  if (dt == DT_BF16)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(h)), 16));
  if (dt == DT_F16) return _mm256_cvtph_ps(_mm_loadu_si128(h));
  return _mm256_loadu_ps(static_cast<const float*>(row) + i);
}
inline V round_to_v(V x, int dt) {
  if (dt == DT_BF16) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
    // NaN: |u| > 0x7f800000 (signed compare: both sides non-negative)
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i hi = _mm256_slli_epi32(_mm256_srli_epi32(r, 16), 16);
    return _mm256_castsi256_ps(_mm256_blendv_epi8(hi, _mm256_set1_epi32(0x7fc00000), nan));
  }
  if (dt == DT_F16)
    return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return x;
}
inline bool finite_lanes(V x) {
  const __m256i e = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7f800000));
  return _mm256_movemask_epi8(_mm256_cmpeq_epi32(e, _mm256_set1_epi32(0x7f800000))) == 0;
}

inline float reduce_add(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_max(V v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline VI lane_shifts(int bits) {
  return _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32(bits));
}
inline Book make_book(const float* c) { return {_mm256_loadu_ps(c), _mm256_loadu_ps(c + 8)}; }
// W 32-bit little-endian words, lane i's at base + offs[i] (any alignment)
inline VI gather_words(const uint8_t* base, VI offs) {
  return _mm256_i32gather_epi32(reinterpret_cast<const int*>(base), offs, 1);
}
inline VI shift_right(VI v, int n) { return _mm256_srl_epi32(v, _mm_cvtsi32_si128(n)); }
// lane i: first + i * stride
inline VI lane_offsets(int64_t first, int64_t stride) {
  return _mm256_add_epi32(_mm256_set1_epi32((int)first),
                          _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32((int)stride)));
}
// Not masked: a lane holds its code in the low B bits and its neighbours' bits above.
template <int B>
inline VI codes(const uint8_t* p, VI shifts) {
  const __m256i w = _mm256_set1_epi32((int)load_le<B>(p));
  return _mm256_srlv_epi32(w, shifts);
}
// Codes of up to 3 bits: one 8-lane permute. 4 bits: two, and code bit 3 (moved to the
// sign bit) picks one.
template <int B>
inline V lookup(const Book& b, VI idx) {
  if constexpr (B <= 3) return _mm256_permutevar8x32_ps(b.lo, idx);
  const V lo = _mm256_permutevar8x32_ps(b.lo, idx), hi = _mm256_permutevar8x32_ps(b.hi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
// 2^n for integral n in [-126, 127], through the exponent field
inline V exp2i(V n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
// dst[k * ds + i] = src[i * ss + k] for i, k < 8 (an 8 x 8 block, rows ss / ds floats apart)
inline void transpose_block(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ss);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm256_permute2f128_ps(r[j], r[j + 4], 0x20);
    t[j + 4] = _mm256_permute2f128_ps(r[j], r[j + 4], 0x31);
  }
  for (int k = 0; k < 8; ++k) _mm256_storeu_ps(dst + k * ds, t[k]);
}
inline V round_near(V t) { return _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
constexpr int WD = 4;
using VD = __m256d;
inline VD zerod() { return _mm256_setzero_pd(); }
inline VD set1d(double x) { return _mm256_set1_pd(x); }
inline VD loadud(const double* p) { return _mm256_loadu_pd(p); }
inline void storeud(double* p, VD v) { _mm256_storeu_pd(p, v); }
inline VD fmaddd(VD a, VD b, VD c) { return _mm256_fmadd_pd(a, b, c); }
inline void store_floats(float* p, VD v) { _mm_storeu_ps(p, _mm256_cvtpd_ps(v)); }
inline int count_below(const float* bounds16, float u) {
  const __m256 uu = _mm256_set1_ps(u);
  const int lo = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(bounds16), uu, _CMP_LT_OQ));
  const int hi = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(bounds16 + 8), uu, _CMP_LT_OQ));
  return __builtin_popcount(lo) + __builtin_popcount(hi);
}
#else
#error "the tq-vllm CPU kernels need AVX-512 (F, DQ, BW, VL) or AVX2 with FMA and F16C"
#endif

// dst [n] = src [n] of dtype dt (a row of the model's tensor) as float, with a per-channel
// transform as tq_vllm.calibration.LayerTransform applies it in float32 — x - mean, then
// / scale (keys, values) or * scale (mul_scale: queries), each operation rounded once —
// and its result rounded back to dt, as the transform's .to(x.dtype) does. mean / scale
// null: that step is skipped (neither: the row as is). W elements per step (the same
// IEEE operations per element), the last n % W one by one.
inline void load_row(const void* src, int dt, int64_t n, const float* mean, const float* scale,
                     bool mul_scale, float* dst) {
  const bool tf = mean != nullptr || scale != nullptr;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    V x = load_elems(src, dt, i);
    if (tf) {
      if (mean != nullptr) x = sub(x, loadu(mean + i));
      if (scale != nullptr) x = mul_scale ? mul(x, loadu(scale + i)) : div_(x, loadu(scale + i));
      x = round_to_v(x, dt);
    }
    storeu(dst + i, x);
  }
  for (; i < n; ++i) {
    float y = elem_at(src, dt, i);
    if (tf) {
      if (mean != nullptr) y = y - mean[i];
      if (scale != nullptr) y = mul_scale ? y * scale[i] : y / scale[i];
      y = round_to(y, dt);
    }
    dst[i] = y;
  }
}

// Whether every element of x [n] is finite.
inline bool all_finite(const float* x, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W)
    if (!finite_lanes(loadu(x + i))) return false;
  for (; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

// exp(x) for the softmax (x <= 0 region); 2^f by a degree-6 polynomial, |rel err| < 2e-7.
inline V vexp(V x) {
  x = vmax(x, set1(-87.0f));
  const V t = mul(x, set1(1.4426950408889634f));
  const V n = round_near(t);
  const V f = mul(sub(t, n), set1(0.6931471805599453f));
  V p = set1(1.0f / 720);
  p = fmadd(p, f, set1(1.0f / 120));
  p = fmadd(p, f, set1(1.0f / 24));
  p = fmadd(p, f, set1(1.0f / 6));
  p = fmadd(p, f, set1(0.5f));
  p = fmadd(p, f, set1(1.0f));
  p = fmadd(p, f, set1(1.0f));
  return mul(p, exp2i(n));
}

}  // namespace
