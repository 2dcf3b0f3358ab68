// tq-vllm: SIMD decode attention over the packed TurboQuant cache (CPU).
//
// Same algorithm and slot byte map as kernels/cpu_numba.py (the descriptor layout
// is documented there); tested against tq_vllm.reference.tq_paged_attention.
// Built twice by kernels/cpu_native.py: with AVX-512 (W = 16 lanes) or with AVX2 +
// FMA + F16C (W = 8 lanes); only the primitives in the `simd` section differ.
// One task = (sequence, KV head, KV split). Inside a task, tokens are taken in
// tiles of TILE. A tile's keys are laid out coordinate-major (KeyTile: lanes are its
// tokens): per 8 coordinates one gather of the tokens' code bytes, then a shift and a
// permute from the 16-entry codebook held in a register per coordinate; each logit is
// then a sum over coordinates of (query coordinate) x (key vector), TILE logits per FMA,
// the group norms applied per group; the QJL bias the same way, the sign bits read as a
// 1-bit group with codebook {-1, +1} against the sketched queries (scaled by c * ||r||).
// Then one online-softmax update per tile, and the values are decoded chunk by chunk
// straight into the accumulators. Trellis codes (tq_vllm.trellis: a code decodes with the
// stream bits before it, a table lookup per coordinate) are decoded into a stack scratch
// of TILE tokens first, as prefill does for every tile's values.
// Keys with the offset choice: the first key norm's sign bit flags a key stored with
// its offset o; norms are read as magnitudes and a flagged key's logit loses <q, o>
// (q_off, per query head, computed with the query's rotation).
#include <atomic>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tq_cpu_common.h"

namespace {

constexpr int TILE = 16;    // tokens per softmax update: the lanes of a key vector (AVX-512)

// ----------------------------------------------------------------------- kernel body
//
// The task body is compiled once per GQA group size G = 1..8 (GT; 0 = any G up to
// MAX_G, read at run time) so that the G per-query-head accumulators are registers, not
// stack arrays reloaded and stored around every FMA. With G <= PAIR_MAX_G two chunks run
// side by side (two accumulator sets): twice the independent FMA chains to hide their
// latency, and each broadcast of a softmax weight feeds two FMAs.

// 2 x G accumulators + codebook + temporaries fit 16 ymm registers; pairing at G = 7
// spills them (measured 5-40% slower than single chunks on AVX2)
constexpr int PAIR_MAX_G = 4;

struct Codebooks {
  Book cb[2];
  VI shifts[2];
  Book sign;      // QJL sign bits as a 1-bit group: code 0 -> -1, 1 -> +1 (keys with QJL)
  const float* tables;  // trellis codes: decode tables [ngroups][tab_stride], else null
};

// books: [ngroups][16] codebooks, or for trellis codes the decode tables [ngroups][tab_stride]
Codebooks make_codebooks(const Desc& d, const float* books) {
  Codebooks c{};
  c.tables = d.trellis ? books : nullptr;
  for (int g = 0; g < d.ngroups && !d.trellis; ++g) {
    // the codebook repeated with period 2^bits: lookups read only the index's low bits
    // (3 per permute on AVX2, 4 on AVX-512) and codes are not masked, so the bits above
    // a code (its neighbours') must not change the entry
    alignas(64) float rep[16];
    for (int i = 0; i < 16; ++i) rep[i] = books[16 * g + i % (1 << d.bits[g])];
    c.cb[g] = make_book(rep);
    c.shifts[g] = lane_shifts((int)d.bits[g]);
  }
  if (d.sign_off >= 0) {
    alignas(64) float pm[16];
    for (int i = 0; i < 16; ++i) pm[i] = i % 2 ? 1.f : -1.f;  // period 2, as above
    c.sign = make_book(pm);
  }
  return c;
}

// W centroids (unit scale) of the chunk at coordinate k of a B-bit group
template <int B>
inline V centroids(const uint8_t* seg, int k, const Book& cb, VI shifts) {
  return lookup<B>(cb, codes<B>(seg + B * (k / 8), shifts));
}

// The W centroids (unit scale) of a chunk: decoded from the codes in registers, or
// (SCR, prefill) read back from a tile already decoded into `scr` — the same floats, so
// the arithmetic that follows is the same either way.
template <int B, bool SCR>
inline V chunk(const uint8_t* seg, const float* scr, int k, const Book& cb, VI shifts) {
  if constexpr (SCR) return loadu(scr + k);
  else return centroids<B>(seg, k, cb, shifts);
}

// Prefill runs RB consecutive rows of one sequence through a decoded tile together: each
// key vector of the tile's layout and each value chunk is loaded once for several
// (row, query head) pairs, and the RB x G (x 2 with PAIR) independent value chains hide
// each other's latency (one row's value sums over a tile are G x 2 chains of 16 dependent
// FMAs: latency bound). Each pair's own arithmetic is exactly decode's, so every row keeps
// its decode bits. Decode runs RB = 1.
constexpr int NUM_VREGS = W == 16 ? 32 : 16;  // zmm0-31 (AVX-512) or ymm0-15 (AVX2)
constexpr int MAX_RB = 4;
// A pass keeps each (row, query head)'s TILE scores, weights and weights x norms (64 B
// each) on the stack beside the tile's key layout and decoded values. Bounding the pairs
// kept L1 from overflowing with an earlier, larger per-pair score tile (G = 7: 3 rows
// were slower than 2); with the layout since then 16 and 32 measure the same.
constexpr int MAX_ROW_HEADS = 16;

// Rows per pass for group size GT: RB x (accumulators per row) + the two chunks and two
// temporaries fit the vector registers, and RB x G pairs fit MAX_ROW_HEADS.
template <int GT>
constexpr int rows_per_pass() {
  if (GT == 0) return 1;
  const int per_row = GT <= PAIR_MAX_G ? 2 * GT : GT;
  int rb = (NUM_VREGS - 4) / per_row;
  rb = rb < MAX_ROW_HEADS / GT ? rb : MAX_ROW_HEADS / GT;
  return rb < 1 ? 1 : (rb > MAX_RB ? MAX_RB : rb);
}

// acc[r][g][k ..] += sum_i pn[r][g][i] * c[code_i] over the n tokens of a tile, for the
// chunk at byte `off` of each slot (and, PAIR, the next chunk too); pn already holds p *
// (the token's group norm), a scalar the FMA broadcasts from memory (AVX-512's embedded
// broadcast: no shuffle uop, and the tile's weights take 1/W of the L1 a pre-broadcast
// copy took). Chunk-outer order keeps the accumulators in registers across the
// tile. SCR: the tile's values are already decoded, token i at scr + i * d (k: the
// rotated coordinate, as in acc).
template <int B, int GA, int RB, bool PAIR, bool SCR>
inline void accumulate(const uint8_t* const* slots, const float* scr, int64_t d, int n,
                       int64_t off, const Book& cb, VI shifts, const float (*pn)[GA][TILE], int G,
                       float (*const* acc)[MAX_D], int k) {
  V a[RB][GA], b[RB][GA];
  for (int r = 0; r < RB; ++r)
    for (int g = 0; g < G; ++g) {
      a[r][g] = loadu(acc[r][g] + k);
      if constexpr (PAIR) b[r][g] = loadu(acc[r][g] + k + W);
    }
  for (int i = 0; i < n; ++i) {
    const uint8_t* seg = SCR ? nullptr : slots[i] + off;
    const float* row = SCR ? scr + i * d + k : nullptr;
    const V c0 = chunk<B, SCR>(seg, row, 0, cb, shifts);
    if constexpr (PAIR) {
      const V c1 = chunk<B, SCR>(seg, row, W, cb, shifts);
      for (int r = 0; r < RB; ++r)
        for (int g = 0; g < G; ++g) {
          const V p = set1(pn[r][g][i]);
          a[r][g] = fmadd(p, c0, a[r][g]);
          b[r][g] = fmadd(p, c1, b[r][g]);
        }
    } else {
      for (int r = 0; r < RB; ++r)
        for (int g = 0; g < G; ++g) a[r][g] = fmadd(set1(pn[r][g][i]), c0, a[r][g]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int g = 0; g < G; ++g) {
      storeu(acc[r][g] + k, a[r][g]);
      if constexpr (PAIR) storeu(acc[r][g] + k + W, b[r][g]);
    }
}

template <int B, int GA, int RB, bool PAIR, bool SCR>
inline void accumulate_group(const uint8_t* const* slots, const float* scr, int64_t d, int n,
                             int64_t seg_off, int dim, const Book& cb, VI shifts,
                             const float (*pn)[GA][TILE], int G, float (*const* acc)[MAX_D], int j) {
  int k = 0;
  if constexpr (PAIR)
    for (; k + 2 * W <= dim; k += 2 * W)
      accumulate<B, GA, RB, true, SCR>(slots, scr, d, n, seg_off + B * (k / 8), cb, shifts, pn, G, acc, j + k);
  for (; k < dim; k += W)
    accumulate<B, GA, RB, false, SCR>(slots, scr, d, n, seg_off + B * (k / 8), cb, shifts, pn, G, acc, j + k);
}

// Decodes the B-bit groups of one slot's K or V into d unit-scale floats (prefill tiles).
template <int B>
inline void unpack_group(const uint8_t* seg, int dim, const Book& cb, VI shifts, float* dst) {
  for (int k = 0; k < dim; k += W) storeu(dst + k, centroids<B>(seg, k, cb, shifts));
}

// Trellis codes (tq_vllm.trellis): code k of the group decodes to tab[w_k], the window w_k
// being stream bits [B k - S, B k + B) (zeros before the group's start). Eight codes of B
// bits are B bytes of the stream; with the 32 stream bits before them (`hist`) in the low
// half of a 64-bit word, each window is one variable shift and mask, with no dependency
// between codes. `next` gives the run at code k's windows as 64-bit lanes (lo: codes
// k..k+3, hi: k+4..k+7) and takes the run into the history; runs are read in order.
template <int B>
struct TrellisWindows {
  __m256i sh_lo, sh_hi, mask;
  uint32_t hist = 0;
  explicit TrellisWindows(int S)
      : sh_lo(_mm256_add_epi64(_mm256_set1_epi64x(32 - S), _mm256_set_epi64x(3 * B, 2 * B, B, 0))),
        sh_hi(_mm256_add_epi64(sh_lo, _mm256_set1_epi64x(4 * B))),
        mask(_mm256_set1_epi64x((int64_t(1) << (S + B)) - 1)) {}
  void next(const uint8_t* seg, int k, __m256i& lo, __m256i& hi) {
    const uint32_t cur = load_le<B>(seg + B * (k / 8));
    const __m256i ext = _mm256_set1_epi64x((int64_t)(((uint64_t)cur << 32) | hist));
    lo = _mm256_and_si256(_mm256_srlv_epi64(ext, sh_lo), mask);
    hi = _mm256_and_si256(_mm256_srlv_epi64(ext, sh_hi), mask);
    if constexpr (B == 4) hist = cur;
    else hist = (hist >> (8 * B)) | (cur << (32 - 8 * B));
  }
};

// One slot's trellis group: eight table lookups are two 4-lane gathers (AVX2, both builds).
template <int B>
inline void unpack_trellis(const uint8_t* seg, int dim, int S, const float* tab, float* dst) {
  TrellisWindows<B> win(S);
  for (int k = 0; k < dim; k += 8) {
    __m256i lo, hi;
    win.next(seg, k, lo, hi);
    _mm256_storeu_ps(dst + k, _mm256_set_m128(_mm256_i64gather_ps(tab, hi, 4),
                                              _mm256_i64gather_ps(tab, lo, 4)));
  }
}

#if defined(__AVX512F__)
// TRELLIS_REG_ENTRIES: decode tables up to this size (S + B <= 6) are held in four
// registers, loaded once for a tile's slots, and a window's value is a register permute
// (two two-table permutes and a blend on the window's bit 5) instead of a gather: the same
// table entry, so the same bits. Larger tables (the tq{b}-trellis presets' S = 6 codes:
// 512-1024 entries) gather.
constexpr int TRELLIS_REG_ENTRIES = 64;

template <int B>
inline void unpack_trellis_regs(const uint8_t* const* slots, int n_slots, int64_t seg_off,
                                int dim, int S, const float* tab, float* dst, int64_t stride) {
  const int n = 1 << (S + B);
  __m512 t[4];
  for (int q = 0; q < 4; ++q) {  // entries past the table read as 0 and are never selected
    const int left = std::clamp(n - 16 * q, 0, 16);
    t[q] = _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1), tab + 16 * q);
  }
  const __m512i bit5 = _mm512_set1_epi32(32);
  TrellisWindows<B> win(S);
  for (int i = 0; i < n_slots; ++i) {
    const uint8_t* seg = slots[i] + seg_off;
    float* out = dst + i * stride;
    win.hist = 0;
    for (int k = 0; k < dim; k += 8) {
      __m256i lo, hi;
      win.next(seg, k, lo, hi);
      const __m512i idx = _mm512_castsi256_si512(
          _mm256_set_m128i(_mm256_cvtepi64_epi32(hi), _mm256_cvtepi64_epi32(lo)));
      const __m512 v = _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, bit5),
                                            _mm512_permutex2var_ps(t[0], idx, t[1]),
                                            _mm512_permutex2var_ps(t[2], idx, t[3]));
      _mm256_storeu_ps(out + k, _mm512_castps512_ps256(v));  // the 8 windows' values
    }
  }
}
#endif

// One trellis group (B-bit codes at byte seg_off of each slot, decode table tab) of a
// tile's slots into dst + i * stride: unpack_trellis_regs where the table fits registers,
// else unpack_trellis's gathers slot by slot.
template <int B>
inline void unpack_trellis_group(const uint8_t* const* slots, int n_slots, int64_t seg_off,
                                 int dim, int S, const float* tab, float* dst, int64_t stride) {
#if defined(__AVX512F__)
  if ((1 << (S + B)) <= TRELLIS_REG_ENTRIES)
    return unpack_trellis_regs<B>(slots, n_slots, seg_off, dim, S, tab, dst, stride);
#endif
  for (int i = 0; i < n_slots; ++i) unpack_trellis<B>(slots[i] + seg_off, dim, S, tab, dst + i * stride);
}

// A tile's slots (n of them) decoded into dst + i * stride, K or V as `dd` describes:
// unit-scale floats (the group norms are applied by the tile step).
inline void unpack_tile(const uint8_t* const* slots, int n, const Desc& dd, const Codebooks& c,
                        float* dst, int64_t stride) {
  int j = 0;
  for (int g = 0; g < dd.ngroups; ++g) {
    const int64_t off = dd.seg_off[g];
    const int dim = (int)dd.dim[g];
    if (dd.trellis) {
      const int S = (int)dd.trellis;
      const float* tab = c.tables + g * dd.tab_stride;
      switch (dd.bits[g]) {
        case 1: unpack_trellis_group<1>(slots, n, off, dim, S, tab, dst + j, stride); break;
        case 2: unpack_trellis_group<2>(slots, n, off, dim, S, tab, dst + j, stride); break;
        case 3: unpack_trellis_group<3>(slots, n, off, dim, S, tab, dst + j, stride); break;
        default: unpack_trellis_group<4>(slots, n, off, dim, S, tab, dst + j, stride); break;
      }
    } else {
      for (int i = 0; i < n; ++i) {
        const uint8_t* seg = slots[i] + off;
        float* out = dst + i * stride + j;
        switch (dd.bits[g]) {
          case 1: unpack_group<1>(seg, dim, c.cb[g], c.shifts[g], out); break;
          case 2: unpack_group<2>(seg, dim, c.cb[g], c.shifts[g], out); break;
          case 3: unpack_group<3>(seg, dim, c.cb[g], c.shifts[g], out); break;
          default: unpack_group<4>(seg, dim, c.cb[g], c.shifts[g], out); break;
        }
      }
    }
    j += dim;
  }
}

inline float dot(const float* a, const float* b, int d) {
  V acc = zero();
  for (int k = 0; k < d; k += W) acc = fmadd(loadu(a + k), loadu(b + k), acc);
  return reduce_add(acc);
}

// Rows that share one d x d matrix in mat_rows: each matrix vector is loaded once for up
// to MV_ROWS rows, and the MV_ROWS x MV_VECS accumulators stay in registers (a loop that
// stores and reloads y every step waits on that round trip: 64 steps of ~10 cycles).
constexpr int MV_ROWS = 4;
constexpr int MV_VECS = 4;

// y_r = M^T x_r for R rows (x_r at x + r * d, y_r at y + r * d), M [d, d]: each output
// element is summed over e = 0..d-1 in order with one fused multiply-add per term.
template <int R>
inline void mat_rows_fixed(const float* m, const float* x, int d, float* y) {
  for (int k0 = 0; k0 < d; k0 += MV_VECS * W) {
    V acc[R][MV_VECS];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MV_VECS; ++j) acc[r][j] = zero();
    for (int e = 0; e < d; ++e) {
      const float* me = m + (int64_t)e * d + k0;
      V mv[MV_VECS];
      for (int j = 0; j < MV_VECS; ++j) mv[j] = loadu(me + j * W);
      for (int r = 0; r < R; ++r) {
        const V xe = set1(x[r * d + e]);
        for (int j = 0; j < MV_VECS; ++j) acc[r][j] = fmadd(xe, mv[j], acc[r][j]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MV_VECS; ++j) storeu(y + r * d + k0 + j * W, acc[r][j]);
  }
}

// mat_rows_fixed over any number of rows.
inline void mat_rows(const float* m, const float* x, int64_t rows, int d, float* y) {
  int64_t r = 0;
  for (; r + MV_ROWS <= rows; r += MV_ROWS) mat_rows_fixed<MV_ROWS>(m, x + r * d, d, y + r * d);
  switch (rows - r) {
    case 3: mat_rows_fixed<3>(m, x + r * d, d, y + r * d); break;
    case 2: mat_rows_fixed<2>(m, x + r * d, d, y + r * d); break;
    case 1: mat_rows_fixed<1>(m, x + r * d, d, y + r * d); break;
    default: break;
  }
}

struct AmxBooks;  // tq_attend_amx.h
struct Step;
using TaskFn = void (*)(const Step&, int64_t);

// A decode task: row b, KV head h, split sp, whose tokens are t0 .. t1 - 1 (none where t1 <= t0:
// a row shorter than the call's longest has empty splits).
struct TaskSpan {
  int64_t b, h, sp, t0, t1;
};

// Everything a task reads and writes. Rows are query tokens: decode has one per
// sequence (row b reads block-table row b); prefill has one per prompt token (row r reads
// block-table row row_seq[r]). Each row attends to its first seq_lens[r] tokens in
// fixed splits; split sp of row r, query head i lands at split_slot(r, i) + sp.
struct Step {
  const uint8_t* cache;
  int64_t s_blk, s_head, s_tok;
  const int64_t* block_table;
  int64_t bt_stride;
  const int64_t* seq_lens;            // [rows]
  const int64_t* row_seq;             // [rows] or null (decode: row b -> block-table row b)
  const int64_t* row_split;           // [rows + 1] prefix sums of split counts, or null (n_splits each)
  const int64_t* groups;              // prefill: rows [groups[t], groups[t + 1]) share a task
  const float *q_rot, *q_sk, *q_off;  // q_sk null without QJL; q_off null without offsets
  int64_t Hq, H, G, d, block_size, n_splits, split_tokens;
  float scale, qjl_scale;
  Desc kd, vd;
  Codebooks kc, vc;
  float *acc_out, *m_out, *l_out;
  const AmxBooks* amx = nullptr;  // the AMX bodies' tables (tq_attend_amx.h), when they run
  TaskFn f32 = nullptr;  // with amx: the float32 body of the rows amx_row leaves to it

  TaskSpan decode_task(int64_t task) const {
    const int64_t b = task / (H * n_splits), sp = task % n_splits, t0 = sp * split_tokens;
    return {b, (task / n_splits) % H, sp, t0, std::min(seq_lens[b], t0 + split_tokens)};
  }
  int64_t splits_of(int64_t r) const { return row_split ? row_split[r + 1] - row_split[r] : n_splits; }
  int64_t split_slot(int64_t r, int64_t i) const {
    return row_split ? row_split[r] * Hq + i * splits_of(r) : (r * Hq + i) * n_splits;
  }
};

// A tile's keys laid out for the scores, coordinate-major: lanes are the tile's tokens
// (past its n tokens: other slots of the block, with zero norms and masked logits), so
// one query coordinate times one key vector adds that coordinate's term to TILE logits at
// once: no per-token horizontal sums.
struct KeyTile {
  alignas(64) float kt[MAX_D][TILE];  // unit-scale centroids: kt[k][i] = token i's coordinate k
  alignas(64) float st[MAX_D][TILE];  // QJL: sign of the residual's sketch coordinate k, ±1
  alignas(64) float nk[3][TILE];      // |norm| of each key group, then c * ||r|| (QJL)
  alignas(64) float fl[TILE];         // 1 for a key stored with its offset (with q_off)
};

// rows [TILE][d] (token-major; rows n.. zeroed here) -> dst [d][TILE]
inline void transpose_tile(float* rows, int64_t d, int n, float (*dst)[TILE]) {
  std::fill(rows + n * d, rows + TILE * d, 0.f);
  for (int i0 = 0; i0 < TILE; i0 += W)
    for (int64_t k0 = 0; k0 < d; k0 += W) transpose_block(rows + i0 * d + k0, d, dst[k0] + i0, TILE);
}

// kt rows j0 .. j0 + dim - 1 from one B-bit group's codes (seg: the group's bytes in the
// tile's first slot; offs: lane i -> token i's slot): one gather of a 4-byte word per
// token for every 32 / B coordinates (8 at 3 bits: 3 bytes; a word reads up to 3 bytes
// past the group, inside the slot, see check), then a shift and a codebook lookup per
// coordinate. QJL sign bits are the group with B = 1 and codebook {-1, +1}.
template <int B>
inline void gather_group(const uint8_t* seg, const VI* offs, int dim, const Book& cb,
                         float (*kt)[TILE], int j0) {
  constexpr int PER_WORD = B == 3 ? 8 : 32 / B;  // coordinates whose codes fill whole bytes
  for (int k = 0; k < dim; k += PER_WORD)
    for (int tv = 0; tv < TILE / W; ++tv) {
      const VI w = gather_words(seg + B * k / 8, offs[tv]);
      for (int m = 0; m < PER_WORD && k + m < dim; ++m)
        storeu(kt[j0 + k + m] + tv * W, lookup<B>(cb, shift_right(w, B * m)));
    }
}

// T from the tile's n slots (slots[0]: its first; lanes past n read the block's other
// slots, and their logits are masked). Trellis keys decode sequentially: rows [TILE][d]
// holds them decoded by the caller (it is overwritten).
inline void fill_keys(const Step& P, const uint8_t* const* slots, int n, float* rows,
                      KeyTile& T) {
  const int64_t d = P.d;
  VI offs[TILE / W];
  for (int tv = 0; tv < TILE / W; ++tv) offs[tv] = lane_offsets(tv * W * P.s_tok, P.s_tok);
  if (P.kd.trellis) {
    transpose_tile(rows, d, n, T.kt);
  } else {
    int j = 0;
    for (int kg = 0; kg < P.kd.ngroups; ++kg) {
      const uint8_t* seg = slots[0] + P.kd.seg_off[kg];
      const int dim = (int)P.kd.dim[kg];
      const Book& cb = P.kc.cb[kg];
      switch (P.kd.bits[kg]) {
        case 1: gather_group<1>(seg, offs, dim, cb, T.kt, j); break;
        case 2: gather_group<2>(seg, offs, dim, cb, T.kt, j); break;
        case 3: gather_group<3>(seg, offs, dim, cb, T.kt, j); break;
        default: gather_group<4>(seg, offs, dim, cb, T.kt, j); break;
      }
      j += dim;
    }
  }
  for (int kg = 0; kg < P.kd.ngroups; ++kg)
    for (int i = 0; i < TILE; ++i)
      T.nk[kg][i] = i < n ? std::fabs(half_at(slots[i] + P.kd.norm_off + 2 * kg)) : 0.f;
  for (int i = 0; i < TILE; ++i)
    T.fl[i] = i < n && P.q_off != nullptr && (slots[i][P.kd.norm_off + 1] & 0x80) ? 1.f : 0.f;
  if (P.q_sk != nullptr) {  // the sign bits as a 1-bit group with codebook {-1, +1}
    gather_group<1>(slots[0] + P.kd.sign_off, offs, (int)d, P.kc.sign, T.st, 0);
    const int64_t at = P.kd.ngroups;
    for (int i = 0; i < TILE; ++i)
      T.nk[at][i] = i < n ? P.qjl_scale * half_at(slots[i] + P.kd.norm_off + 2 * at) : 0.f;
  }
}

// A logit's dot product over a key group is summed in NPART partial sums, over the
// coordinates k = m (mod NPART) in order, added as (p0 + p1) + (p2 + p3): NPART x (pairs)
// independent FMA chains. This order is the arithmetic of every path (decode, prefill, any
// RB), so a row's logits have the same bits in all of them.
constexpr int NPART = 4;
// (row, query head) pairs scored together: SCORE_PAIRS x NPART accumulators, a key vector
// and a broadcast query coordinate fill the registers.
constexpr int SCORE_PAIRS = W == 16 ? 6 : 3;

// For NP (row, query head) pairs with queries q[p] (rotated, or sketched for QJL; index
// j + k = rotated coordinate): s[p][i] = (first ? 0 : s[p][i]) + nk[i] * sum over the
// group's dim coordinates of q[p][j + k] * kt[j + k][i], for the TILE lanes i.
template <int NP>
inline void score_pairs(const float* const* q, const float (*kt)[TILE], int j, int dim,
                        const float* nk, bool first, float* const* s) {
  static_assert(NPART == 4, "the partial sums are added as (p0 + p1) + (p2 + p3)");
  for (int tv = 0; tv < TILE; tv += W) {
    V a[NP][NPART];
    for (int p = 0; p < NP; ++p)
      for (int m = 0; m < NPART; ++m) a[p][m] = zero();
    for (int k = j; k < j + dim; k += NPART)
      for (int m = 0; m < NPART; ++m) {
        const V kv = loadu(kt[k + m] + tv);
        for (int p = 0; p < NP; ++p) a[p][m] = fmadd(set1(q[p][k + m]), kv, a[p][m]);
      }
    const V nv = loadu(nk + tv);
    for (int p = 0; p < NP; ++p) {
      const V sum = add(add(a[p][0], a[p][1]), add(a[p][2], a[p][3]));
      storeu(s[p] + tv, fmadd(sum, nv, first ? zero() : loadu(s[p] + tv)));
    }
  }
}

// score_pairs over any number of pairs, in the fewest calls of at most SCORE_PAIRS, as
// even as can be: every call keeps several pairs x NPART chains in flight (G = 7 as 6 + 1
// left the last pair's 4 chains latency bound; it now runs as 4 + 3).
inline void score_all(int npairs, const float* const* q, const float (*kt)[TILE], int j, int dim,
                      const float* nk, bool first, float* const* s) {
  int p = 0;
  for (int calls = (npairs + SCORE_PAIRS - 1) / SCORE_PAIRS; calls > 0; --calls) {
    const int take = (npairs - p + calls - 1) / calls;  // ceil of an even share of the rest
    switch (take) {
      case 6: score_pairs<6>(q + p, kt, j, dim, nk, first, s + p); break;
      case 5: score_pairs<5>(q + p, kt, j, dim, nk, first, s + p); break;
      case 4: score_pairs<4>(q + p, kt, j, dim, nk, first, s + p); break;
      case 3: score_pairs<3>(q + p, kt, j, dim, nk, first, s + p); break;
      case 2: score_pairs<2>(q + p, kt, j, dim, nk, first, s + p); break;
      default: score_pairs<1>(q + p, kt, j, dim, nk, first, s + p); break;
    }
    p += take;
  }
}

// One (row, KV head)'s running state: its G query heads' value accumulators, running
// maxima and sums.
struct RowState {
  float (*acc)[MAX_D];
  float* m;
  float* l;
};

// One tile of n tokens (slots) for RB rows, the G query heads q0 + r * Hq .. + G - 1 of
// row r: scores (T: the tile's keys, coordinate-major), QJL bias and offsets, one
// online-softmax update, values into the rows' accumulators. SCR: the tile's values were
// decoded into vscr (token i at i * d) by the caller, shared by several rows; the
// arithmetic is the same as decoding them here, and a row's is the same whatever RB.
template <int GT, int RB, bool SCR>
inline void tile_step(const Step& P, const uint8_t* const* slots, int n, const KeyTile& T,
                      const float* vscr, int64_t q0, const RowState* rs) {
  constexpr int GA = GT > 0 ? GT : MAX_G;           // accumulator array extent
  constexpr bool PAIR = GT > 0 && GT <= PAIR_MAX_G;
  const int G = GT > 0 ? GT : (int)P.G;
  const int64_t d = P.d;
  alignas(64) float s[RB][GA][TILE];
  // scores: each key group over all RB x G (row, query head) pairs, then the QJL bias
  const int npairs = RB * G;
  const float* qp[RB * GA];
  float* sp[RB * GA];
  for (int r = 0; r < RB; ++r)
    for (int g = 0; g < G; ++g) {
      qp[r * G + g] = P.q_rot + (q0 + r * P.Hq + g) * d;
      sp[r * G + g] = s[r][g];
    }
  int jk = 0;
  for (int kg = 0; kg < P.kd.ngroups; ++kg) {
    const int dim = (int)P.kd.dim[kg];
    score_all(npairs, qp, T.kt, jk, dim, T.nk[kg], kg == 0, sp);
    jk += dim;
  }
  if (P.q_sk != nullptr) {  // QJL bias: the ±1 signs dotted with the sketched queries
    for (int r = 0; r < RB; ++r)
      for (int g = 0; g < G; ++g) qp[r * G + g] = P.q_sk + (q0 + r * P.Hq + g) * d;
    score_all(npairs, qp, T.st, 0, (int)d, T.nk[P.kd.ngroups], false, sp);
  }
  // a flagged key's logit loses <q, o>: fl = 1 for those tokens (sc - 1 * q_off is
  // sc - q_off exactly, sc - 0 is sc), then the softmax scale
  const float* fl = T.fl;
  const V scale = set1(P.scale);
  for (int r = 0; r < RB; ++r)
    for (int g = 0; g < G; ++g) {
      const V qo = set1(P.q_off != nullptr ? P.q_off[q0 + r * P.Hq + g] : 0.f);
      for (int i = 0; i < TILE; i += W)
        storeu(s[r][g] + i, mul(sub(loadu(s[r][g] + i), mul(loadu(fl + i), qo)), scale));
    }
  // one online-softmax update per tile, row and query head
  alignas(64) float p[RB][GA][TILE];
  for (int r = 0; r < RB; ++r)
    for (int g = 0; g < G; ++g) {
      float* sg = s[r][g];
      float* pg = p[r][g];
      float& m = rs[r].m[g];
      float& l = rs[r].l[g];
      for (int i = n; i < TILE; ++i) sg[i] = -INFINITY;
      V mv = loadu(sg);
      for (int i = W; i < TILE; i += W) mv = vmax(mv, loadu(sg + i));
      const float m_new = std::max(m, reduce_max(mv));
      const float corr = m_new == m ? 1.f : std::exp(m - m_new);  // exp(0) is 1: skip the call
      V lsum = zero();
      for (int i = 0; i < TILE; i += W) storeu(pg + i, vexp(sub(loadu(sg + i), set1(m_new))));
      for (int i = n; i < TILE; ++i) pg[i] = 0.f;  // vexp clamps: exp(-inf) is not 0
      for (int i = 0; i < TILE; i += W) lsum = add(lsum, loadu(pg + i));
      l = l * corr + reduce_add(lsum);
      m = m_new;
      if (corr != 1.f) {
        const V cv = set1(corr);
        float* ag = rs[r].acc[g];
        for (int k = 0; k < d; k += W) storeu(ag + k, mul(loadu(ag + k), cv));
      }
    }
  // values decoded chunk by chunk straight into the accumulators
  float (*acc[RB])[MAX_D];
  for (int r = 0; r < RB; ++r) acc[r] = rs[r].acc;
  int j = 0;
  for (int vg = 0; vg < P.vd.ngroups; ++vg) {
    alignas(64) float nv[TILE];
    for (int i = 0; i < n; ++i) nv[i] = half_at(slots[i] + P.vd.norm_off + 2 * vg);
    for (int i = n; i < TILE; ++i) nv[i] = 0.f;
    alignas(64) float pn[RB][GA][TILE];
    for (int r = 0; r < RB; ++r)
      for (int g = 0; g < G; ++g)
        for (int i = 0; i < TILE; i += W) storeu(pn[r][g] + i, mul(loadu(p[r][g] + i), loadu(nv + i)));
    const int64_t off = P.vd.seg_off[vg];
    const int dim = (int)P.vd.dim[vg];
    const Book& cb = P.vc.cb[vg];
    const VI sh = P.vc.shifts[vg];
    switch (P.vd.bits[vg]) {
      case 1: accumulate_group<1, GA, RB, PAIR, SCR>(slots, vscr, d, n, off, dim, cb, sh, pn, G, acc, j); break;
      case 2: accumulate_group<2, GA, RB, PAIR, SCR>(slots, vscr, d, n, off, dim, cb, sh, pn, G, acc, j); break;
      case 3: accumulate_group<3, GA, RB, PAIR, SCR>(slots, vscr, d, n, off, dim, cb, sh, pn, G, acc, j); break;
      default: accumulate_group<4, GA, RB, PAIR, SCR>(slots, vscr, d, n, off, dim, cb, sh, pn, G, acc, j); break;
    }
    j += dim;
  }
}

inline void init_state(int G, int64_t d, float (*acc)[MAX_D], float* m, float* l) {
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
    std::fill(acc[g], acc[g] + d, 0.f);
  }
}

// split sp of row r, query heads i0 .. i0 + G - 1 (i0 within the row)
inline void write_split(const Step& P, int64_t r, int64_t i0, int64_t sp, int G,
                        float (*acc)[MAX_D], const float* m, const float* l) {
  for (int g = 0; g < G; ++g) {
    const int64_t o = P.split_slot(r, i0 + g) + sp;
    P.m_out[o] = m[g];
    P.l_out[o] = l[g];
    std::memcpy(P.acc_out + o * P.d, acc[g], P.d * sizeof(float));
  }
}

// Fixed runs of split_tokens (a multiple of TILE) per split: how a row is split depends on
// its own length only, never on the batch. Splits start on TILE boundaries; with
// block_size % TILE == 0 a tile never crosses a block, so one block-table lookup serves
// the whole tile.
inline const uint8_t* tile_at(const Step& P, const int64_t* row, int64_t h, int64_t tt) {
  return P.cache + row[tt / P.block_size] * P.s_blk + h * P.s_head + (tt % P.block_size) * P.s_tok;
}

// The next tile's slots (TILE x s_tok contiguous bytes) toward L1 while this one is
// scored: fill_keys gathers across the tile's slots, a pattern the hardware prefetchers
// do not follow.
inline void prefetch_tile(const Step& P, const uint8_t* tile) {
  for (int64_t b = 0; b < TILE * P.s_tok; b += 64) _mm_prefetch(reinterpret_cast<const char*>(tile + b), _MM_HINT_T0);
}

// The slots of the decode task a thread runs next, fetched toward L2 a few lines at a time
// while it computes the current one (the tile bodies: amx_step pumps). Inside a model step
// the cache comes from memory (every layer's cache and the model's weights pass through the
// last-level cache between two reads of one layer's) and a split's blocks lie anywhere in
// it: fetched only by the fill's own look-ahead (FILL_AHEAD tokens, a few hundred cycles),
// the fill's first pass waited on memory for about a quarter of decode's time (perf, Zen 4,
// 32 requests of 130-1154 tokens, 30 layers' caches). A pump after each 64-token run of
// scores and before each value chunk spreads the next task's lines over the current task's
// arithmetic: that case 0.80x the time (eval/bench_kernel_ab.py, "in a model"). A pump
// per 32-token step of the values cost cache-resident cases 6-10%; all lines at a task's
// start stalled on the miss buffers instead (no gain).
struct Ahead {
  static constexpr int MAX_BLOCKS = 64;  // a split's cache blocks (512 tokens in 16-token blocks: 32)
  const char* base[MAX_BLOCKS];
  int64_t len[MAX_BLOCKS];
  int nb = 0, cur = 0;
  int64_t off = 0, lines = 0;
  int rate = 0;  // lines a pump

  // decode task `task` of P; false where it reads no token. Called on a drained cursor
  // (after drain(), nothing is left to fetch), which it replaces.
  bool set(const Step& P, int64_t task) {
    nb = cur = 0;
    off = lines = 0;
    const auto [b, h, sp, t0, t1] = P.decode_task(task);
    const int64_t* row = P.block_table + b * P.bt_stride;
    for (int64_t tt = t0; tt < t1 && nb < MAX_BLOCKS; ++nb) {
      const int64_t end = std::min(t1, (tt / P.block_size + 1) * P.block_size);
      base[nb] = reinterpret_cast<const char*>(tile_at(P, row, h, tt));
      len[nb] = (end - tt) * P.s_tok;
      lines += (len[nb] + 63) / 64;
      tt = end;
    }
    return nb > 0;
  }
  // spread what is left over `pumps` calls of pump()
  void pace(int64_t pumps) { rate = (int)((lines + pumps - 1) / std::max<int64_t>(1, pumps)); }
  void pump(int64_t n) {
    while (n > 0 && cur < nb) {
      const char* p = base[cur];
      const int64_t stop = std::min(len[cur], off + 64 * n);
      const int64_t k = (stop - off + 63) / 64;
      for (int64_t o = off; o < stop; o += 64) _mm_prefetch(p + o, _MM_HINT_T1);
      n -= k;
      lines -= k;
      off += 64 * k;
      if (off >= len[cur]) {
        ++cur;
        off = 0;
      }
    }
  }
  void pump() { pump(rate); }
  void drain() { pump(INT64_MAX / 128); }
};

__attribute__((noinline)) Ahead& ahead() {
  thread_local Ahead a;
  return a;
}

// Decode: one task = (row, KV head, split); GT = the GQA group size it was compiled for
// (0: any, read from P.G).
template <int GT>
void attend(const Step& P, int64_t task) {
  const int G = GT > 0 ? GT : (int)P.G;
  const auto [b, h, sp, t0, t1] = P.decode_task(task);
  alignas(64) float acc[MAX_G][MAX_D];
  float m[MAX_G], l[MAX_G];
  init_state(G, P.d, acc, m, l);
  const RowState rs{acc, m, l};
  const int64_t* row = P.block_table + b * P.bt_stride;
  // keys: each tile decoded and laid out coordinate-major for the scores (KeyTile). Values:
  // decoded chunk by chunk into the accumulators, except trellis codes (each code needs
  // the ones before it): those tiles are decoded into scratch first, as prefill does, and
  // read back by the same arithmetic
  const bool scr = P.kd.trellis || P.vd.trellis;
  alignas(64) float kscr[TILE * MAX_D];
  alignas(64) float vscr[TILE * MAX_D];
  KeyTile T;
  for (int64_t tt = t0; tt < t1; tt += TILE) {
    const int n = (int)std::min<int64_t>(TILE, t1 - tt);
    const uint8_t* tile = tile_at(P, row, h, tt);
    if (tt + TILE < t1) prefetch_tile(P, tile_at(P, row, h, tt + TILE));
    const uint8_t* slots[TILE];
    for (int i = 0; i < n; ++i) slots[i] = tile + i * P.s_tok;
    if (scr) {
      if (P.kd.trellis) unpack_tile(slots, n, P.kd, P.kc, kscr, P.d);
      unpack_tile(slots, n, P.vd, P.vc, vscr, P.d);
    }
    fill_keys(P, slots, n, kscr, T);
    if (scr) tile_step<GT, 1, true>(P, slots, n, T, vscr, b * P.Hq + h * G, &rs);
    else tile_step<GT, 1, false>(P, slots, n, T, nullptr, b * P.Hq + h * G, &rs);
  }
  write_split(P, b, h * G, sp, G, acc, m, l);
}

// A prefill task's rows r0 .. r0 + nr - 1 (one sequence), KV head h, split sp: tokens
// t0 .. t_end - 1, row r reading up to end_of(r).
struct RowGroup {
  int64_t r0, nr, h, sp, t0, t_end;
  int64_t end_of(const Step& P, int64_t r) const { return std::min(P.seq_lens[r0 + r], t0 + P.split_tokens); }
};

inline RowGroup row_group(const Step& P, int64_t task) {
  const int64_t H = P.H, n_splits = P.n_splits, grp = task / (H * n_splits);
  RowGroup g{P.groups[grp], P.groups[grp + 1] - P.groups[grp], (task / n_splits) % H, task % n_splits, 0, 0};
  g.t0 = g.t_end = g.sp * P.split_tokens;
  for (int64_t r = 0; r < g.nr; ++r) g.t_end = std::max(g.t_end, g.end_of(P, r));
  return g;
}

// Prefill: one task = (group of consecutive rows of one sequence, KV head, split). Each
// tile is decoded once into scratch and every row of the group that reaches it runs
// decode's own tile step on it, RB rows at a time where they read the same tokens (all but
// the tiles a row's causal limit cuts), so a row gets exactly the bits its decode step
// gets.
template <int GT>
void attend_rows(const Step& P, int64_t task) {
  constexpr int RB = rows_per_pass<GT>();
  const int G = GT > 0 ? GT : (int)P.G;
  const int64_t d = P.d;
  const RowGroup rg = row_group(P, task);
  const int64_t r0 = rg.r0, nr = rg.nr, h = rg.h, sp = rg.sp, t0 = rg.t0, t_end = rg.t_end;
  auto end_of = [&](int64_t r) { return rg.end_of(P, r); };
  if (t_end == t0) return;  // no row of the group reaches this split
  // per-row state: acc [nr][G][MAX_D], then m and l [nr][G]
  thread_local std::vector<float> state;
  state.resize(nr * G * (MAX_D + 2));
  float* m_all = state.data() + nr * G * MAX_D;
  float* l_all = m_all + nr * G;
  auto state_of = [&](int64_t r) {
    return RowState{reinterpret_cast<float(*)[MAX_D]>(state.data() + r * G * MAX_D), m_all + r * G,
                    l_all + r * G};
  };
  for (int64_t r = 0; r < nr; ++r) {
    const RowState rs = state_of(r);
    init_state(G, d, rs.acc, rs.m, rs.l);
  }
  const int64_t* row = P.block_table + P.row_seq[r0] * P.bt_stride;
  alignas(64) float kscr[TILE * MAX_D];
  alignas(64) float vscr[TILE * MAX_D];
  KeyTile T;
  for (int64_t tt = t0; tt < t_end; tt += TILE) {
    const int n = (int)std::min<int64_t>(TILE, t_end - tt);
    const uint8_t* tile = tile_at(P, row, h, tt);
    const uint8_t* slots[TILE];
    for (int i = 0; i < n; ++i) slots[i] = tile + i * P.s_tok;
    if (P.kd.trellis) unpack_tile(slots, n, P.kd, P.kc, kscr, d);
    unpack_tile(slots, n, P.vd, P.vc, vscr, d);
    fill_keys(P, slots, n, kscr, T);
    // the tokens of this tile row r reads: 0 if none
    auto reads = [&](int64_t r) { return (int)std::clamp<int64_t>(end_of(r) - tt, 0, n); };
    for (int64_t r = 0; r < nr;) {
      const int nrow = reads(r);
      if (nrow == 0) {
        ++r;
        continue;
      }
      const int64_t q0 = (r0 + r) * P.Hq + h * G;
      bool together = RB > 1 && r + RB <= nr;
      for (int64_t k = 1; together && k < RB; ++k) together = reads(r + k) == nrow;
      if (together) {
        RowState rs[RB];
        for (int k = 0; k < RB; ++k) rs[k] = state_of(r + k);
        tile_step<GT, RB, true>(P, slots, nrow, T, vscr, q0, rs);
        r += RB;
      } else {
        const RowState rs = state_of(r);
        tile_step<GT, 1, true>(P, slots, nrow, T, vscr, q0, &rs);
        ++r;
      }
    }
  }
  for (int64_t r = 0; r < nr; ++r)
    if (P.seq_lens[r0 + r] > t0) {
      const RowState rs = state_of(r);
      write_split(P, r0 + r, h * G, sp, G, rs.acc, rs.m, rs.l);
    }
}

template <template <int> class Fn>
TaskFn for_group_size(int64_t G) {
  switch (G) {
    case 1: return Fn<1>::run;
    case 2: return Fn<2>::run;
    case 3: return Fn<3>::run;
    case 4: return Fn<4>::run;
    case 5: return Fn<5>::run;
    case 6: return Fn<6>::run;
    case 7: return Fn<7>::run;
    case 8: return Fn<8>::run;
    default: return Fn<0>::run;
  }
}
template <int GT> struct DecodeTask { static void run(const Step& P, int64_t t) { attend<GT>(P, t); } };
template <int GT> struct PrefillTask { static void run(const Step& P, int64_t t) { attend_rows<GT>(P, t); } };

}  // namespace

#if defined(__AVX512F__)
#include "tq_attend_amx.h"
#endif

namespace {

#if defined(__AVX512F__)
// A task's body: AMX for the rows amx_row gives it (decode: the task's row; prefill: its
// group's, whose rows share one body), else the float32 body in P.f32.
void amx_decode_task(const Step& P, int64_t t) {
  if (P.f32 && !amx_row(P.G, P.seq_lens[P.decode_task(t).b])) return P.f32(P, t);
  amx_attend(P, *P.amx, t);
}
void amx_prefill_task(const Step& P, int64_t t) {
  if (P.f32 && !amx_row(P.G, P.seq_lens[P.groups[t / (P.H * P.n_splits)]])) return P.f32(P, t);
  amx_attend_rows(P, *P.amx, t);
}
#else  // the AVX2 build has no AMX bodies: no call takes them
inline bool amx_handles(int, const Desc&, const Desc&, bool, int64_t, int64_t) { return false; }
inline bool amx_row(int64_t, int64_t) { return false; }
inline int64_t amx_group_rows(int64_t) { return 1; }
#endif

// Shapes the kernel handles (0), or -1.
int check(int64_t Hq, int64_t H, int64_t d, int64_t block_size, int64_t split_tokens,
          int64_t s_tok, const int64_t* kdesc_p, const int64_t* vdesc_p) {
  if (H <= 0 || Hq % H || d % 16 || d > MAX_D || Hq / H > MAX_G || block_size % TILE ||
      split_tokens % TILE)
    return -1;
  for (const int64_t* desc : {kdesc_p, vdesc_p}) {
    for (int64_t g = 0; g < desc[1]; ++g)
      if (desc[5 + 3 * g] % W) return -1;  // a group must be whole vectors
    const int64_t S = desc[3 + 3 * desc[1]], stride = desc[4 + 3 * desc[1]];
    for (int64_t g = 0; g < desc[1] && S; ++g)  // every window inside its table row
      if (S < desc[4 + 3 * g] || S > 10 || stride < (int64_t(1) << (S + desc[4 + 3 * g]))) return -1;
  }
  // fill_keys reads a key's codes and sign bits as 4-byte words, up to 3 bytes past them:
  // inside the slot stride (in the layout a key's bytes come before its value's)
  const Desc kd = read_desc(kdesc_p);
  int64_t key_end = 0;
  for (int64_t g = 0; g < kd.ngroups && !kd.trellis; ++g)
    key_end = std::max(key_end, kd.seg_off[g] + kd.bits[g] * kd.dim[g] / 8 + 3);
  if (kd.sign_off >= 0) key_end = std::max(key_end, kd.sign_off + (d + 31) / 32 * 4);
  return key_end > s_tok ? -1 : 0;
}

// The query rows as the model gives them: [rows, Hq, d] of dtype dt (DT_*), row r at
// r * row_stride elements, its heads d apart; scale [H, d] (or null) multiplies each query
// head's channels by its KV head's row first (LayerTransform.queries, see load_row).
struct QueryIn {
  const void* p;
  int dt;
  int64_t row_stride;
  const float* scale;
};

// Reads (load_row), rotates and sketches each query once: in [rows, Hq, d] -> q (float32,
// the transformed queries), q_rot, q_sk. rot_k_t [H, d, d] and sketch_t [d, d] are the
// transposed matrices; the G query heads of one KV head share their rotation (mat_rows).
// With key offsets k_off [H, d] (original domain), also q_off [rows, Hq] = <q, o_h>, what
// a flagged key's logit loses.
void rotate_queries(const QueryIn& in, int64_t rows, int64_t Hq, int64_t G, int64_t d,
                    const float* rot_k_t, const float* sketch_t, const float* k_off, float* q,
                    float* q_rot, float* q_sk, float* q_off, int num_threads) {
  const int64_t H = Hq / G, ib = dtype_bytes(in.dt);
#pragma omp parallel for num_threads(num_threads)
  for (int64_t i = 0; i < rows * H; ++i) {
    const int64_t r = i / H, h = i % H, at = i * G * d;
    for (int64_t g = 0; g < G; ++g)
      load_row(static_cast<const uint8_t*>(in.p) + (r * in.row_stride + (h * G + g) * d) * ib,
               in.dt, d, nullptr, in.scale ? in.scale + h * d : nullptr, true, q + at + g * d);
    mat_rows(rot_k_t + h * d * d, q + at, G, (int)d, q_rot + at);
    if (sketch_t != nullptr) mat_rows(sketch_t, q_rot + at, G, (int)d, q_sk + at);
    if (k_off != nullptr)
      for (int64_t g = 0; g < G; ++g) q_off[i * G + g] = dot(q + at + g * d, k_off + h * d, (int)d);
  }
}

// Attention outputs [rows, Hq, d] in the model's dtype dt (DT_*): row r at r * row_stride
// elements, its heads d apart.
struct Output {
  void* p;
  int dt;
  int64_t row_stride;
  void* row(int64_t r, int64_t at) const {
    return static_cast<uint8_t*>(p) + (r * row_stride + at) * dtype_bytes(dt);
  }
};

// Log-sum-exp combine of row r's splits in split order, then rotate back once for the G
// query heads of KV head h (i = r * H + h): out [rows, Hq, d] = R_v^T o (see Output).
void merge_one(const Step& P, int64_t i, const float* rot_v, const Output& out) {
  const int64_t G = P.G, H = P.H, d = P.d;
  const int64_t r = i / H, h = i % H, n_splits = P.splits_of(r);
  alignas(64) float o[MAX_G * MAX_D];
  for (int64_t g = 0; g < G; ++g) {
    const int64_t base = P.split_slot(r, h * G + g);
    const float* mi = P.m_out + base;
    const float* li = P.l_out + base;
    float mx = -INFINITY;
    for (int64_t sp = 0; sp < n_splits; ++sp) mx = std::max(mx, mi[sp]);
    float* og = o + g * d;
    std::fill(og, og + d, 0.f);
    float denom = 0.f;
    for (int64_t sp = 0; sp < n_splits; ++sp) {
      if (li[sp] == 0.f) continue;  // empty split
      const float w = std::exp(mi[sp] - mx);
      denom += w * li[sp];
      const float* a = P.acc_out + (base + sp) * d;
      for (int k = 0; k < d; ++k) og[k] += w * a[k];
    }
    const float inv = denom > 0.f ? 1.f / denom : 0.f;
    for (int k = 0; k < d; ++k) og[k] *= inv;
  }
  alignas(64) float y[MAX_G * MAX_D];
  mat_rows(rot_v + h * d * d, o, G, (int)d, y);
  store_row(y, G * d, out.dt, out.row(r, h * G * d));
}

// The per-call float buffers (rotated and sketched queries, offsets, split partials),
// kept by the calling thread across calls at the largest size seen: allocated fresh each
// call (megabytes for a long prefill chunk) they cost a page fault per 4 KiB and a zero
// fill on every layer. A call writes every element it reads.
struct Workspace {
  std::vector<float> q, q_rot, q_sk, q_off, acc, m, l;
};

Workspace& workspace() {
  thread_local Workspace w;
  return w;
}

inline float* grow(std::vector<float>& v, int64_t n) {
  if ((int64_t)v.size() < n) v.resize(n);
  return v.data();
}

// The queries rotated (and sketched), with their offsets, in the workspace: see
// rotate_queries; q_sk / q_off null without QJL / offsets.
struct Queries {
  float *q_rot, *q_sk, *q_off;
};

Queries prepare_queries(const QueryIn& in, int64_t rows, int64_t Hq, int64_t G, int64_t d,
                        const float* rot_k_t, const float* sketch_t, const float* k_off,
                        int num_threads) {
  Workspace& w = workspace();
  const Queries Q{grow(w.q_rot, rows * Hq * d), sketch_t ? grow(w.q_sk, rows * Hq * d) : nullptr,
                  k_off ? grow(w.q_off, rows * Hq) : nullptr};
  rotate_queries(in, rows, Hq, G, d, rot_k_t, sketch_t, k_off, grow(w.q, rows * Hq * d), Q.q_rot,
                 Q.q_sk, Q.q_off, num_threads);
  return Q;
}

// Decode: the split-KV tasks, then the merge of each row's splits into out [rows, Hq, d],
// in one parallel region (the first loop's barrier between them): the threads are started
// once a call (two regions timed the same alone, within the run-to-run noise).
// Prefill (step.groups set): one thread takes a row group and KV head through all of its
// splits' tasks and then merges those rows for that head, while their split partials are
// still in its caches (run split by split, a 4k-token prompt's ~40 MB of partials went to
// memory and came back for the merge; this way its prefill on AMX is 7-10% faster). The
// same tasks and merges, so the same bits. Where that leaves fewer than
// PREFILL_GROUP_TASKS_PER_THREAD (row group, head) pairs a thread — a short chunk over a
// long cached context — the split-major order keeps the threads busy instead.
constexpr int64_t PREFILL_GROUP_TASKS_PER_THREAD = 4;
void run(const Step& step, TaskFn fn, int64_t ntasks, int64_t rows, const float* rot_v,
         const Output& out, int num_threads) {
  const int64_t H = step.H, ns = step.n_splits;
  if (step.groups != nullptr && ntasks / ns >= PREFILL_GROUP_TASKS_PER_THREAD * num_threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t gh = 0; gh < ntasks / ns; ++gh) {  // (row group, KV head)
      for (int64_t sp = 0; sp < ns; ++sp) fn(step, gh * ns + sp);
      const int64_t grp = gh / H, h = gh % H;
      for (int64_t r = step.groups[grp]; r < step.groups[grp + 1]; ++r)
        merge_one(step, r * H + h, rot_v, out);
    }
    return;
  }
  // decode on the tile bodies: each thread claims the task after its current one and fetches
  // its slots while it runs this one (Ahead; the float32 bodies, slower, timed the same with
  // it); which thread runs which task changes no bit
  const bool ahead_tasks = step.groups == nullptr && step.amx != nullptr;
  std::atomic<int64_t> claim{0};
#pragma omp parallel num_threads(num_threads)
  {
    if (ahead_tasks) {
      Ahead& A = ahead();  // drained: each task's fetch ends with drain()
      for (int64_t task = claim++; task < ntasks;) {
        // the last tasks are left to whichever thread is free first, not held ahead; a task
        // with nothing to read runs at once and the next is claimed in its place
        int64_t after = -1;
        while (claim.load(std::memory_order_relaxed) < ntasks - num_threads) {
          after = claim++;
          if (after >= ntasks || A.set(step, after)) break;
          fn(step, after);
          after = -1;
        }
        fn(step, task);
        A.drain();
        task = after >= 0 ? after : claim++;
      }
#pragma omp barrier
    } else {
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < ntasks; ++task) fn(step, task);
    }
#pragma omp for
    for (int64_t i = 0; i < rows * H; ++i) merge_one(step, i, rot_v, out);
  }
}

// run() on the AMX bodies (decode or prefill tasks), their tables built for the call;
// f32: the float32 body of the rows amx_row leaves to it, or null where it leaves none.
#if defined(__AVX512F__)
inline void run_amx(const Step& step, const float* k_books, const float* v_books, bool prefill,
                    TaskFn f32, int64_t ntasks, int64_t rows, const float* rot_v,
                    const Output& out, int num_threads) {
  const AmxBooks books = amx_books(step, k_books, v_books);
  Step s = step;
  s.amx = &books;
  s.f32 = f32;
  run(s, prefill ? amx_prefill_task : amx_decode_task, ntasks, rows, rot_v, out, num_threads);
}
#else
inline void run_amx(const Step&, const float*, const float*, bool, TaskFn, int64_t, int64_t,
                    const float*, const Output&, int) {}
#endif

// ------------------------------------------------------------------- trellis search
// Viterbi search of tq_vllm.trellis.encode over the 2^S states, with its arithmetic: each
// branch costs cost[p] + e * e, e = u_i - value (float32, each operation rounded once:
// the library is built with -ffp-contract=off), a new state keeps its first predecessor
// t of least cost (strict <, t ascending) and the path ends in the first state of least
// cost, so the codes are the reference's bit for bit.
// The forward pass keeps only each state's least cost (a minimum is the same float in any
// order, so the 2^R branches into a state reduce through independent chains); every
// step's costs are kept, and the backward pass recomputes the 2^R branches into the one
// state on the path and takes the first that reproduces its cost: the reference's
// predecessor. Lanes are the 2^R codes c of the new states (c << (S - R)) | hi, so a
// step's costs are stored as [hi][c] ("lane order", `lane_of` maps a state there); `tabT`
// is the table transposed to [p = (hi << R) | t][c].
constexpr int TRELLIS_LANES = 8;   // AVX2 float lanes (both builds): R >= 3 fills whole vectors
constexpr int TRELLIS_CHAINS = 4;  // independent minimum chains per vector: hide the latency

// Cost of the branch from state p (cost `cp`) into code c's window: the reference's rounding.
inline float trellis_branch(float cp, float u, float value) {
  const float e = u - value;
  return cp + e * e;
}

template <int R>
void trellis_row(const float* u, int dim, int S, const float* tab, const float* tabT,
                 const int* lane_of, float* hist, uint8_t* out) {
  constexpr int NC = 1 << R;
  const int nh = 1 << (S - R), ns = 1 << S;
  std::fill(hist, hist + ns, INFINITY);
  hist[lane_of[0]] = 0.f;
  for (int i = 0; i < dim; ++i) {
    const float* prev = hist + (int64_t)i * ns;
    float* cur = hist + (int64_t)(i + 1) * ns;
    for (int hi = 0; hi < nh; ++hi) {
      if constexpr (NC >= TRELLIS_LANES) {
        constexpr int NV = NC / TRELLIS_LANES;
        const __m256 x = _mm256_set1_ps(u[i]);
        __m256 m[NV][TRELLIS_CHAINS];
        for (int v = 0; v < NV; ++v)
          for (int k = 0; k < TRELLIS_CHAINS; ++k) m[v][k] = _mm256_set1_ps(INFINITY);
#pragma GCC unroll 16
        for (int t0 = 0; t0 < NC; t0 += TRELLIS_CHAINS) {
#pragma GCC unroll 4
          for (int k = 0; k < TRELLIS_CHAINS; ++k) {
            const int p = (hi << R) | (t0 + k);
            const __m256 cp = _mm256_broadcast_ss(prev + lane_of[p]);
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) {
              const __m256 e = _mm256_sub_ps(x, _mm256_loadu_ps(tabT + p * NC + v * TRELLIS_LANES));
              const __m256 tot = _mm256_add_ps(cp, _mm256_mul_ps(e, e));
              m[v][k] = _mm256_min_ps(m[v][k], tot);
            }
          }
        }
        for (int v = 0; v < NV; ++v) {
          __m256 r = m[v][0];
          for (int k = 1; k < TRELLIS_CHAINS; ++k) r = _mm256_min_ps(r, m[v][k]);
          _mm256_storeu_ps(cur + hi * NC + v * TRELLIS_LANES, r);
        }
      } else {
        for (int c = 0; c < NC; ++c) {
          float best = INFINITY;
          for (int t = 0; t < NC; ++t) {
            const int p = (hi << R) | t;
            best = std::min(best, trellis_branch(prev[lane_of[p]], u[i], tab[(c << S) | p]));
          }
          cur[hi * NC + c] = best;
        }
      }
    }
  }
  const float* last = hist + (int64_t)dim * ns;
  int state = 0;
  for (int s = 1; s < ns; ++s)
    if (last[lane_of[s]] < last[lane_of[state]]) state = s;
  for (int i = dim - 1; i >= 0; --i) {
    const float* prev = hist + (int64_t)i * ns;
    const int c = state >> (S - R), hi = state & (nh - 1);
    const float target = hist[(int64_t)(i + 1) * ns + lane_of[state]];
    int first = 0;  // a non-finite row (the store never sends one) falls back to t = 0
    for (int t = 0; t < NC; ++t) {
      const int p = (hi << R) | t;
      if (trellis_branch(prev[lane_of[p]], u[i], tab[(c << S) | p]) == target) {
        first = t;
        break;
      }
    }
    out[i] = (uint8_t)c;
    state = (hi << R) | first;
  }
}

}  // namespace

// Trellis codes of `rows` unit-scale rows u [rows, dim] (one channel group each) for the
// decode table `table` [2^(S + bits)]: codes [rows, dim] uint8, as tq_vllm.trellis.encode.
// Returns 0, or -1 for bits outside 1..4, S outside bits..10 or dim outside 1..MAX_D.
extern "C" int tq_trellis_encode_cpu(const float* u, int64_t rows, int64_t dim, int64_t bits,
                                     int64_t S, const float* table, uint8_t* codes,
                                     int num_threads) {
  if (bits < 1 || bits > 4 || S < bits || S > 10 || dim < 1 || dim > MAX_D) return -1;
  const int NC = 1 << bits, ns = 1 << S, nh = ns / NC;
  std::vector<float> tabT((size_t)ns * NC);
  std::vector<int> lane_of(ns);
  for (int p = 0; p < ns; ++p) {
    lane_of[p] = (p & (nh - 1)) * NC + (p >> (S - bits));
    for (int c = 0; c < NC; ++c) tabT[(size_t)p * NC + c] = table[(c << S) | p];
  }
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> hist((size_t)(dim + 1) * ns);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* ur = u + r * dim;
      uint8_t* out = codes + r * dim;
      switch (bits) {
        case 1: trellis_row<1>(ur, (int)dim, (int)S, table, tabT.data(), lane_of.data(), hist.data(), out); break;
        case 2: trellis_row<2>(ur, (int)dim, (int)S, table, tabT.data(), lane_of.data(), hist.data(), out); break;
        case 3: trellis_row<3>(ur, (int)dim, (int)S, table, tabT.data(), lane_of.data(), hist.data(), out); break;
        default: trellis_row<4>(ur, (int)dim, (int)S, table, tabT.data(), lane_of.data(), hist.data(), out); break;
      }
    }
  }
  return 0;
}

namespace {

// One row of tq_vllm.trellis.encode_fed: the groups' trellises searched in turn, each state
// carrying its survivor's feedback row fb[state][j] (what its errors take off coordinate
// j's target). Per step i and new state p' = (c << (S - R)) | hi the NC predecessors
// p = (hi << R) | t are tried with the reference's rounding (t = y_i - fb[p][i],
// e = t - nv[p][c], tot = cost[p] + (w_i * e) * e, first t of least cost: strict <, t
// ascending). Lanes are the codes c, as in trellis_row; unlike there, each step needs the
// winning predecessor and its error (the new state's feedback row is built from them), so
// the t loop carries (least cost, error, t) as blends. An unreachable state (cost inf)
// keeps t = 0 and error 0 where the reference keeps t = 0 and that branch's error: its row
// differs, but a state of infinite cost is never on the path nor the parent of a finite
// one, so the codes do not.
// Scratch (per thread): cost/next [ns], fb/fb_next [ns][d], nv [ns][NC], carried [d],
// back [d][ns].
struct FedScratch {
  std::vector<float> cost, next, fb, fb_next, nv, carried;
  std::vector<uint8_t> back;
  FedScratch(int ns, int d, int max_nc)
      : cost(ns), next(ns), fb((size_t)ns * d), fb_next((size_t)ns * d),
        nv((size_t)ns * max_nc), carried(d), back((size_t)d * ns) {}
};

// Feedback row of a new state: dst[j] = src[j] + a * Fi[j] for j in [j0, d). The vector
// loop starts at j0 rounded down to a whole vector, so no row needs a scalar head: the
// columns before j0 it also writes are behind the search (never read again).
inline void fed_row(float* __restrict__ dst, const float* __restrict__ src,
                    const float* __restrict__ Fi, float a, int j0, int d) {
  int j = j0 & ~(TRELLIS_LANES - 1);
  const __m256 av = _mm256_set1_ps(a);
  for (; j + TRELLIS_LANES <= d; j += TRELLIS_LANES)
    _mm256_storeu_ps(dst + j, _mm256_add_ps(_mm256_loadu_ps(src + j),
                                            _mm256_mul_ps(av, _mm256_loadu_ps(Fi + j))));
  for (; j < d; ++j) dst[j] = src[j] + a * Fi[j];
}

template <int R>
void trellis_fed_group(const float* y, int d, int a0, int dg, int S, float n, const float* tab,
                       const float* F, const float* w, FedScratch& s, uint8_t* out) {
  constexpr int NC = 1 << R;
  const int ns = 1 << S, nh = ns >> R;
  for (int p = 0; p < ns; ++p)
    for (int c = 0; c < NC; ++c) s.nv[(size_t)p * NC + c] = n * tab[(c << S) | p];
  std::fill(s.cost.begin(), s.cost.end(), INFINITY);
  s.cost[0] = 0.f;
  for (int p = 0; p < ns; ++p)
    std::copy(s.carried.begin() + a0, s.carried.end(), s.fb.begin() + (size_t)p * d + a0);
  for (int k = 0; k < dg; ++k) {
    const int i = a0 + k;
    const float wi = w[i], yi = y[i];
    const float* Fi = F + (size_t)i * d;
    uint8_t* back = s.back.data() + (size_t)k * ns;
    for (int hi = 0; hi < nh; ++hi) {
      alignas(32) float best[NC], ba[NC];
      alignas(32) int bt[NC];
      if constexpr (NC >= TRELLIS_LANES) {
        constexpr int NV = NC / TRELLIS_LANES;
        const __m256 wv = _mm256_set1_ps(wi);
        __m256 mb[NV], me[NV];
        __m256i mt[NV];
        for (int v = 0; v < NV; ++v) {
          mb[v] = _mm256_set1_ps(INFINITY);
          me[v] = _mm256_setzero_ps();
          mt[v] = _mm256_setzero_si256();
        }
#pragma GCC unroll 16
        for (int t = 0; t < NC; ++t) {
          const int p = (hi << R) | t;
          const __m256 tg = _mm256_set1_ps(yi - s.fb[(size_t)p * d + i]);
          const __m256 cp = _mm256_set1_ps(s.cost[p]);
          const __m256i tv = _mm256_set1_epi32(t);
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v) {
            const __m256 e = _mm256_sub_ps(tg, _mm256_loadu_ps(s.nv.data() + (size_t)p * NC + v * TRELLIS_LANES));
            const __m256 tot = _mm256_add_ps(cp, _mm256_mul_ps(_mm256_mul_ps(wv, e), e));
            const __m256 lt = _mm256_cmp_ps(tot, mb[v], _CMP_LT_OQ);
            mb[v] = _mm256_blendv_ps(mb[v], tot, lt);
            me[v] = _mm256_blendv_ps(me[v], e, lt);
            mt[v] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(mt[v]),
                                                         _mm256_castsi256_ps(tv), lt));
          }
        }
        for (int v = 0; v < NV; ++v) {
          _mm256_store_ps(best + v * TRELLIS_LANES, mb[v]);
          _mm256_store_ps(ba + v * TRELLIS_LANES, me[v]);
          _mm256_store_si256((__m256i*)(bt + v * TRELLIS_LANES), mt[v]);
        }
      } else {
        for (int c = 0; c < NC; ++c) { best[c] = INFINITY; ba[c] = 0.f; bt[c] = 0; }
        for (int t = 0; t < NC; ++t) {
          const int p = (hi << R) | t;
          const float tg = yi - s.fb[(size_t)p * d + i], cp = s.cost[p];
          for (int c = 0; c < NC; ++c) {
            const float e = tg - s.nv[(size_t)p * NC + c];
            const float tot = cp + (wi * e) * e;
            if (tot < best[c]) { best[c] = tot; ba[c] = e; bt[c] = t; }
          }
        }
      }
      for (int c = 0; c < NC; ++c) {
        const int q = c * nh + hi;  // the new state (c << (S - R)) | hi
        s.next[q] = best[c];
        back[q] = (uint8_t)bt[c];
        fed_row(s.fb_next.data() + (size_t)q * d, s.fb.data() + (size_t)((hi << R) | bt[c]) * d,
                Fi, ba[c], i + 1, d);
      }
    }
    std::swap(s.cost, s.next);
    std::swap(s.fb, s.fb_next);
  }
  int state = 0;
  for (int q = 1; q < ns; ++q)
    if (s.cost[q] < s.cost[state]) state = q;
  std::fill(s.carried.begin(), s.carried.end(), 0.f);
  std::copy(s.fb.begin() + (size_t)state * d + a0 + dg, s.fb.begin() + (size_t)(state + 1) * d,
            s.carried.begin() + a0 + dg);
  for (int k = dg - 1; k >= 0; --k) {
    out[a0 + k] = (uint8_t)(state / nh);
    state = (state % nh) * NC + s.back[(size_t)k * ns + state];
  }
}

void trellis_fed_row(const float* y, int d, int groups, const int64_t* bits, int S,
                     const float* tables, int64_t tab_stride, const float* norms,
                     const float* F, const float* w, FedScratch& s, uint8_t* out) {
  const int dg = d / groups;
  std::fill(s.carried.begin(), s.carried.end(), 0.f);
  for (int g = 0; g < groups; ++g) {
    const float* tab = tables + g * tab_stride;
    switch (bits[g]) {
      case 1: trellis_fed_group<1>(y, d, g * dg, dg, S, norms[g], tab, F, w, s, out); break;
      case 2: trellis_fed_group<2>(y, d, g * dg, dg, S, norms[g], tab, F, w, s, out); break;
      case 3: trellis_fed_group<3>(y, d, g * dg, dg, S, norms[g], tab, F, w, s, out); break;
      default: trellis_fed_group<4>(y, d, g * dg, dg, S, norms[g], tab, F, w, s, out); break;
    }
  }
}

}  // namespace

// Trellis codes of `rows` rotated rows y [rows, d] searched against a query weight, as
// tq_vllm.trellis.encode_fed: `groups` equal channel groups of bits[g] bits, decode tables
// [groups][tab_stride], norms [rows][groups] (clamped), head [rows] picking F [H][d][d]
// (strictly upper feedback) and w [H][d] (coordinate weights). Returns 0, or -1 for shapes
// outside bits 1..4, S bits..10, d 1..MAX_D divisible by groups (1 or 2).
extern "C" int tq_trellis_encode_fed_cpu(const float* y, int64_t rows, int64_t d, int64_t groups,
                                         const int64_t* bits, int64_t S, const float* tables,
                                         int64_t tab_stride, const float* norms,
                                         const int64_t* head, const float* F, const float* w,
                                         uint8_t* codes, int num_threads) {
  if (groups < 1 || groups > 2 || d < 1 || d > MAX_D || d % groups || S > 10) return -1;
  int max_nc = 1;
  for (int g = 0; g < groups; ++g) {
    if (bits[g] < 1 || bits[g] > 4 || S < bits[g]) return -1;
    if (tab_stride < (1 << (S + bits[g]))) return -1;
    max_nc = std::max(max_nc, 1 << (int)bits[g]);
  }
#pragma omp parallel num_threads(num_threads)
  {
    FedScratch s(1 << S, (int)d, max_nc);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      trellis_fed_row(y + r * d, (int)d, (int)groups, bits, (int)S, tables, tab_stride,
                      norms + r * groups, F + head[r] * d * d, w + head[r] * d, s,
                      codes + r * d);
  }
  return 0;
}

// Decode attention for B sequences, one query token each.
//   q [B, Hq, d] of dtype q_dt (DT_*), row b at b * q_row elements (original domain),
//   multiplied by q_scale [H, d] first when not null (see QueryIn); k_off [H, d] key
//   offsets o or null (none); rot_k_t = R_k^T, rot_v = R_v [H, d, d]; sketch_t [d, d]
//   (transposed) or null; n_splits < 1: as many as the longest sequence needs
//   out [B, Hq, d] of dtype out_dt, row b at b * out_row elements (original domain)
// Returns 0, or -1 when a shape is outside what the kernel handles.
extern "C" int tq_decode_cpu(
    const uint8_t* cache, int64_t s_blk, int64_t s_head, int64_t s_tok,
    const int64_t* block_table, int64_t bt_stride, const int64_t* seq_lens,
    const void* q, int q_dt, int64_t q_row, const float* q_scale, const float* k_off,
    const float* rot_k_t, const float* sketch_t, const float* rot_v,
    int64_t B, int64_t Hq, int64_t H, int64_t d, int64_t block_size, int64_t n_splits,
    int64_t split_tokens,
    float scale, float qjl_scale, const int64_t* kdesc_p, const float* k_books,
    const int64_t* vdesc_p, const float* v_books, void* out, int out_dt, int64_t out_row,
    int num_threads) {
  if (check(Hq, H, d, block_size, split_tokens, s_tok, kdesc_p, vdesc_p)) return -1;
  if (n_splits < 1) {  // from the longest sequence
    int64_t longest = 1;
    for (int64_t b = 0; b < B; ++b) longest = std::max(longest, seq_lens[b]);
    n_splits = (longest + split_tokens - 1) / split_tokens;
  }
  const int64_t G = Hq / H;
  const Desc kd = read_desc(kdesc_p), vd = read_desc(vdesc_p);
  const bool qjl = kd.sign_off >= 0 && sketch_t != nullptr;
  const Queries Q = prepare_queries({q, q_dt, q_row, q_scale}, B, Hq, G, d, rot_k_t,
                                    qjl ? sketch_t : nullptr, k_off, num_threads);
  Workspace& w = workspace();
  const Step step{cache, s_blk, s_head, s_tok, block_table, bt_stride, seq_lens, nullptr,
                  nullptr, nullptr, Q.q_rot, Q.q_sk, Q.q_off,
                  Hq, H, G, d, block_size, n_splits, split_tokens, scale,
                  qjl_scale, kd, vd, make_codebooks(kd, k_books), make_codebooks(vd, v_books),
                  grow(w.acc, B * Hq * n_splits * d), grow(w.m, B * Hq * n_splits),
                  grow(w.l, B * Hq * n_splits)};
  const Output o{out, out_dt, out_row};
  const TaskFn f32 = for_group_size<DecodeTask>(G);
  int64_t on_amx = 0;  // rows the AMX bodies take
  if (amx_handles(q_dt, kd, vd, qjl, G, split_tokens))
    for (int64_t b = 0; b < B; ++b) on_amx += amx_row(G, seq_lens[b]);
  if (on_amx)
    run_amx(step, k_books, v_books, false, on_amx < B ? f32 : nullptr, B * H * n_splits, B,
            rot_v, o, num_threads);
  else
    run(step, f32, B * H * n_splits, B, rot_v, o, num_threads);
  return 0;
}

// Prefill attention over the packed cache: N query rows, row r = one prompt token that
// attends to the first row_len[r] tokens of block-table row row_seq[r], with exactly
// the bits tq_decode_cpu gives that token as a decode step. Consecutive rows of one
// sequence are taken group_rows at a time, and each tile of the cache is decoded once
// for the group.
//   q, q_scale, k_off, out: as tq_decode_cpu's, with N rows
extern "C" int tq_prefill_cpu(
    const uint8_t* cache, int64_t s_blk, int64_t s_head, int64_t s_tok,
    const int64_t* block_table, int64_t bt_stride, const int64_t* row_seq,
    const int64_t* row_len, const void* q, int q_dt, int64_t q_row, const float* q_scale,
    const float* k_off, const float* rot_k_t, const float* sketch_t, const float* rot_v,
    int64_t N, int64_t Hq, int64_t H, int64_t d, int64_t block_size, int64_t split_tokens,
    float scale, float qjl_scale, const int64_t* kdesc_p, const float* k_books,
    const int64_t* vdesc_p, const float* v_books, void* out, int out_dt, int64_t out_row,
    int num_threads, int64_t group_rows) {
  if (check(Hq, H, d, block_size, split_tokens, s_tok, kdesc_p, vdesc_p) || group_rows < 1) return -1;
  const int64_t G = Hq / H;
  const Desc kd = read_desc(kdesc_p), vd = read_desc(vdesc_p);
  const bool qjl = kd.sign_off >= 0 && sketch_t != nullptr;
  // a group's rows share a body: a new group where the sequence, or the body amx_row
  // gives its rows, changes, and groups of the body's size
  const bool amx = amx_handles(q_dt, kd, vd, qjl, G, split_tokens);
  auto on_amx = [&](int64_t r) { return amx && amx_row(G, row_len[r]); };
  int64_t amx_rows = 0;
  std::vector<int64_t> row_split(N + 1, 0), groups{0};
  int64_t max_splits = 1;
  for (int64_t r = 0; r < N; ++r) {
    if (row_len[r] < 1) return -1;
    const int64_t ns = (row_len[r] + split_tokens - 1) / split_tokens;
    row_split[r + 1] = row_split[r] + ns;
    max_splits = std::max(max_splits, ns);
    const bool a = on_amx(r);
    amx_rows += a;
    if (r > 0 && (row_seq[r] != row_seq[r - 1] || a != on_amx(r - 1) ||
                  r - groups.back() == (a ? amx_group_rows(G) : group_rows)))
      groups.push_back(r);
  }
  if (N > 0) groups.push_back(N);
  const int64_t n_groups = (int64_t)groups.size() - 1, total = row_split[N];
  const Queries Q = prepare_queries({q, q_dt, q_row, q_scale}, N, Hq, G, d, rot_k_t,
                                    qjl ? sketch_t : nullptr, k_off, num_threads);
  Workspace& w = workspace();
  const Step step{cache, s_blk, s_head, s_tok, block_table, bt_stride, row_len, row_seq,
                  row_split.data(), groups.data(), Q.q_rot, Q.q_sk, Q.q_off, Hq, H, G, d, block_size,
                  max_splits, split_tokens, scale,
                  qjl_scale, kd, vd, make_codebooks(kd, k_books), make_codebooks(vd, v_books),
                  grow(w.acc, total * Hq * d), grow(w.m, total * Hq), grow(w.l, total * Hq)};
  const Output o{out, out_dt, out_row};
  const TaskFn f32 = for_group_size<PrefillTask>(G);
  if (amx_rows)
    run_amx(step, k_books, v_books, true, amx_rows < N ? f32 : nullptr,
            n_groups * H * max_splits, N, rot_v, o, num_threads);
  else
    run(step, f32, n_groups * H * max_splits, N, rot_v, o, num_threads);
  return 0;
}

// Lets the AVX-512 build run bf16 models' decode and prefill on the tile bodies: mode 0
// never, 1 for GQA groups of AMX_MIN_G query heads or more and rows of AMX_MIN_LEN tokens
// or more (amx_row), 2 for every row; dp 0 their products on AMX tiles, 1 on vdpbf16ps
// (g_amx_dp). Returns the mode in effect: 0 without this build or, on tiles, without the
// kernel's permission for tile data (asked here); the caller checks the CPU has
// AVX512-BF16 and VBMI, and AMX-BF16 for tiles.
extern "C" int tq_amx_enable(int mode, int dp) {
#if defined(__AVX512F__)
  g_amx_dp = dp != 0;
  g_amx = mode >= AMX_AUTO && mode <= AMX_ON && (g_amx_dp || amx_request()) ? mode : AMX_OFF;
  return g_amx;
#else
  (void)mode;
  (void)dp;
  return 0;
#endif
}

// The AMX mode in effect (tq_amx_enable's last answer).
extern "C" int tq_amx_mode() {
#if defined(__AVX512F__)
  return g_amx;
#else
  return 0;
#endif
}
