// tq-vllm: SIMD decode attention over the packed TurboQuant cache (CPU).
//
// Same algorithm and slot byte map as kernels/cpu_numba.py (the descriptor layout
// is documented there); tested against tq_vllm.reference.tq_paged_attention.
// Built twice by kernels/cpu_native.py: with AVX-512 (W = 16 lanes) or with AVX2 +
// FMA + F16C (W = 8 lanes); only the primitives in the `simd` section differ.
// One task = (sequence, KV head, KV split). Inside a task, tokens are taken in
// tiles of TILE: each token's key is decoded once (W codes -> one permute from a
// 16-entry codebook held in registers), scored against the G query heads of its KV
// head, the QJL bias comes from the sign bits as a masked sum of the sketched query,
// then one online-softmax update per tile, and the values are decoded chunk by chunk
// straight into the accumulators. Nothing dequantized leaves L1.
// Keys with the offset choice: the first key norm's sign bit flags a key stored with
// its offset o; norms are read as magnitudes and a flagged key's logit loses <q, o>
// (q_off, per query head, from the launcher).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int TILE = 16;    // tokens per softmax update
constexpr int MAX_D = 256;  // largest supported head_dim
constexpr int MAX_G = 16;   // largest supported query heads per KV head

struct Desc {
  int64_t norm_off, ngroups, sign_off;
  int64_t seg_off[2], bits[2], dim[2];
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
inline float reduce_add(V v) { return _mm512_reduce_add_ps(v); }
inline float reduce_max(V v) { return _mm512_reduce_max_ps(v); }
inline VI lane_shifts(int bits) {
  return _mm512_mullo_epi32(_mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0),
                            _mm512_set1_epi32(bits));
}
inline Book make_book(const float* c) { return {_mm512_loadu_ps(c)}; }
// W consecutive codes at byte p: lanes 0-7 from the first B bytes, 8-15 from the next B.
template <int B>
inline VI codes(const uint8_t* p, VI shifts) {
  const uint32_t w0 = load_le<B>(p), w1 = load_le<B>(p + B);
  __m512i w = _mm512_inserti32x8(_mm512_castsi256_si512(_mm256_set1_epi32((int)w0)),
                                 _mm256_set1_epi32((int)w1), 1);
  return _mm512_and_si512(_mm512_srlv_epi32(w, shifts), _mm512_set1_epi32((1 << B) - 1));
}
template <int B>
inline V lookup(const Book& b, VI idx) { return _mm512_permutexvar_ps(idx, b.cb); }
// v where the sign bit at `signs` (bit k of the chunk) is set, else 0
inline V select_set(const uint8_t* signs, V v) {
  uint16_t m;
  std::memcpy(&m, signs, 2);
  return _mm512_maskz_mov_ps((__mmask16)m, v);
}
inline V exp2i(V n) { return _mm512_scalef_ps(set1(1.0f), n); }
inline V round_near(V t) { return _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
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
template <int B>
inline VI codes(const uint8_t* p, VI shifts) {
  const __m256i w = _mm256_set1_epi32((int)load_le<B>(p));
  return _mm256_and_si256(_mm256_srlv_epi32(w, shifts), _mm256_set1_epi32((1 << B) - 1));
}
// Codes of up to 3 bits: one 8-lane permute. 4 bits: two, and code bit 3 (moved to the
// sign bit) picks one.
template <int B>
inline V lookup(const Book& b, VI idx) {
  if constexpr (B <= 3) return _mm256_permutevar8x32_ps(b.lo, idx);
  const V lo = _mm256_permutevar8x32_ps(b.lo, idx), hi = _mm256_permutevar8x32_ps(b.hi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
inline V select_set(const uint8_t* signs, V v) {
  const __m256i bit = _mm256_set_epi32(128, 64, 32, 16, 8, 4, 2, 1);
  const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(signs[0]), bit), bit);
  return _mm256_and_ps(v, _mm256_castsi256_ps(m));
}
// 2^n for integral n in [-126, 127], through the exponent field
inline V exp2i(V n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline V round_near(V t) { return _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
#else
#error "tq_decode_cpu.cpp needs AVX-512 (F, DQ, BW, VL) or AVX2 with FMA and F16C"
#endif

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

// ----------------------------------------------------------------------- kernel body

template <int B>
inline void decode_group(const uint8_t* seg, int dim, const Book& cb, VI shifts, V n, float* out) {
  for (int k = 0; k < dim; k += W)
    storeu(out + k, mul(lookup<B>(cb, codes<B>(seg + B * (k / 8), shifts)), n));
}

struct Codebooks {
  Book cb[2];
  VI shifts[2];
};

Codebooks make_codebooks(const Desc& d, const float* books) {
  Codebooks c{};
  for (int g = 0; g < d.ngroups; ++g) {
    c.cb[g] = make_book(books + 16 * g);
    c.shifts[g] = lane_shifts((int)d.bits[g]);
  }
  return c;
}

// Rotated-domain reconstruction (norms applied) of one K or V slot into out[d].
inline void decode_vec(const uint8_t* slot, const Desc& d, const Codebooks& c, float* out) {
  int j = 0;
  for (int g = 0; g < d.ngroups; ++g) {
    const V n = set1(std::fabs(half_at(slot + d.norm_off + 2 * g)));  // sign: offset flag
    const uint8_t* seg = slot + d.seg_off[g];
    const int dim = (int)d.dim[g];
    switch (d.bits[g]) {
      case 1: decode_group<1>(seg, dim, c.cb[g], c.shifts[g], n, out + j); break;
      case 2: decode_group<2>(seg, dim, c.cb[g], c.shifts[g], n, out + j); break;
      case 3: decode_group<3>(seg, dim, c.cb[g], c.shifts[g], n, out + j); break;
      default: decode_group<4>(seg, dim, c.cb[g], c.shifts[g], n, out + j); break;
    }
    j += dim;
  }
}

inline float dot(const float* a, const float* b, int d) {
  V acc = zero();
  for (int k = 0; k < d; k += W) acc = fmadd(loadu(a + k), loadu(b + k), acc);
  return reduce_add(acc);
}

// sum_j q[j] * (bit_j ? +1 : -1) = 2 * (sum over set bits) - q_sum, q_sum = sum_j q[j]
inline float sign_dot(const uint8_t* signs, const float* q, float q_sum, int d) {
  V pos = zero();
  for (int k = 0; k < d; k += W) pos = add(pos, select_set(signs + k / 8, loadu(q + k)));
  return 2.0f * reduce_add(pos) - q_sum;
}

// acc[g][k .. k+W) += sum_i pn[g][i] * c[code_i] over the n tokens of a tile, for one
// chunk of W coordinates of a B-bit group at byte `off` of each slot; pn already holds
// p * (the token's group norm). Chunk-outer order keeps the G accumulators in
// registers across the tile instead of loading and storing them per token.
template <int B>
inline void accumulate_chunk(const uint8_t* const* slots, int n, int64_t off, const Book& cb,
                             VI shifts, const float (*pn)[TILE], int G, float (*acc)[MAX_D], int k) {
  V a[MAX_G];
  for (int g = 0; g < G; ++g) a[g] = loadu(acc[g] + k);
  for (int i = 0; i < n; ++i) {
    const V c = lookup<B>(cb, codes<B>(slots[i] + off, shifts));
    for (int g = 0; g < G; ++g) a[g] = fmadd(set1(pn[g][i]), c, a[g]);
  }
  for (int g = 0; g < G; ++g) storeu(acc[g] + k, a[g]);
}

inline void matvec(const float* m, const float* x, int d, float* y) {  // y = M x, M [d, d]
  for (int e = 0; e < d; ++e) y[e] = dot(m + (int64_t)e * d, x, d);
}

inline void matvec_t(const float* m, const float* x, int d, float* y) {  // y = M^T x
  for (int k = 0; k < d; k += W) storeu(y + k, zero());
  for (int e = 0; e < d; ++e) {
    const V xe = set1(x[e]);
    for (int k = 0; k < d; k += W) storeu(y + k, fmadd(xe, loadu(m + (int64_t)e * d + k), loadu(y + k)));
  }
}

}  // namespace

// Decode attention for B sequences, one query token each.
//   q [B, Hq, d] float32 (original domain); q_off [B, Hq] <q, o> or null (no key offset)
//   rot_k, rot_v [H, d, d]; sketch [d, d] or null
//   out [B, Hq, d] float32 (original domain)
// Returns 0, or -1 when a shape is outside what the kernel handles.
extern "C" int tq_decode_cpu(
    const uint8_t* cache, int64_t s_blk, int64_t s_head, int64_t s_tok,
    const int64_t* block_table, int64_t bt_stride, const int64_t* seq_lens,
    const float* q, const float* q_off, const float* rot_k, const float* sketch,
    const float* rot_v,
    int64_t B, int64_t Hq, int64_t H, int64_t d, int64_t block_size, int64_t n_splits,
    int64_t split_tokens,
    float scale, float qjl_scale, const int64_t* kdesc_p, const float* k_books,
    const int64_t* vdesc_p, const float* v_books, float* out, int num_threads) {
  const int64_t G = Hq / H;
  if (d % 16 || d > MAX_D || G > MAX_G || Hq % H || block_size % TILE || split_tokens % TILE) return -1;
  for (const int64_t* desc : {kdesc_p, vdesc_p})
    for (int64_t g = 0; g < desc[1]; ++g)
      if (desc[5 + 3 * g] % W) return -1;  // a group must be whole vectors
  const Desc kd = read_desc(kdesc_p), vd = read_desc(vdesc_p);
  const Codebooks kc = make_codebooks(kd, k_books), vc = make_codebooks(vd, v_books);
  const bool qjl = kd.sign_off >= 0 && sketch != nullptr;
  std::vector<float> q_rot(B * Hq * d), q_sk(qjl ? B * Hq * d : 0);
  std::vector<float> acc_out(B * Hq * n_splits * d), m_out(B * Hq * n_splits), l_out(B * Hq * n_splits);

  // 1. rotate (and sketch) each query once per step
#pragma omp parallel for num_threads(num_threads)
  for (int64_t i = 0; i < B * Hq; ++i) {
    const int64_t h = (i % Hq) / G;
    matvec(rot_k + h * d * d, q + i * d, (int)d, q_rot.data() + i * d);
    if (qjl) matvec(sketch, q_rot.data() + i * d, (int)d, q_sk.data() + i * d);
  }
  // 2. split-KV attention: one task per (sequence, KV head, split)
  const int64_t ntasks = B * H * n_splits;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t task = 0; task < ntasks; ++task) {
    const int64_t b = task / (H * n_splits), h = (task / n_splits) % H, sp = task % n_splits;
    const int64_t seq = seq_lens[b];
    // fixed runs of split_tokens (a multiple of TILE): how a sequence is split does not
    // depend on the batch. Splits start on TILE boundaries; with block_size % TILE == 0 a
    // tile never crosses a block, so one block-table lookup serves the whole tile
    const int64_t t0 = sp * split_tokens, t1 = std::min(seq, t0 + split_tokens);
    alignas(64) float kt[MAX_D];
    alignas(64) float acc[MAX_G][MAX_D];
    alignas(64) float s[MAX_G][TILE];
    float m[MAX_G], l[MAX_G];
    for (int g = 0; g < G; ++g) {
      m[g] = -INFINITY;
      l[g] = 0.f;
      std::fill(acc[g], acc[g] + d, 0.f);
    }
    const float* qb = q_rot.data() + (b * Hq + h * G) * d;
    const float* qs = qjl ? q_sk.data() + (b * Hq + h * G) * d : nullptr;
    float qs_sum[MAX_G];
    for (int g = 0; g < G && qjl; ++g) {
      V t = zero();
      for (int k = 0; k < d; k += W) t = add(t, loadu(qs + g * d + k));
      qs_sum[g] = reduce_add(t);
    }
    const int64_t* row = block_table + b * bt_stride;
    for (int64_t tt = t0; tt < t1; tt += TILE) {
      const int n = (int)std::min<int64_t>(TILE, t1 - tt);
      const uint8_t* tile = cache + row[tt / block_size] * s_blk + h * s_head + (tt % block_size) * s_tok;
      const uint8_t* slots[TILE];
      for (int i = 0; i < n; ++i) slots[i] = tile + i * s_tok;
      for (int i = 0; i < n; ++i) {
        decode_vec(slots[i], kd, kc, kt);
        const float gamma = qjl ? qjl_scale * half_at(slots[i] + kd.norm_off + 2 * kd.ngroups) : 0.f;
        const bool flagged = q_off != nullptr && (slots[i][kd.norm_off + 1] & 0x80);
        for (int g = 0; g < G; ++g) {
          float sc = dot(qb + g * d, kt, (int)d);
          if (qjl) sc += gamma * sign_dot(slots[i] + kd.sign_off, qs + g * d, qs_sum[g], (int)d);
          if (flagged) sc -= q_off[b * Hq + h * G + g];
          s[g][i] = sc * scale;
        }
      }
      alignas(64) float p[MAX_G][TILE];
      for (int g = 0; g < G; ++g) {
        for (int i = n; i < TILE; ++i) s[g][i] = -INFINITY;
        V mv = loadu(s[g]);
        for (int i = W; i < TILE; i += W) mv = vmax(mv, loadu(s[g] + i));
        const float m_new = std::max(m[g], reduce_max(mv));
        const float corr = std::exp(m[g] - m_new);
        V lsum = zero();
        for (int i = 0; i < TILE; i += W) {
          const V pv = vexp(sub(loadu(s[g] + i), set1(m_new)));
          storeu(p[g] + i, pv);
        }
        for (int i = n; i < TILE; ++i) p[g][i] = 0.f;  // vexp clamps: exp(-inf) is not 0
        for (int i = 0; i < TILE; i += W) lsum = add(lsum, loadu(p[g] + i));
        l[g] = l[g] * corr + reduce_add(lsum);
        m[g] = m_new;
        if (corr != 1.f) {
          const V cv = set1(corr);
          for (int k = 0; k < d; k += W) storeu(acc[g] + k, mul(loadu(acc[g] + k), cv));
        }
      }
      int j = 0;
      for (int vg = 0; vg < vd.ngroups; ++vg) {
        alignas(64) float pn[MAX_G][TILE];
        for (int i = 0; i < n; ++i) {
          const float nv = half_at(slots[i] + vd.norm_off + 2 * vg);
          for (int g = 0; g < G; ++g) pn[g][i] = p[g][i] * nv;
        }
        for (int k = 0; k < vd.dim[vg]; k += W) {
          const int64_t off = vd.seg_off[vg] + vd.bits[vg] * (k / 8);
          switch (vd.bits[vg]) {
            case 1: accumulate_chunk<1>(slots, n, off, vc.cb[vg], vc.shifts[vg], pn, (int)G, acc, j + k); break;
            case 2: accumulate_chunk<2>(slots, n, off, vc.cb[vg], vc.shifts[vg], pn, (int)G, acc, j + k); break;
            case 3: accumulate_chunk<3>(slots, n, off, vc.cb[vg], vc.shifts[vg], pn, (int)G, acc, j + k); break;
            default: accumulate_chunk<4>(slots, n, off, vc.cb[vg], vc.shifts[vg], pn, (int)G, acc, j + k); break;
          }
        }
        j += (int)vd.dim[vg];
      }
    }
    for (int g = 0; g < G; ++g) {
      const int64_t o = (b * Hq + h * G + g) * n_splits + sp;
      m_out[o] = m[g];
      l_out[o] = l[g];
      std::memcpy(acc_out.data() + o * d, acc[g], d * sizeof(float));
    }
  }

  // 3. log-sum-exp combine of the splits, then rotate back once: out = R_v^T o
#pragma omp parallel for num_threads(num_threads)
  for (int64_t i = 0; i < B * Hq; ++i) {
    const int64_t h = (i % Hq) / G;
    const float* mi = m_out.data() + i * n_splits;
    const float* li = l_out.data() + i * n_splits;
    float mx = -INFINITY;
    for (int64_t sp = 0; sp < n_splits; ++sp) mx = std::max(mx, mi[sp]);
    alignas(64) float o[MAX_D];
    std::fill(o, o + d, 0.f);
    float denom = 0.f;
    for (int64_t sp = 0; sp < n_splits; ++sp) {
      if (li[sp] == 0.f) continue;  // empty split
      const float w = std::exp(mi[sp] - mx);
      denom += w * li[sp];
      const float* a = acc_out.data() + (i * n_splits + sp) * d;
      for (int k = 0; k < d; ++k) o[k] += w * a[k];
    }
    const float inv = denom > 0.f ? 1.f / denom : 0.f;
    for (int k = 0; k < d; ++k) o[k] *= inv;
    matvec_t(rot_v + h * d * d, o, (int)d, out + i * d);
  }
  return 0;
}
