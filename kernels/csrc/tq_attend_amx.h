// tq-vllm: decode and prefill attention over the packed cache on bf16 products (bf16
// models): AMX tiles, or on CPUs with AVX512-BF16 but no AMX (AMD Zen 4) the same products
// on vdpbf16ps (g_amx_dp: dp_scores, dp_values). "AMX bodies" below means both.
//
// Included by tq_decode_cpu.cpp after its Step / RowState / softmax helpers; compiled in
// the AVX-512 build only, each function with the AMX target attribute (the library runs
// on AVX-512 CPUs without AVX512-BF16, which never call these, and on CPUs without AMX,
// which call them with g_amx_dp set and so execute no tile instruction: tq_amx_enable says
// which).
//
// On vdpbf16ps (a 2-core Zen 4, one thread, d 64): prefill 1.6-1.8x faster than the
// float32 bodies at GQA 3, 1.25x at GQA 7; decode 0-15% faster from 256 tokens (GQA 1 at
// d 64: 5% slower), so every row takes them there by default (docs/performance.md); since
// the fill runs chunk by chunk and decode decodes its values in the value product, decode
// of 4k-token rows takes another 14-29% less (twenty-eighth session).
//
// Why: on this project's Xeon host a 512-bit FMA does 32 multiply-adds a cycle per core
// and vdpbf16ps 16 (one every two cycles, measured), while one AMX TDPBF16PS does a
// 16 x 16 x 32 bf16 product. vLLM-CPU's own bf16 attention runs on AMX; float32 FMAs
// over decoded codes cannot keep up with it on long prompts (a 4k-token prefill: 135 ms a
// layer against vLLM's 28 ms).
//
// Arithmetic (the bf16 class of vLLM's attention): the rotated query is rounded to bf16,
// the codebooks' centroids are bf16 (a 32-word table per group, looked up with vpermw),
// and the softmax weights x value norms are rounded to bf16 before the value product;
// products accumulate in float32 inside TDPBF16PS. Norms, offsets, scale, the softmax
// itself and the running sums stay float32 and are applied exactly as the float32 path
// applies them. AMX's internal summation order is not documented (it matches neither
// sequential fmaf order nor an exact sum, measured), so no FMA code can reproduce its
// bits: decode and prefill therefore both run these tiles, a pass of N (row, query head)
// pairs at once (N = G in decode), each output element depending only on its own row and
// column: a prompt row still gets exactly the bits of its decode step.
//
// A task reads its split (AMX_BT = 512 tokens, the float32 bodies' split) as one block:
//   fill    each slot read once; keys as token-major bf16 chunks (one byte permute, one
//           shift, one table lookup per 32 coordinates), values as token-pair rows (VNNI),
//           norms and offset flags gathered 16 tokens at a time; a decode step of <= 8
//           pairs on vdpbf16ps leaves the values in their codes and decodes each token pair
//           inside the value product instead (dp_values_codes: the same words)
//   scores  C [16 tokens][N] = keys A x query B [coordinate pairs][N][2] (four C tiles in
//           flight), transposed to [N][tokens] for the softmax
//   softmax one update per pair and block over its tokens (vectors over tokens), the
//           weights x value norms rounded to bf16 as A [N][32 tokens] rows
//   values  C [N][16 coordinates] = weights A x values B, accumulated in the tile over
//           the block, added once to the pair's running sums (scaled by the update)
// Handing data between vector registers and tiles goes through memory and costs ~60-120
// cycles a hand-off (measured); a block pays each of the four hand-offs once.
#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#define TQ_AMX_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vbmi,amx-tile,amx-bf16")))

namespace {

constexpr int AMX_BT = 512;   // tokens per block: one fill, one online-softmax update (= split)
constexpr int AMX_TT = 32;    // tokens per value product: its K extent (64 bytes of bf16)
constexpr int AMX_HALF = 16;  // tokens per score product: a tile's 16 rows
constexpr int AMX_MAXN = 16;  // (row, query head) pairs per pass: the 16 columns / rows of C
constexpr int AMX_CHUNK = 32; // coordinates per key product: the K extent of one TDPBF16PS
constexpr int AMX_VCHUNK = 16; // coordinates per value product: C's 16 float32 columns

// Set by tq_amx_enable: AMX_OFF, AMX_AUTO (GQA groups of AMX_MIN_G heads or more, and
// rows of AMX_MIN_LEN tokens or more) or AMX_ON (every row, groups up to AMX_MAXN), once
// the process may use AMX tiles.
constexpr int AMX_OFF = 0, AMX_AUTO = 1, AMX_ON = 2;
int g_amx = AMX_OFF;
// The tile products on AVX512-BF16 dot products (vdpbf16ps) instead of AMX tiles: CPUs with
// AVX512-BF16 and VBMI but no AMX (AMD Zen 4). Same blocks, layouts, fill and softmax; each
// product element is summed by a fixed sequence of vdpbf16ps over its own row and column
// only, so a prompt row keeps its decode step's bits on these products too (not AMX's).
bool g_amx_dp = false;
// Decode on these bodies costs per token about what the float32 bodies cost per token and
// query head: they win from ~6 query heads a KV head (measured on the Xeon host, 16
// sequences of 300 / 4096 tokens: float32 time / AMX time 0.82 / 0.98 at G = 3, 0.83 /
// 1.12 at 5, 1.03 / 1.20 at 6, 1.11 / 1.39 at 7); prefill is ~2x faster at G = 3 and 7.
constexpr int64_t AMX_MIN_G = 6;
// Rows (a decode step, or a prompt token) attending to this many tokens or more take the
// AMX bodies in AMX_AUTO at any group size: a long prompt's prefill is ~2x faster on
// tiles, while a long row's decode at G = 3 costs ~1.25x the float32 body's (8 sequences
// of 1k-8k tokens, one thread); long prompts are where that trade pays (SmolLM2, 8 prompts
// of ~4k tokens through vLLM: 0.50x auto's throughput on the float32 bodies, 0.64-0.69x
// with this rule, 0.76x with every row on AMX).
// The body follows the row's own length only, so a row gets the same bits alone or in any
// batch, and a prompt row its decode step's.
constexpr int64_t AMX_MIN_LEN = 2048;

// Which body a row of `len` tokens takes once amx_handles said the AMX bodies may run.
inline bool amx_row(int64_t G, int64_t len) {
  return g_amx == AMX_ON || G >= AMX_MIN_G || len >= AMX_MIN_LEN;
}

// Tile registers (palette 1), configured per phase of a block (a configuration load
// zeroes the tiles; each phase starts from zero anyway). TDPBF16PS takes ~16 cycles but
// its result ~50 later: each phase keeps four independent C tiles in flight.
//   scores:  0-3 C [16 tokens][N] (four 16-token runs), 4, 5 keys A [16 tokens][32
//            coordinates], 6 query B [16 coordinate pairs][N][2]
//   values:  0-3 C [N][16 coordinates] (four chunks), 4, 5 weights A [N][32 tokens],
//            6, 7 values B [16 token pairs][16 coordinates][2]
struct alignas(64) TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

TQ_AMX_TARGET inline void amx_configure(int N, bool values) {
  TileConfig c{};
  c.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    const bool is_c = t < 4, is_a = t == 4 || t == 5;
    if (values) {
      c.rows[t] = (uint8_t)(is_c || is_a ? N : 16);
      c.colsb[t] = 64;
    } else {
      c.rows[t] = 16;
      c.colsb[t] = (uint16_t)(is_a ? 64 : 4 * N);
    }
  }
  _tile_loadconfig(&c);
}

// What a group of codes needs for the bf16 lookups: the 32-word bf16 table (the codebook
// repeated with period 2^bits, so the bits above a code in its index word do not matter),
// and per chunk the byte permute and per-word shift that put a code at the low bits of
// its word, read from a window of the group's codes loaded masked to the group's bytes.
// Keys: word w = coordinate w of a 32-coordinate chunk, from the 64-byte window starting
// at byte 32 kwin[c]. Values: word 2k + e = coordinate k of token e of a pair (16
// coordinates), from a window holding 32 bytes of each token (token 0's in its low half,
// token 1's in its high half) starting at byte 16 vwin[c].
constexpr int AMX_KCHUNKS = MAX_D / AMX_CHUNK, AMX_VCHUNKS = MAX_D / AMX_VCHUNK;
constexpr int AMX_WINDOWS = MAX_D * 4 / 8 / 32;   // key windows: 64 bytes from every 32nd byte
constexpr int AMX_VWINDOWS = MAX_D * 4 / 8 / 16;  // value windows: 32 bytes from every 16th byte
struct AmxGroup {
  __m512i table;
  __m512i kpat[AMX_KCHUNKS], vpat[AMX_VCHUNKS];
  __m512i kshift, vshift;
  __mmask64 wmask[AMX_WINDOWS];   // key window w's bytes inside the group
  __mmask64 vmask[AMX_VWINDOWS];  // value window w of a token pair: token 0's bytes, token 1's at 32..
  int kwin[AMX_KCHUNKS], vwin[AMX_VCHUNKS];
  int bits, dim;
  int64_t seg_off;
};

TQ_AMX_TARGET inline AmxGroup amx_group(const Desc& d, int g, const float* books) {
  AmxGroup a{};
  a.bits = (int)d.bits[g];
  a.dim = (int)d.dim[g];
  a.seg_off = d.seg_off[g];
  alignas(64) uint16_t tab[32];
  for (int i = 0; i < 32; ++i) tab[i] = float_to_bf16(books[16 * g + i % (1 << a.bits)]);
  a.table = _mm512_loadu_si512(tab);
  const int nbytes = a.dim * a.bits / 8;
  for (int w = 0; w < AMX_WINDOWS; ++w) {
    const int left = std::clamp(nbytes - 32 * w, 0, 64);
    a.wmask[w] = left >= 64 ? ~0ULL : ((1ULL << left) - 1);
  }
  alignas(64) uint8_t pat[64];
  alignas(64) uint16_t sh[32];
  for (int c = 0; c * AMX_CHUNK < a.dim; ++c) {  // keys
    const int o0 = c * AMX_CHUNK * a.bits;       // chunk's first bit in the group
    a.kwin[c] = o0 / 256;
    for (int w = 0; w < 32; ++w) {
      const int o = o0 + w * a.bits - 256 * a.kwin[c];
      pat[2 * w] = (uint8_t)(o / 8);
      pat[2 * w + 1] = (uint8_t)(o / 8 + 1);
      sh[w] = (uint16_t)(o % 8);
    }
    a.kpat[c] = _mm512_loadu_si512(pat);
    if (c == 0) a.kshift = _mm512_loadu_si512(sh);  // the same for every chunk (32 x bits bits)
  }
  for (int c = 0; c * AMX_VCHUNK < a.dim; ++c) {  // values: 32-byte windows, token e's at 32 e
    const int o0 = c * AMX_VCHUNK * a.bits;        // a chunk's 2 x bits (+ 1) bytes start in the
    a.vwin[c] = o0 / 128;                          // window's first 16: they end inside it
    for (int w = 0; w < 32; ++w) {
      const int k = w / 2, e = w % 2, o = o0 + k * a.bits - 128 * a.vwin[c];
      pat[2 * w] = (uint8_t)(o / 8 + 32 * e);
      pat[2 * w + 1] = (uint8_t)(o / 8 + 1 + 32 * e);
      sh[w] = (uint16_t)(o % 8);
    }
    a.vpat[c] = _mm512_loadu_si512(pat);
    if (c == 0) a.vshift = _mm512_loadu_si512(sh);  // the same for every chunk (16 x bits bits)
  }
  for (int w = 0; w < AMX_VWINDOWS; ++w) {
    const int left = std::clamp(nbytes - 16 * w, 0, 32);
    const __mmask64 lo = left >= 32 ? 0xFFFFFFFFULL : ((1ULL << left) - 1);
    a.vmask[w] = lo | (lo << 32);
  }
  return a;
}

struct AmxBooks {
  AmxGroup k[2], v[2];
};

// One block of AMX_BT tokens: keys as token-major chunks, values as token-pair rows, norms
// and offset flags; and a pass's scratch over it. Tokens n.. of the block are read from
// slots[0] (any readable slot): their norms are zero and their weights zero, so what they
// hold never reaches an output.
struct AmxBlock {
  alignas(64) uint16_t kt[AMX_KCHUNKS][AMX_BT][AMX_CHUNK];          // [chunk][token][coordinate]
  alignas(64) uint16_t vb[AMX_VCHUNKS][AMX_BT / 2][2 * AMX_VCHUNK];  // [chunk][pair][coord x 2]
  alignas(64) float nk[2][AMX_BT];
  alignas(64) float nv[2][AMX_BT];
  alignas(64) float fl[AMX_BT];
  alignas(64) float c[2][AMX_BT][AMX_MAXN];   // scores per key group as the C tiles give them
  alignas(64) float sc[2][AMX_MAXN][AMX_BT];  // the same transposed: [lane][token]
  alignas(64) uint16_t pa[2][AMX_MAXN][AMX_BT];  // bf16 weights x value norms per value group
};

// The 4-byte words at byte `at` of 16 slots (offs[0..1]: offsets from the first)
TQ_AMX_TARGET __attribute__((always_inline)) inline __m512i words_at(const uint8_t* at, const __m512i* offs) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_i64gather_epi32(offs[0], at, 1)),
                            _mm512_i64gather_epi32(offs[1], at, 1), 1);
}

// The fp16 in the low / high half of each word, as float32
TQ_AMX_TARGET __attribute__((always_inline)) inline V low_halves(__m512i w) {
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(w));
}
TQ_AMX_TARGET __attribute__((always_inline)) inline V high_halves(__m512i w) {
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(w, 16)));
}

// Tokens ahead of the one being decoded whose slots the fill's first pass fetches toward
// L1: a block's tokens are runs of cache blocks, not one stream the hardware prefetchers
// follow (64 and 128 measured the same as 32 on the Zen 4 host, twenty-eighth session).
constexpr int FILL_AHEAD = 32;
TQ_AMX_TARGET __attribute__((always_inline)) inline void prefetch_slot(const Step& P, const uint8_t* slot) {
  for (int64_t b = 0; b < P.s_tok; b += 64) _mm_prefetch(reinterpret_cast<const char*>(slot + b), _MM_HINT_T0);
}

// The bf16 centroids (unit scale) of key chunk k of group a for the block's nf tokens ->
// dst [token][32]: one pass over the tokens with the chunk's window mask, byte pattern,
// shifts and table held in registers (per token a load, two permutes, a shift and a store).
// Decoding a token's chunks in turn instead reloaded every group's patterns and loop state
// per token: the fill took 38% longer for tq3's split codes at d 64 and decode 4-18% longer
// (docs/performance.md, twenty-eighth session). The window is loaded zero past the group:
// a chunk's last word reads one byte past its codes, which must not come from past the
// slot. PF: the block's first pass, which fetches each slot FILL_AHEAD tokens before it is
// decoded; later passes find the slots in L1 / L2.
template <bool PF>
TQ_AMX_TARGET inline void key_chunks(const Step& P, const uint8_t* const* slots, int n, int nf,
                                     const AmxGroup& a, int k, uint16_t (*dst)[AMX_CHUNK]) {
  const int64_t off = a.seg_off + 32 * a.kwin[k];
  const __mmask64 m = a.wmask[a.kwin[k]];
  const __m512i pat = a.kpat[k], sh = a.kshift, tab = a.table;
  for (int i = 0; i < nf; ++i) {
    if (PF && i + FILL_AHEAD < n) prefetch_slot(P, slots[i + FILL_AHEAD]);
    const __m512i x = _mm512_maskz_loadu_epi8(m, slots[i] + off);
    const __m512i w = _mm512_srlv_epi16(_mm512_permutexvar_epi8(pat, x), sh);
    _mm512_storeu_si512(dst[i], _mm512_permutexvar_epi16(w, tab));
  }
}

// Value chunk k's window, pattern, shift and table, held in registers over a pass.
struct ValueChunk {
  int64_t off;
  __mmask64 m0, m1;
  __m512i pat, sh, tab;
};
TQ_AMX_TARGET __attribute__((always_inline)) inline ValueChunk value_chunk(const AmxGroup& a, int k) {
  const __mmask64 m = a.vmask[a.vwin[k]];
  return {a.seg_off + 16 * a.vwin[k], m & 0xFFFFFFFFULL, m & ~0xFFFFFFFFULL, a.vpat[k], a.vshift, a.table};
}
// The pair of tokens at s0, s1 (slots) as value chunk v's bf16 words, interleaved
TQ_AMX_TARGET __attribute__((always_inline)) inline __m512i value_pair_words(const ValueChunk& v,
                                                                            const uint8_t* s0,
                                                                            const uint8_t* s1) {
  const __m512i x = _mm512_mask_loadu_epi8(_mm512_maskz_loadu_epi8(v.m0, s0 + v.off), v.m1, s1 + v.off - 32);
  return _mm512_permutexvar_epi16(_mm512_srlv_epi16(_mm512_permutexvar_epi8(v.pat, x), v.sh), v.tab);
}

// Value chunk k of group a for the block's nf tokens, a token pair at a time -> dst
// [pair][32], interleaved (VNNI: word 2j + e = token e's coordinate j), as key_chunks. A
// pair's window holds token 0's 32 bytes from byte 16 vwin[k], then token 1's, zero past
// the group (two masked loads: a two-source byte permute costs 4 cycles a call, measured).
TQ_AMX_TARGET inline void value_chunks(const uint8_t* const* slots, int nf, const AmxGroup& a, int k,
                                       uint16_t (*dst)[2 * AMX_VCHUNK]) {
  const ValueChunk v = value_chunk(a, k);
  for (int i = 0; i < nf; i += 2) _mm512_storeu_si512(dst[i / 2], value_pair_words(v, slots[i], slots[i + 1]));
}

// The block's keys, values (unless `values` is false: a decode step that decodes them in its
// value product), norms and offset flags from its n slots (padded to whole 32-token steps
// with slots[0]).
TQ_AMX_TARGET inline void amx_fill(const Step& P, const AmxBooks& bk, const uint8_t** slots, int n,
                                   AmxBlock& T, bool values) {
  const int nf = (n + AMX_TT - 1) / AMX_TT * AMX_TT;  // whole 32-token steps: what the products read
  for (int i = n; i < nf; ++i) slots[i] = slots[0];
  for (int i = 0; i < FILL_AHEAD && i < n; ++i) prefetch_slot(P, slots[i]);
  for (int g = 0, c = 0; g < P.kd.ngroups; ++g)
    for (int k = 0; k * AMX_CHUNK < bk.k[g].dim; ++k, ++c) {
      if (c == 0) key_chunks<true>(P, slots, n, nf, bk.k[g], k, T.kt[c]);
      else key_chunks<false>(P, slots, n, nf, bk.k[g], k, T.kt[c]);
    }
  for (int g = 0, c = 0; g < P.vd.ngroups && values; ++g)
    for (int k = 0; k * AMX_VCHUNK < bk.v[g].dim; ++k, ++c) value_chunks(slots, nf, bk.v[g], k, T.vb[c]);
  const uint8_t* s0 = slots[0];
  __m512i offs[AMX_BT / 8];  // tokens 8v .. 8v + 7: byte offsets from slots[0]
  for (int v = 0; v < nf / 8; ++v) {
    alignas(64) int64_t o[8];
    for (int i = 0; i < 8; ++i) o[i] = (int64_t)(slots[8 * v + i] - s0);
    offs[v] = _mm512_load_si512(o);
  }
  // norms: read as 4-byte words ending past them inside the slot (codes follow each), one
  // word per tensor: group 0's fp16 in its low half, group 1's (a split code) in its high
  const V absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int t = 0; t < nf; t += W) {
    const __mmask16 live = t >= n ? 0 : (t + W <= n ? 0xFFFF : (__mmask16)((1u << (n - t)) - 1));
    const __m512i wk = words_at(s0 + P.kd.norm_off, offs + t / 8);
    storeu(T.nk[0] + t, _mm512_maskz_and_ps(live, low_halves(wk), absmask));
    if (P.kd.ngroups > 1) storeu(T.nk[1] + t, _mm512_maskz_and_ps(live, high_halves(wk), absmask));
    // the first key norm's sign bit flags a key stored with its offset
    const __mmask16 f = P.q_off != nullptr ? _mm512_mask_test_epi32_mask(live, wk, _mm512_set1_epi32(0x8000)) : 0;
    storeu(T.fl + t, _mm512_maskz_mov_ps(f, set1(1.f)));
    const __m512i wv = words_at(s0 + P.vd.norm_off, offs + t / 8);
    storeu(T.nv[0] + t, _mm512_maskz_mov_ps(live, low_halves(wv)));
    if (P.vd.ngroups > 1) storeu(T.nv[1] + t, _mm512_maskz_mov_ps(live, high_halves(wv)));
  }
}

// The calling thread's block buffer (large: a plain reference, not a TLS lookup per use).
__attribute__((noinline)) AmxBlock& amx_block() {
  thread_local AmxBlock b;
  return b;
}

// A pass: N = rows x G (row, query head) pairs (pair p = row p / G, head p % G); its query
// B tiles and per-pair state, kept across the blocks of a task.
struct AmxPass {
  alignas(64) uint32_t qb[AMX_KCHUNKS][AMX_CHUNK / 2][AMX_MAXN];  // bf16 pairs, VNNI
  alignas(64) float acc[AMX_MAXN][MAX_D];                               // rotated value sums
  float m[AMX_MAXN], l[AMX_MAXN], qo[AMX_MAXN];
  int rows;
};

TQ_AMX_TARGET inline void amx_pass_init(const Step& P, int64_t q0, int rows, int G, AmxPass& S) {
  const int64_t d = P.d;
  const int N = rows * G;
  S.rows = rows;  // qb lanes past N are never read: a B tile's rows are 4 N bytes
  for (int p = 0; p < AMX_MAXN; ++p) {
    S.m[p] = -INFINITY;
    S.l[p] = 0.f;
    S.qo[p] = 0.f;
  }
  for (int p = 0; p < N; ++p) {
    const int64_t qi = q0 + (p / G) * P.Hq + p % G;
    if (P.q_off != nullptr) S.qo[p] = P.q_off[qi];
    const float* q = P.q_rot + qi * d;
    alignas(64) uint32_t pairs[MAX_D / 2];  // bf16 (round to nearest even) pairs, in order
    for (int64_t k = 0; k < d; k += 2 * W)
      _mm512_storeu_si512(pairs + k / 2, (__m512i)_mm512_cvtne2ps_pbh(loadu(q + k + W), loadu(q + k)));
    for (int64_t kk = 0; kk < d / 2; ++kk) S.qb[kk / (AMX_CHUNK / 2)][kk % (AMX_CHUNK / 2)][p] = pairs[kk];
    std::fill(S.acc[p], S.acc[p] + d, 0.f);
  }
}

// GCC's tile intrinsics take the register number as a literal (pasted into the
// instruction), hence macros. Scores of up to four 16-token runs from `tok` (C tiles 0..nr-1)
// over key chunks ch0 .. ch0 + nch - 1, stored to out[tok + 16 r] ([16][AMX_MAXN] each).
#define TQ_AMX_KEY(TC, TA, T, ch, tok)                                  \
  do {                                                                  \
    _tile_loadd(TA, (T).kt[ch][tok], 2 * AMX_CHUNK);                    \
    _tile_dpbf16ps(TC, TA, 6);                                          \
  } while (0)
TQ_AMX_TARGET inline void amx_scores(AmxBlock& T, const AmxPass& S, int ch0, int nch, int tok, int nr,
                                     float (*out)[AMX_MAXN]) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int ch = ch0; ch < ch0 + nch; ++ch) {
    _tile_loadd(6, S.qb[ch], 4 * AMX_MAXN);
    TQ_AMX_KEY(0, 4, T, ch, tok);
    if (nr > 1) TQ_AMX_KEY(1, 5, T, ch, tok + AMX_HALF);
    if (nr > 2) TQ_AMX_KEY(2, 4, T, ch, tok + 2 * AMX_HALF);
    if (nr > 3) TQ_AMX_KEY(3, 5, T, ch, tok + 3 * AMX_HALF);
  }
  _tile_stored(0, out[tok], 4 * AMX_MAXN);
  if (nr > 1) _tile_stored(1, out[tok + AMX_HALF], 4 * AMX_MAXN);
  if (nr > 2) _tile_stored(2, out[tok + 2 * AMX_HALF], 4 * AMX_MAXN);
  if (nr > 3) _tile_stored(3, out[tok + 3 * AMX_HALF], 4 * AMX_MAXN);
}

// Values of up to four 16-coordinate chunks ch0 .. ch0 + nc - 1 (C tiles 0..nc-1) x the
// weights pa over ns 32-token steps -> o[c] [AMX_MAXN][16]. A step's weights go to A tile
// TA (4 and 5 in turn, so a step's load need not wait for the last step's products).
#define TQ_AMX_VAL(TC, TA, TB, T, ch, st)                                    \
  do {                                                                       \
    _tile_loadd(TB, (T).vb[ch][(st) * AMX_HALF], 4 * AMX_VCHUNK);            \
    _tile_dpbf16ps(TC, TA, TB);                                              \
  } while (0)
#define TQ_AMX_VAL_STEP(TA, T, pa, ch0, nc, st)                              \
  do {                                                                       \
    _tile_loadd(TA, (pa)[0] + (st) * AMX_TT, 2 * AMX_BT);                    \
    TQ_AMX_VAL(0, TA, 6, T, ch0, st);                                        \
    if ((nc) > 1) TQ_AMX_VAL(1, TA, 7, T, (ch0) + 1, st);                    \
    if ((nc) > 2) TQ_AMX_VAL(2, TA, 6, T, (ch0) + 2, st);                    \
    if ((nc) > 3) TQ_AMX_VAL(3, TA, 7, T, (ch0) + 3, st);                    \
  } while (0)
TQ_AMX_TARGET inline void amx_values(AmxBlock& T, const uint16_t (*pa)[AMX_BT], int ch0, int nc, int ns,
                                     float (*o)[AMX_MAXN][AMX_VCHUNK]) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int st = 0; st < ns; ++st) {
    if (st % 2 == 0) TQ_AMX_VAL_STEP(4, T, pa, ch0, nc, st);
    else TQ_AMX_VAL_STEP(5, T, pa, ch0, nc, st);
  }
  _tile_stored(0, o[0], 4 * AMX_VCHUNK);
  if (nc > 1) _tile_stored(1, o[1], 4 * AMX_VCHUNK);
  if (nc > 2) _tile_stored(2, o[2], 4 * AMX_VCHUNK);
  if (nc > 3) _tile_stored(3, o[3], 4 * AMX_VCHUNK);
}

// acc + a . (the bf16 pair at p, broadcast): vdpbf16ps with an embedded broadcast, which
// GCC does not fold from set1 (a separate broadcast load per product otherwise)
// (may_alias: p points into bf16 arrays written as uint16_t, which the asm reads as one word)
typedef int32_t __attribute__((may_alias)) dp_word;
TQ_AMX_TARGET __attribute__((always_inline)) inline __m512 dp_bcast(__m512 acc, __m512bh a, const void* p) {
  asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(a), "m"(*static_cast<const dp_word*>(p)));
  return acc;
}

// dp_scores / dp_values: amx_scores / amx_values on vdpbf16ps (g_amx_dp). Lane p of a
// score vector is pair p (a C tile's column), lane k of a value vector coordinate k; a lane
// sums its products in a fixed order whatever N is. DP_TOKENS tokens' (DP_PAIRS pairs' x 2)
// accumulators are in flight: independent chains over the instruction's latency.
constexpr int DP_TOKENS = 8;
constexpr int DP_PAIRS = 4;

// out[t][p] = sum over chunks ch0 .. ch0 + nch - 1 and their coordinate pairs of key t x
// query p, for the 16 x nr tokens from tok (lanes N.. zero)
TQ_AMX_TARGET inline void dp_scores(const AmxBlock& T, const AmxPass& S, int ch0, int nch, int tok, int nr,
                                    int N, float (*out)[AMX_MAXN]) {
  const __mmask16 live = (__mmask16)((1u << N) - 1);
  for (int t0 = tok; t0 < tok + nr * AMX_HALF; t0 += DP_TOKENS) {
    __m512 acc[DP_TOKENS];
    for (int i = 0; i < DP_TOKENS; ++i) acc[i] = _mm512_setzero_ps();
    for (int ch = ch0; ch < ch0 + nch; ++ch)
      for (int kk = 0; kk < AMX_CHUNK / 2; ++kk) {
        const __m512bh q = (__m512bh)_mm512_maskz_loadu_epi32(live, S.qb[ch][kk]);
        for (int i = 0; i < DP_TOKENS; ++i) {
          acc[i] = dp_bcast(acc[i], q, &T.kt[ch][t0 + i][2 * kk]);  // coordinates 2 kk, 2 kk + 1
        }
      }
    for (int i = 0; i < DP_TOKENS; ++i) _mm512_storeu_ps(out[t0 + i], acc[i]);
  }
}

// dp_scores for a pass of NP <= DP_FEW_PAIRS pairs (decode: NP = G), lanes = tokens: each
// 16-token run's key chunk transposed to [coordinate pair][token], then per pair one
// vdpbf16ps per coordinate pair over RUNS runs. Each (token, pair) gets the same sequence
// of vdpbf16ps as in dp_scores, key and query pairs in swapped operands: its two bf16
// products are exact in float32 and added in the instruction's fixed order either way, so
// the same bits (a prompt row's pass is wide, its decode step's narrow; the prefill-vs-decode
// tests check it); written straight to sc [pair][token].
constexpr int DP_FEW_PAIRS = 8;
template <int NP, int RUNS>
TQ_AMX_TARGET inline void dp_scores_few(const AmxBlock& T, const AmxPass& S, int ch0, int nch, int tok,
                                        float (*sc)[AMX_BT]) {
  __m512 acc[RUNS][NP];
  for (int r = 0; r < RUNS; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_ps();
  for (int ch = ch0; ch < ch0 + nch; ++ch) {
    alignas(64) float kv[RUNS][AMX_CHUNK / 2][AMX_HALF];  // token i's coordinate pair kk at [kk][i]
    for (int r = 0; r < RUNS; ++r)
      transpose_block(reinterpret_cast<const float*>(T.kt[ch][tok + r * AMX_HALF]), AMX_CHUNK / 2, kv[r][0],
                      AMX_HALF);
    for (int kk = 0; kk < AMX_CHUNK / 2; ++kk)
      for (int p = 0; p < NP; ++p)
        for (int r = 0; r < RUNS; ++r)
          acc[r][p] = dp_bcast(acc[r][p], (__m512bh)_mm512_load_si512(kv[r][kk]), &S.qb[ch][kk][p]);
  }
  for (int r = 0; r < RUNS; ++r)
    for (int p = 0; p < NP; ++p) _mm512_storeu_ps(sc[p] + tok + r * AMX_HALF, acc[r][p]);
}

template <int NP>
TQ_AMX_TARGET inline void dp_scores_few_runs(const AmxBlock& T, const AmxPass& S, int ch0, int nch, int tok,
                                             int nr, float (*sc)[AMX_BT]) {
  for (int r = 0; r < nr; r += 2) {
    if (nr - r >= 2) dp_scores_few<NP, 2>(T, S, ch0, nch, tok + r * AMX_HALF, sc);
    else dp_scores_few<NP, 1>(T, S, ch0, nch, tok + r * AMX_HALF, sc);
  }
}

// dp_scores_few over N <= DP_FEW_PAIRS pairs: sc [pair][token] for the 16 x nr tokens from tok
TQ_AMX_TARGET inline void dp_scores_t(const AmxBlock& T, const AmxPass& S, int ch0, int nch, int tok, int nr,
                                      int N, float (*sc)[AMX_BT]) {
  switch (N) {
    case 1: dp_scores_few_runs<1>(T, S, ch0, nch, tok, nr, sc); break;
    case 2: dp_scores_few_runs<2>(T, S, ch0, nch, tok, nr, sc); break;
    case 3: dp_scores_few_runs<3>(T, S, ch0, nch, tok, nr, sc); break;
    case 4: dp_scores_few_runs<4>(T, S, ch0, nch, tok, nr, sc); break;
    case 5: dp_scores_few_runs<5>(T, S, ch0, nch, tok, nr, sc); break;
    case 6: dp_scores_few_runs<6>(T, S, ch0, nch, tok, nr, sc); break;
    case 7: dp_scores_few_runs<7>(T, S, ch0, nch, tok, nr, sc); break;
    default: dp_scores_few_runs<8>(T, S, ch0, nch, tok, nr, sc); break;
  }
}

// o[p][k] for NP pairs p0 .. p0 + NP - 1: their weights pa x a value chunk over ns 32-token
// steps, even and odd token pairs in two chains added at the end. words(st, tp) gives the
// chunk's interleaved bf16 words of token pairs tp and tp + 1 of step st (tokens 2 tp .. 2 tp
// + 3): read from the block's vb, or decoded from the slots in decode; the same words give
// the same bits either way.
template <int NP, class Words>
TQ_AMX_TARGET __attribute__((always_inline)) inline void dp_value_chains(Words words, const uint16_t (*pa)[AMX_BT],
                                                                        int ns, int p0, float* const* o) {
  __m512 a[NP][2];
  for (int p = 0; p < NP; ++p) a[p][0] = a[p][1] = _mm512_setzero_ps();
  for (int st = 0; st < ns; ++st)
    for (int tp = 0; tp < AMX_HALF; tp += 2) {
      __m512bh v0, v1;
      words(st, tp, v0, v1);
      for (int p = 0; p < NP; ++p) {
        const uint16_t* w = pa[p0 + p] + st * AMX_TT + 2 * tp;  // tokens 2 tp, 2 tp + 1, then the next two
        a[p][0] = dp_bcast(a[p][0], v0, w);
        a[p][1] = dp_bcast(a[p][1], v1, w + 2);
      }
    }
  for (int p = 0; p < NP; ++p) _mm512_storeu_ps(o[p], _mm512_add_ps(a[p][0], a[p][1]));
}

// dp_value_chains over value chunk ch of the block (its vb rows)
template <int NP>
TQ_AMX_TARGET inline void dp_value_pairs(const AmxBlock& T, const uint16_t (*pa)[AMX_BT], int ch, int ns,
                                         int p0, float* const* o) {
  dp_value_chains<NP>([&](int st, int tp, __m512bh& v0, __m512bh& v1) TQ_AMX_TARGET {
    v0 = (__m512bh)_mm512_loadu_si512(T.vb[ch][st * AMX_HALF + tp]);
    v1 = (__m512bh)_mm512_loadu_si512(T.vb[ch][st * AMX_HALF + tp + 1]);
  }, pa, ns, p0, o);
}

TQ_AMX_TARGET inline void dp_values(const AmxBlock& T, const uint16_t (*pa)[AMX_BT], int ch0, int nc, int ns,
                                    int N, float (*o)[AMX_MAXN][AMX_VCHUNK]) {
  for (int e = 0; e < nc; ++e)
    for (int p0 = 0; p0 < N; p0 += DP_PAIRS) {
      float* dst[DP_PAIRS];
      for (int p = 0; p < DP_PAIRS; ++p) dst[p] = o[e][std::min(p0 + p, AMX_MAXN - 1)];
      switch (std::min(DP_PAIRS, N - p0)) {
        case 4: dp_value_pairs<4>(T, pa, ch0 + e, ns, p0, dst); break;
        case 3: dp_value_pairs<3>(T, pa, ch0 + e, ns, p0, dst); break;
        case 2: dp_value_pairs<2>(T, pa, ch0 + e, ns, p0, dst); break;
        default: dp_value_pairs<1>(T, pa, ch0 + e, ns, p0, dst); break;
      }
    }
}

// dp_value_chains for a decode step of NP <= DP_FEW_PAIRS pairs, its token pairs decoded
// from the slots (value_pair_words) instead of read from the block's vb: the same bf16 words
// into the same vdpbf16ps sequence, so the same bits, without writing and reloading the
// block's values (decode's one pass reads each value once).
template <int NP>
TQ_AMX_TARGET inline void dp_value_pairs_codes(const ValueChunk& v, const uint8_t* const* slots,
                                               const uint16_t (*pa)[AMX_BT], int ns, float* const* o) {
  dp_value_chains<NP>([&](int st, int tp, __m512bh& v0, __m512bh& v1) TQ_AMX_TARGET {
    const uint8_t* const* s = slots + st * AMX_TT + 2 * tp;
    v0 = (__m512bh)value_pair_words(v, s[0], s[1]);
    v1 = (__m512bh)value_pair_words(v, s[2], s[3]);
  }, pa, ns, 0, o);
}

// dp_values for a decode step (N <= DP_FEW_PAIRS), chunks c0 .. c0 + nc - 1 of value group g
// decoded from the slots; every pair in one pass over them (noinline: one call per chunk
// run and block, kept out of amx_step's body)
TQ_AMX_TARGET __attribute__((noinline)) void dp_values_codes(const AmxGroup& g, int c0, int nc,
                                                             const uint8_t* const* slots,
                                                             const uint16_t (*pa)[AMX_BT], int ns, int N,
                                                             float (*o)[AMX_MAXN][AMX_VCHUNK], Ahead* ah) {
  for (int e = 0; e < nc; ++e) {
    if (ah != nullptr) ah->pump();
    const ValueChunk v = value_chunk(g, c0 + e);
    float* dst[DP_FEW_PAIRS];
    for (int p = 0; p < DP_FEW_PAIRS; ++p) dst[p] = o[e][p];
    switch (N) {
      case 8: dp_value_pairs_codes<8>(v, slots, pa, ns, dst); break;
      case 7: dp_value_pairs_codes<7>(v, slots, pa, ns, dst); break;
      case 6: dp_value_pairs_codes<6>(v, slots, pa, ns, dst); break;
      case 5: dp_value_pairs_codes<5>(v, slots, pa, ns, dst); break;
      case 4: dp_value_pairs_codes<4>(v, slots, pa, ns, dst); break;
      case 3: dp_value_pairs_codes<3>(v, slots, pa, ns, dst); break;
      case 2: dp_value_pairs_codes<2>(v, slots, pa, ns, dst); break;
      default: dp_value_pairs_codes<1>(v, slots, pa, ns, dst); break;
    }
  }
}

// One block for a pass: pair p reads the block's first rd[p] tokens (0: none, its state
// is left as it is). Scores, offsets and scale, one online-softmax update per pair and
// block, and the value product.
// codes: the block's slots where the values were left in their codes (amx_fill), else null.
// ah: the thread's prefetch of its next decode task (Ahead), pumped through the step, or null.
TQ_AMX_TARGET inline void amx_step(const Step& P, const AmxBooks& bk, AmxBlock& T, AmxPass& S,
                                   const int* rd, int G, const uint8_t* const* codes, Ahead* ah = nullptr) {
  const int N = S.rows * G, nkg = (int)P.kd.ngroups, nvg = (int)P.vd.ngroups;
  int nmax = 0;
  for (int p = 0; p < N; ++p) nmax = std::max(nmax, rd[p]);
  const int nh = (nmax + AMX_HALF - 1) / AMX_HALF;  // 16-token runs read by some pair
  if (!g_amx_dp) amx_configure(N, false);
  const bool few = g_amx_dp && N <= DP_FEW_PAIRS;  // scores straight to sc, [pair][token]
  const int ns = (nmax + AMX_TT - 1) / AMX_TT;  // 32-token steps of the value product
  if (ah != nullptr) {  // pumps: one a 64-token run of scores per key group, one a value chunk
    int64_t pumps = (int64_t)nkg * ((nh + 3) / 4);
    for (int g = 0; g < nvg && codes != nullptr; ++g) pumps += bk.v[g].dim / AMX_VCHUNK;
    ah->pace(pumps);
  }
  for (int g = 0, ch0 = 0; g < nkg; ch0 += bk.k[g].dim / AMX_CHUNK, ++g)
    for (int hf = 0; hf < nh; hf += 4) {
      const int nr = std::min(4, nh - hf), nch = bk.k[g].dim / AMX_CHUNK;
      if (few) dp_scores_t(T, S, ch0, nch, hf * AMX_HALF, nr, N, T.sc[g]);
      else if (g_amx_dp) dp_scores(T, S, ch0, nch, hf * AMX_HALF, nr, N, T.c[g]);
      else amx_scores(T, S, ch0, nch, hf * AMX_HALF, nr, T.c[g]);
      if (ah != nullptr) ah->pump();
    }
  for (int g = 0; g < nkg && !few; ++g)
    for (int hf = 0; hf < nh; ++hf)
      transpose_block(T.c[g][hf * AMX_HALF], AMX_MAXN, T.sc[g][0] + hf * AMX_HALF, AMX_BT);
  float corr[AMX_MAXN];
  const V scale = set1(P.scale);
  for (int p = 0; p < N; ++p) {
    const int n = rd[p];
    if (n == 0) {  // weights of zero: the value product adds nothing to its row
      for (int g = 0; g < nvg; ++g) std::fill(T.pa[g][p], T.pa[g][p] + ns * AMX_TT, (uint16_t)0);
      continue;
    }
    const int nv = (n + W - 1) / W;
    float* s0 = T.sc[0][p];
    const V qo = set1(S.qo[p]);
    V mv = set1(-INFINITY);
    for (int v = 0; v < nv; ++v) {
      const int t = v * W;
      V x = mul(loadu(s0 + t), loadu(T.nk[0] + t));
      if (nkg > 1) x = fmadd(loadu(T.sc[1][p] + t), loadu(T.nk[1] + t), x);
      x = mul(sub(x, mul(loadu(T.fl + t), qo)), scale);
      const __mmask16 live = n - t >= W ? 0xFFFF : (__mmask16)((1u << (n - t)) - 1);
      x = _mm512_mask_mov_ps(set1(-INFINITY), live, x);
      storeu(s0 + t, x);
      mv = vmax(mv, x);
    }
    const float m_old = S.m[p], m_new = std::max(m_old, reduce_max(mv));
    corr[p] = m_new == m_old ? 1.f : std::exp(m_old - m_new);
    V lsum = zero();
    const V mn = set1(m_new);
    for (int v = 0; v < ns * (AMX_TT / W); ++v) {
      const int t = v * W;
      V pv = zero();
      if (v < nv) {
        const __mmask16 live = n - t >= W ? 0xFFFF : (__mmask16)((1u << (n - t)) - 1);
        pv = _mm512_maskz_mov_ps(live, vexp(sub(loadu(s0 + t), mn)));
        lsum = add(lsum, pv);
      }
      for (int g = 0; g < nvg; ++g)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(T.pa[g][p] + t),
                            (__m256i)_mm512_cvtneps_pbh(mul(pv, loadu(T.nv[g] + t))));
    }
    S.l[p] = S.l[p] * corr[p] + reduce_add(lsum);
    S.m[p] = m_new;
  }
  if (!g_amx_dp) amx_configure(N, true);
  alignas(64) float o[4][AMX_MAXN][AMX_VCHUNK];
  int j = 0, ch = 0;
  for (int g = 0; g < nvg; ++g) {
    const int nc = bk.v[g].dim / AMX_VCHUNK;
    for (int c0 = 0; c0 < nc; c0 += 4) {
      const int nb = std::min(4, nc - c0);
      if (codes != nullptr) dp_values_codes(bk.v[g], c0, nb, codes, T.pa[g], ns, N, o, ah);
      else if (g_amx_dp) dp_values(T, T.pa[g], ch + c0, nb, ns, N, o);
      else amx_values(T, T.pa[g], ch + c0, nb, ns, o);
      for (int p = 0; p < N; ++p) {
        if (rd[p] == 0) continue;
        const V cv = set1(corr[p]);
        for (int e = 0; e < nb; ++e) {
          float* a = S.acc[p] + j + (c0 + e) * AMX_VCHUNK;
          storeu(a, fmadd(loadu(a), cv, loadu(o[e][p])));
        }
      }
    }
    j += bk.v[g].dim;
    ch += nc;
  }
}

// The pass's pairs as split sp of their rows (write_split's layout).
inline void amx_write(const Step& P, const AmxPass& S, int64_t r0, int64_t h, int64_t sp, int G) {
  for (int p = 0; p < S.rows * G; ++p) {
    const int64_t r = r0 + p / G;
    if (P.seq_lens[r] <= sp * P.split_tokens) continue;  // the row has no such split
    const int64_t o = P.split_slot(r, h * G + p % G) + sp;
    P.m_out[o] = S.m[p];
    P.l_out[o] = S.l[p];
    std::memcpy(P.acc_out + o * P.d, S.acc[p], P.d * sizeof(float));
  }
}

TQ_AMX_TARGET inline AmxBooks amx_books(const Step& P, const float* k_books, const float* v_books) {
  AmxBooks b{};
  for (int g = 0; g < P.kd.ngroups; ++g) b.k[g] = amx_group(P.kd, g, k_books);
  for (int g = 0; g < P.vd.ngroups; ++g) b.v[g] = amx_group(P.vd, g, v_books);
  return b;
}

// The tile's token slots from tt on (n of them).
inline void tile_slots(const Step& P, const int64_t* row, int64_t h, int64_t tt, int n,
                       const uint8_t** slots) {
  int64_t b = tt / P.block_size, i0 = tt % P.block_size;
  const uint8_t* base = P.cache + row[b] * P.s_blk + h * P.s_head;
  for (int i = 0; i < n; ++i) {
    if (i0 == P.block_size) {
      base = P.cache + row[++b] * P.s_blk + h * P.s_head;
      i0 = 0;
    }
    slots[i] = base + (i0++) * P.s_tok;
  }
}

// Decode: one task = (row, KV head, split), as attend<GT>.
TQ_AMX_TARGET void amx_attend(const Step& P, const AmxBooks& bk, int64_t task) {
  const int G = (int)P.G;
  const auto [b, h, sp, t0, t1] = P.decode_task(task);
  if (t1 <= t0) {  // an empty split: nothing read, as attend writes it
    alignas(64) float acc[MAX_G][MAX_D];
    float m[MAX_G], l[MAX_G];
    init_state(G, P.d, acc, m, l);
    write_split(P, b, h * G, sp, G, acc, m, l);
    return;
  }
  const int64_t* row = P.block_table + b * P.bt_stride;
  AmxPass S;
  amx_pass_init(P, b * P.Hq + h * G, 1, G, S);
  const bool codes = g_amx_dp && G <= DP_FEW_PAIRS;  // values decoded inside their product
  AmxBlock& T = amx_block();
  Ahead& ah = ahead();
  for (int64_t tt = t0; tt < t1; tt += AMX_BT) {
    const int n = (int)std::min<int64_t>(AMX_BT, t1 - tt);
    const uint8_t* slots[AMX_BT];
    tile_slots(P, row, h, tt, n, slots);
    amx_fill(P, bk, slots, n, T, !codes);
    alignas(64) int rd[AMX_MAXN];
    for (int p = 0; p < AMX_MAXN; ++p) rd[p] = p < G ? n : 0;
    amx_step(P, bk, T, S, rd, G, codes ? slots : nullptr, &ah);
  }
  if (!g_amx_dp) _tile_release();
  amx_write(P, S, b, h, sp, G);
}

// Prefill: one task = (group of consecutive rows of one sequence, KV head, split), as
// attend_rows<GT>: each tile decoded once, the group's rows run through it in passes of
// AMX_MAXN / G rows.
TQ_AMX_TARGET void amx_attend_rows(const Step& P, const AmxBooks& bk, int64_t task) {
  const int G = (int)P.G;
  const int RBA = std::max(1, AMX_MAXN / G);
  const RowGroup rg = row_group(P, task);
  const int64_t r0 = rg.r0, nr = rg.nr, h = rg.h, sp = rg.sp, t_end = rg.t_end;
  if (t_end == rg.t0) return;
  auto end_of = [&](int64_t r) { return rg.end_of(P, r); };
  const int64_t* row = P.block_table + P.row_seq[r0] * P.bt_stride;
  const int npass = (int)((nr + RBA - 1) / RBA);
  thread_local std::vector<AmxPass> passes;
  passes.resize(npass);
  for (int ps = 0; ps < npass; ++ps)
    amx_pass_init(P, (r0 + ps * RBA) * P.Hq + h * G, (int)std::min<int64_t>(RBA, nr - ps * RBA), G,
                  passes[ps]);
  AmxBlock& T = amx_block();
  for (int64_t tt = rg.t0; tt < t_end; tt += AMX_BT) {
    const int n = (int)std::min<int64_t>(AMX_BT, t_end - tt);
    const uint8_t* slots[AMX_BT];
    tile_slots(P, row, h, tt, n, slots);
    amx_fill(P, bk, slots, n, T, true);
    for (int ps = 0; ps < npass; ++ps) {
      AmxPass& S = passes[ps];
      alignas(64) int rd[AMX_MAXN];
      bool any = false;
      for (int p = 0; p < AMX_MAXN; ++p) {
        rd[p] = p < S.rows * G ? (int)std::clamp<int64_t>(end_of(ps * RBA + p / G) - tt, 0, n) : 0;
        any = any || rd[p] > 0;
      }
      if (!any) continue;  // the pass's rows end before this tile (its state is unchanged)
      amx_step(P, bk, T, S, rd, G, nullptr);
    }
  }
  if (!g_amx_dp) _tile_release();
  for (int ps = 0; ps < npass; ++ps) amx_write(P, passes[ps], r0 + ps * RBA, h, sp, G);
}

// Prefill rows per task on AMX: AMX_PASSES passes of AMX_MAXN / G rows share each
// block's decode (a block's decode costs about what one pass's products and softmax over
// it cost at G = 3, so one pass a task would spend half its time decoding). A 4k-token
// prompt measured the same with 4 passes (20 rows at G = 3) and 8; more rows a task
// means fewer tasks for the threads on short prompts.
constexpr int AMX_PASSES = 8;
inline int64_t amx_group_rows(int64_t G) { return AMX_PASSES * std::max<int64_t>(1, AMX_MAXN / G); }

// Whether the AMX bodies may handle this call's rows (amx_row says which): turned on
// (g_amx), a bf16 model (its queries), scalar codes without QJL, groups of whole
// 32-coordinate chunks of at most 4 bits, up to 16 query heads per KV head, splits of
// whole blocks.
inline bool amx_handles(int q_dt, const Desc& kd, const Desc& vd, bool qjl, int64_t G,
                        int64_t split_tokens) {
  if (g_amx == AMX_OFF || q_dt != DT_BF16 || qjl || kd.trellis || vd.trellis || G > AMX_MAXN ||
      split_tokens % AMX_BT)
    return false;
  for (const Desc* de : {&kd, &vd})
    for (int g = 0; g < de->ngroups; ++g)
      if (de->dim[g] % AMX_CHUNK || de->bits[g] < 1 || de->bits[g] > 4) return false;
  return true;
}

// AMX tile data needs the kernel's permission once per process (Linux).
inline int amx_request() {
  constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

}  // namespace
