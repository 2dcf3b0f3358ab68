// tq-vllm: AVX-512 decode attention over the packed TurboQuant cache (CPU).
//
// Same algorithm and slot byte map as kernels/cpu_numba.py (the descriptor layout
// is documented there); tested against tq_vllm.reference.tq_paged_attention.
// One task = (sequence, KV head, KV split). Inside a task, tokens are taken in
// tiles of TILE: each token's key is decoded once (16 codes -> one vpermps from a
// 16-entry codebook register), scored against the G query heads of its KV head,
// the QJL bias comes from the sign bits as a masked sum of the sketched query,
// then one online-softmax update per tile and the values are decoded and
// accumulated. Nothing dequantized leaves L1.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int TILE = 16;    // tokens per softmax update: one zmm of scores
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

// 16 consecutive B-bit codes (LSB-first stream) starting at byte p -> 16 int32 lanes.
// Lanes 0-7 come from the first B bytes, lanes 8-15 from the next B bytes; B is a
// compile-time constant so the two loads are plain moves, never a memcpy call.
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

template <int B>
inline __m512i codes16(const uint8_t* p, __m512i shifts) {
  const uint32_t w0 = load_le<B>(p), w1 = load_le<B>(p + B);
  __m512i w = _mm512_inserti32x8(_mm512_castsi256_si512(_mm256_set1_epi32((int)w0)),
                                 _mm256_set1_epi32((int)w1), 1);
  return _mm512_and_si512(_mm512_srlv_epi32(w, shifts), _mm512_set1_epi32((1 << B) - 1));
}

template <int B>
inline void decode_group(const uint8_t* seg, int dim, __m512 cb, __m512i shifts, __m512 n, float* out) {
  for (int k = 0; k < dim; k += 16)
    _mm512_storeu_ps(out + k, _mm512_mul_ps(_mm512_permutexvar_ps(codes16<B>(seg + 2 * B * (k / 16), shifts), cb), n));
}

struct Codebooks {
  __m512 cb[2];
  __m512i shifts[2];
};

Codebooks make_codebooks(const Desc& d, const float* books) {
  Codebooks c{};
  const __m512i lane8 = _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int g = 0; g < d.ngroups; ++g) {
    c.cb[g] = _mm512_loadu_ps(books + 16 * g);
    c.shifts[g] = _mm512_mullo_epi32(lane8, _mm512_set1_epi32((int)d.bits[g]));
  }
  return c;
}

// Rotated-domain reconstruction (norms applied) of one K or V slot into out[d].
inline void decode_vec(const uint8_t* slot, const Desc& d, const Codebooks& c, float* out) {
  int j = 0;
  for (int g = 0; g < d.ngroups; ++g) {
    const __m512 n = _mm512_set1_ps(half_at(slot + d.norm_off + 2 * g));
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
  __m512 acc = _mm512_setzero_ps();
  for (int k = 0; k < d; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc);
  return _mm512_reduce_add_ps(acc);
}

// sum_j q[j] * (bit_j ? +1 : -1)
inline float sign_dot(const uint8_t* signs, const float* q, int d) {
  __m512 pos = _mm512_setzero_ps(), all = _mm512_setzero_ps();
  for (int k = 0; k < d; k += 16) {
    uint16_t m;
    std::memcpy(&m, signs + k / 8, 2);
    __m512 v = _mm512_loadu_ps(q + k);
    all = _mm512_add_ps(all, v);
    pos = _mm512_mask_add_ps(pos, (__mmask16)m, pos, v);
  }
  return 2.0f * _mm512_reduce_add_ps(pos) - _mm512_reduce_add_ps(all);
}

// exp(x) for x <= 0 region used by softmax; 2^f by a degree-6 polynomial, |rel err| < 2e-7.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline void matvec(const float* m, const float* x, int d, float* y) {  // y = M x, M [d, d]
  for (int e = 0; e < d; ++e) y[e] = dot(m + (int64_t)e * d, x, d);
}

inline void matvec_t(const float* m, const float* x, int d, float* y) {  // y = M^T x
  for (int k = 0; k < d; k += 16) _mm512_storeu_ps(y + k, _mm512_setzero_ps());
  for (int e = 0; e < d; ++e) {
    const __m512 xe = _mm512_set1_ps(x[e]);
    for (int k = 0; k < d; k += 16)
      _mm512_storeu_ps(y + k, _mm512_fmadd_ps(xe, _mm512_loadu_ps(m + (int64_t)e * d + k), _mm512_loadu_ps(y + k)));
  }
}

}  // namespace

// Decode attention for B sequences, one query token each.
//   q [B, Hq, d] float32 (original domain); rot_k, rot_v [H, d, d]; sketch [d, d] or null
//   out [B, Hq, d] float32 (original domain)
// Returns 0, or -1 when a shape is outside what the kernel handles.
extern "C" int tq_decode_avx512(
    const uint8_t* cache, int64_t s_blk, int64_t s_head, int64_t s_tok,
    const int64_t* block_table, int64_t bt_stride, const int64_t* seq_lens,
    const float* q, const float* rot_k, const float* sketch, const float* rot_v,
    int64_t B, int64_t Hq, int64_t H, int64_t d, int64_t block_size, int64_t n_splits,
    float scale, float qjl_scale, const int64_t* kdesc_p, const float* k_books,
    const int64_t* vdesc_p, const float* v_books, float* out, int num_threads) {
  const int64_t G = Hq / H;
  if (d % 16 || d > MAX_D || G > MAX_G || Hq % H || block_size % TILE) return -1;
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
    // splits start on TILE boundaries; with block_size % TILE == 0 a tile never
    // crosses a block, so one block-table lookup serves the whole tile
    const int64_t chunk = ((seq + n_splits - 1) / n_splits + TILE - 1) / TILE * TILE;
    const int64_t t0 = sp * chunk, t1 = std::min(seq, t0 + chunk);
    alignas(64) float kt[MAX_D], vt[MAX_D];
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
    const int64_t* row = block_table + b * bt_stride;
    for (int64_t tt = t0; tt < t1; tt += TILE) {
      const int n = (int)std::min<int64_t>(TILE, t1 - tt);
      const uint8_t* tile = cache + row[tt / block_size] * s_blk + h * s_head + (tt % block_size) * s_tok;
      const uint8_t* slots[TILE];
      for (int i = 0; i < n; ++i) slots[i] = tile + i * s_tok;
      for (int i = 0; i < n; ++i) {
        decode_vec(slots[i], kd, kc, kt);
        const float gamma = qjl ? qjl_scale * half_at(slots[i] + kd.norm_off + 2 * kd.ngroups) : 0.f;
        for (int g = 0; g < G; ++g) {
          float sc = dot(qb + g * d, kt, (int)d);
          if (qjl) sc += gamma * sign_dot(slots[i] + kd.sign_off, qs + g * d, (int)d);
          s[g][i] = sc * scale;
        }
      }
      const __mmask16 valid = (__mmask16)((1u << n) - 1);
      alignas(64) float p[MAX_G][TILE];
      for (int g = 0; g < G; ++g) {
        const __m512 sv = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), valid, s[g]);
        const float m_new = std::max(m[g], _mm512_reduce_max_ps(sv));
        const float corr = std::exp(m[g] - m_new);
        const __m512 pv = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(m_new))));
        _mm512_store_ps(p[g], pv);
        l[g] = l[g] * corr + _mm512_reduce_add_ps(pv);
        m[g] = m_new;
        if (corr != 1.f) {
          const __m512 cv = _mm512_set1_ps(corr);
          for (int k = 0; k < d; k += 16)
            _mm512_store_ps(acc[g] + k, _mm512_mul_ps(_mm512_load_ps(acc[g] + k), cv));
        }
      }
      for (int i = 0; i < n; ++i) {
        decode_vec(slots[i], vd, vc, vt);
        for (int g = 0; g < G; ++g) {
          const __m512 pw = _mm512_set1_ps(p[g][i]);
          for (int k = 0; k < d; k += 16)
            _mm512_store_ps(acc[g] + k, _mm512_fmadd_ps(pw, _mm512_load_ps(vt + k), _mm512_load_ps(acc[g] + k)));
        }
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
