"""Launchers for the Triton kernels (the CUDA path): validate, prepare tables, launch.

Same signatures and semantics as :mod:`tq_vllm.kernels.cpu_ops` (``decode``,
``prefill``) and :func:`tq_vllm.reference.tq_store` (``store``). Rotations happen
once per call, on either side of the kernels:

* store: ``y = R_h x`` is one batched GEMM over all tokens (cuBLAS, no host sync, so
  the launcher stays CUDA-graph safe) and it is the very op the reference codec uses,
  which is what makes the kernel bit-exact with :func:`reference.tq_store` (a
  ``tl.dot`` rotation sums in another order: its float32 ``y`` differs in the last
  bit, which moves codes and fp16 norms now and then);
* decode/prefill: the query is rotated (and sketched, ``c·S R_h q``) once per step,
  the rotated-domain output rotated back once, as in ``cpu_ops``, by
  :func:`tq_rotate_kernel` — one program per row, so a row's bits do not depend on how
  many rows share the call (a GEMM's blocking does). With the fixed KV splits the
  decode of a request is the same in any batch (tested under the interpreter).

The kernels never see vLLM; this module imports only torch, triton and the codec.
Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (tests); with
``TQ_TEST_DEVICE=cuda`` the same tests run compiled on a GPU (52 passed on an H100,
Triton 3.6, 2026-11-24: store bit-exact, decode/prefill within the fp32 tolerances).

Decode roofline (bytes read per token per KV head = the slot, from ``config``):

=========  ======  =======  =======  ==============================================
cache      d = 64  d = 128  d = 256  H100 roofline, B 32 × 32k ctx × 8 KV heads, d 128
=========  ======  =======  =======  ==============================================
bf16         256      512     1024   1.28 ms (FlashAttention measured 1.68 ms, 76%)
fp8          128      256      512   0.64 ms
tq4           68      132      260   0.33 ms (measured 4.50 ms, 7%)
tq3.5         60      116      228   0.29 ms (measured 4.27 ms, 7%)
tq3           56      104      200   0.26 ms (measured 5.58 ms, 5%)
tq2.5         44       84      164   0.21 ms (not re-measured; 9.29 ms before)
tq4.5         78      150      294   0.38 ms (not measured: QJL keys run 1.7–2× tq4)
=========  ======  =======  =======  ==============================================

Roofline = bytes / 3.35 TB/s. Measured with ``eval/bench_decode_gpu.py --graph`` (H100,
2026-11-24, CUDA-graph replays; docs/performance.md): decode takes 2.3–3.3× FlashAttention's
bf16 time for tq3.5/tq4 at ≥ 4k context, batch 1–32, d 64/128 (1.9× at best, 3–4.3× at
batch 1 × 1k; QJL keys 3.2–6.6×), 6–7% of peak bandwidth: 2× faster than the first GPU
version, still not at bf16 speed. With plain TF32 dots for bf16 queries
(:data:`DOT_PRECISION`): 1.8–2.3× at batch 8–32 × 16k–32k (tq3.5 B 32 × 32k 3.01 ms).
``ncu``: 168 registers, 18.75% occupancy, L1/TEX 68% busy (gathers and the fp32 dot
operands through shared memory), DRAM 6%. Left: the per-code centroid gather, the
``tf32x3`` operand conversion, query rows padded to 16 for ``tl.dot``.
"""

from __future__ import annotations

import torch
import triton

from tq_vllm import trellis
from tq_vllm.codec import LayerCodec, TensorQuantizer
from tq_vllm.config import TensorLayout
from tq_vllm.kernels.triton_decode import tq_decode_kernel, tq_reduce_kernel
from tq_vllm.kernels.triton_prefill import tq_prefill_kernel
from tq_vllm.kernels.triton_rotate import tq_rotate_kernel
from tq_vllm.kernels.triton_store import tq_store_kernel
from tq_vllm.kernels.triton_trellis import tq_trellis_fed_search_kernel, tq_trellis_search_kernel
from tq_vllm.reference import check_cache, fresh_attention

FUSES_TRANSFORMS = False
"""The layer's transform runs in PyTorch before these launchers (:mod:`tq_vllm.kernels.ops`)."""

STORE_BLOCK_T = 16
"""Tokens per store program: ``tl.dot`` (QJL sketch) needs ≥ 16 rows, and 16 × d tiles
(fp32 plus the fp64 squares) stay in registers up to d = 256. The store is memory
bound; more tokens per program buy nothing."""

SKETCH_COLS = 32
"""QJL sketch columns per float64 ``tl.dot`` in the store: a [d, 32] fp64 tile is
64 KiB at d = 256 (fits shared memory), and 32 outputs pack into 4 whole sign bytes."""

DECODE_BLOCK_N = {64: 64, 128: 64, 256: 16}
"""Decode tokens per tile by head size. With code runs read as int32 words (``A4``), 2
warps and 64-token tiles took 0.67–0.87× the time of 4 warps and 32-token tiles on an
H100 in every case timed (CUDA-graph replays, d 128 GQA 4 at B 1/8/32 × 4k/32k and d 64
GQA 7 at B 32 × 32k, tq4 / tq3.5 / tq3 / tq3.5-trellis; 2 warps with 32-token tiles
within 3% of it for tq3.5 only; 2026-11-25, docs/performance.md). Before, with byte
loads (batch 8, 16k, d 128, tq3.5, one stage): 16 tokens 1.04, 32 tokens 0.60, 64 tokens
0.60 ms. d = 256 keeps 16 (not measured)."""

MIN_G_PAD = 16
"""Query-head rows per decode program are padded to this: ``tl.dot`` needs M ≥ 16."""

DECODE_NUM_WARPS = {64: 2, 128: 2, 256: 4}
"""Warps per decode program by head size: 2 with the word loads (see
:data:`DECODE_BLOCK_N`); before them, with one pipeline stage, 8 warps took 2.2× as long
as 4 and 2 were within 4% of 4. d = 256 keeps 4 (not measured)."""

DECODE_NUM_STAGES = 1
"""Software-pipelining depth of the decode loop. With Triton's default (3 on Hopper) the
kernel took 86 KiB of shared memory per program (24.6 KiB with one stage), 184 registers,
2 programs (12.5% occupancy) per SM, L1 78% busy (``ncu``). One stage halved the step
on an H100 (tq3.5, d 128, GQA 4: B 8 × 16k 1.13 → 0.59 ms, B 32 × 32k 8.39 → 4.28 ms;
2 stages 1.09 / 8.16 ms; 2026-11-24, docs/performance.md)."""

DOT_PRECISION = {torch.float32: "tf32x3", torch.bfloat16: "tf32", torch.float16: "tf32"}
"""``tl.dot`` input precision of decode and prefill by query dtype. fp32 queries get
``tf32x3`` (three TF32 tensor-core products, about fp32 accuracy: the fp32 tolerances of
tests/kernels, as ``ieee`` CUDA-core FMA). bf16/fp16 queries carry 8/11 mantissa bits, so
plain ``tf32`` (10 bits, one product) is enough: its error stays below what torch's own
attention in the query dtype makes on the same dequantized cache, which is what the tests
assert on a GPU (flash-attention's policy). On an H100 (tq3.5, d 128, GQA 4) ``tf32``
decodes B 8 × 16k in 0.43 ms against 0.60 with ``tf32x3`` (docs/performance.md)."""


def dot_precision(q: torch.Tensor) -> str:
    """The ``tl.dot`` input precision for queries ``q`` (:data:`DOT_PRECISION`)."""
    return DOT_PRECISION.get(q.dtype, "tf32x3")


PREFILL_ROWS = {64: 64, 128: 64, 256: 32}
"""Query rows (tokens × padded query heads of one KV head) per prefill program by head
size: ``[rows, d]`` fp32 query/accumulator tiles plus a ``[rows, BLOCK_N]`` score tile;
with G = 8 and 64 rows that is 8 query tokens, with G = 1 64 tokens. At d = 256, 64
rows need 320 KiB of shared memory for the fp32 ``tl.dot`` operands (an H100 has
227 KiB), so 32."""

PREFILL_NUM_STAGES = 1
"""Pipelining depth of the prefill KV loop, as in decode (:data:`DECODE_NUM_STAGES`). On an
H100 (tq3.5, d 128, GQA 4, one sequence, 3584 cached + 512 new tokens, bf16 queries) the
kernel took 47.8 ms with ``ieee`` dots and 3 stages, 4.1 ms with ``tf32x3``, 1.34 ms with
``tf32x3`` and one stage (4 × 4096 cached + 256 new: 8.4 → 2.6 ms)."""

PREFILL_BLOCK_N = {64: 32, 128: 32, 256: 16}
"""Cache tokens per prefill KV tile by head size: ``[BLOCK_N, d]`` K/V tiles, fine-grained
enough that causal tiles waste little past the diagonal. At d = 256, 32 rows × 32 tokens
needed 256 KiB of shared memory on an H100 (limit 227 KiB); 16 tokens halve the K/V part."""

DECODE_SPLIT_TOKENS = 256
"""Decode splits the KV axis into fixed runs of this many tokens (a multiple of every
``DECODE_BLOCK_N``), as the CPU kernels do (``cpu_ops.SPLIT_TOKENS``): how a sequence is
split, and so the float summation order of its attention, depends on its own length
only, never on the batch or the longest sequence beside it. Splits past a sequence's
end are empty and merge exactly (×1, +0) in :func:`tq_reduce_kernel`'s in-order loop.
On an H100 (one pipeline stage, tq3.5, d 128) 128- and 512-token splits were within 3%
of 256 at batch 8 × 16k and 32 × 32k."""


def num_splits(max_len: int) -> int:
    """Decode splits covering ``max_len`` tokens (the block table's capacity)."""
    return max(1, -(-max_len // DECODE_SPLIT_TOKENS))


TRELLIS_SEARCH_BLOCK_R = {"cuda": 8, "cpu": 64}
"""Rows per trellis search program by device: on a GPU a step holds ``BLOCK_R × 2^(S+R)``
branch costs (8 × 1024 at S = 6, R = 4: 32 fp32 registers a thread at
:data:`TRELLIS_SEARCH_WARPS`; not yet timed on a GPU); the interpreter (CPU tensors, CI)
pays ~10 ms of Python per program and step whatever its size, so it takes 64 rows a
program. Rows are independent: the codes do not depend on the blocking."""

TRELLIS_SEARCH_WARPS = 8
"""Warps per trellis search program (see :data:`TRELLIS_SEARCH_BLOCK_R`)."""

TRELLIS_SEARCH_ROWS = 8192
"""Rows per trellis search launch: each row keeps a predecessor byte per state and
coordinate for its backward pass (4 KiB at S = 6 and 64 coordinates), so a long prefill
is searched in chunks of at most 32 MiB of scratch."""


# ---------------------------------------------------------------------------- tables

def _tensor_consts(prefix: str, lay: TensorLayout, tq: TensorQuantizer) -> dict[str, object]:
    """Constexpr descriptor of one of K/V (see the kernel modules)."""
    ng = len(lay.group_dims)
    b0, b1 = lay.group_bits[0], lay.group_bits[-1]
    c0, c1 = lay.codes[0].offset, lay.codes[-1].offset
    if b0 < b1:
        raise ValueError(f"Triton kernels expect the first channel group to have the most "
                         f"code bits, got {lay.group_bits}")
    if ng == 2 and lay.group_dims[0] != lay.head_dim // 2:
        raise ValueError(f"Triton kernels read two channel groups as the two halves of the "
                         f"head dim, got groups {lay.group_dims}")
    if b0 > 4 or lay.head_dim % 16:
        raise ValueError(f"Triton kernels unpack 8 codes from one 32-bit word and split the "
                         f"head dim in halves of whole bytes: need ≤ 4 code bits and a head "
                         f"size divisible by 16, got {lay.group_bits} bits, d = {lay.head_dim}")
    ts = tq.codec.trellis
    if ts > 8 * b1:
        raise ValueError(f"Triton kernels read a trellis window from a run of 8 codes and the "
                         f"run before it: need at most {8 * b1} state bits for {b1}-bit codes, "
                         f"got {ts}")
    return {f"{prefix}_NG": ng, f"{prefix}_B0": b0, f"{prefix}_B1": b1,
            f"{prefix}_W": int(_tables(tq)[0].shape[1]), f"{prefix}_NORM": lay.norms.offset,
            f"{prefix}_C0": c0, f"{prefix}_C1": c1, f"{prefix}_TS": ts}


def _tables(tq: TensorQuantizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codebooks [G, W], boundaries [G, 16] padded with +inf, sketch [d, d] or None),
    float32 contiguous on the quantizer's device; built once per quantizer and device.

    The kernels read one codebook per channel group (row ``g`` of the first table,
    :meth:`TensorQuantizer.group_codebooks`, which raises if ``lut``'s rows differ inside
    a group), not the codec's per-coordinate ``lut [d, W]``: a gather from a 16-entry row
    hits one cache line per warp, one from ``lut`` up to 16. With trellis codes the rows
    are the groups' decode tables (:meth:`TensorQuantizer.trellis_tables`, ``W`` =
    ``2^(S + bits)``), read at each code's window."""
    key = (tq.lut.device, tq.lut.data_ptr())
    cached = getattr(tq, "_triton_tables", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    books = (tq.group_codebooks() if tq.tables is None else tq.trellis_tables())
    books = books.float().to(tq.lut.device).contiguous()
    bnd = torch.full((len(tq.bounds), 16), float("inf"), dtype=torch.float32)
    for g, b in enumerate(tq.bounds):
        bnd[g, : b.numel()] = b.float().cpu()
    sk = tq.kernel_sketch()
    sketch = sk.float().contiguous() if sk is not None else None
    tables = (books, bnd.to(tq.lut.device), sketch)
    tq._triton_tables = (key, tables)  # dies with the quantizer
    return tables


# ---------------------------------------------------------------------------- checks

def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the cache on {device}")


def _check_int(name: str, t: torch.Tensor, dims: int) -> None:
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != dims:
        raise ValueError(f"{name} must be a {dims}-d int32/int64 tensor, got {t.dtype} "
                         f"{tuple(t.shape)}")


def _check_codec_device(codec: LayerCodec, device: torch.device) -> None:
    for tq, what in ((codec.key, "key"), (codec.value, "value")):
        if tq.rot.device != device or tq.lut.device != device:
            raise ValueError(f"codec {what} tables are on {tq.rot.device}, the cache on "
                             f"{device}: call codec.to(device) once")


def _check_queries(q: torch.Tensor, kv_cache: torch.Tensor, codec: LayerCodec, what: str) -> None:
    if q.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"{what}: q must be floating [T, Hq, d], got {q.dtype} {tuple(q.shape)}")
    if q.shape[2] != codec.key.head_dim:
        raise ValueError(f"{what}: q head size {q.shape[2]} != codec head_dim {codec.key.head_dim}")
    if q.shape[1] % kv_cache.shape[1]:
        raise ValueError(f"{what}: {q.shape[1]} query heads are not a multiple of "
                         f"{kv_cache.shape[1]} KV heads")


def _cache_strides(kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    # any strides work (the kernels address bytes through all four); Triton takes the
    # view's data pointer, i.e. storage offset included
    return tuple(int(s) for s in kv_cache.stride())  # type: ignore[return-value]


def word_aligned(kv_cache: torch.Tensor) -> bool:
    """Whether every slot of ``kv_cache`` starts 4-byte aligned with its bytes contiguous,
    so the attention kernels may read code runs as int32 words (``A4``): a data pointer
    and block/head/token strides that are multiples of 4, byte stride 1. Slots of any
    preset whose size is a multiple of 4 (every scalar ``tq{b}`` preset) qualify in vLLM's
    cache; others take byte loads."""
    s_blk, s_head, s_tok, s_byte = _cache_strides(kv_cache)
    return (s_byte == 1 and kv_cache.data_ptr() % 4 == 0
            and all(s % 4 == 0 for s in (s_blk, s_head, s_tok)))


def _pad_pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(n))


# ---------------------------------------------------------------------------- rotation

ROTATE_ROWS = 32
"""Output coordinates per step of :func:`tq_rotate_kernel`: a ``[32, d]`` float32 tile of
the matrix (32 KiB at d = 256) stays in registers at 4 warps."""


def _per_row(x: torch.Tensor, mats: torch.Tensor, group: int, scale: float = 1.0,
             transpose: bool = False) -> torch.Tensor:
    """``scale · mats[q // group] @ x[n, q]`` (``mats[·]ᵀ`` with ``transpose``) for ``x``
    ``[N, Hq, d]`` and ``mats`` ``[H, d, d]`` (or ``[d, d]`` for all heads) → float32
    contiguous ``[N, Hq, d]``."""
    n, hq, d = x.shape
    x = x.float().contiguous()
    mats = mats.float().contiguous()
    out = torch.empty_like(x)
    if n:
        head_stride = 0 if mats.dim() == 2 else mats.stride(0)
        tq_rotate_kernel[(n, hq)](x, mats, out, head_stride, float(scale), G=group, D=d,
                                  ROWS=min(ROTATE_ROWS, d), TRANSPOSE=transpose)
    return out


def _rotate_queries(q: torch.Tensor, codec: LayerCodec, num_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``R_h q``, ``qjl_scale · S R_h q``) float32 contiguous ``[N, Hq, d]``; the second
    is the first when keys have no QJL sketch (never read then)."""
    g = q.shape[1] // num_kv
    q_rot = _per_row(q, codec.key.rot, g)
    sk = codec.key.kernel_sketch()
    q_sk = _per_row(q_rot, sk, g, codec.key.qjl_scale) if sk is not None else q_rot
    return q_rot, q_sk


def _unrotate(o_rot: torch.Tensor, codec: LayerCodec, num_kv: int) -> torch.Tensor:
    """``R_hᵀ o`` for rotated-domain outputs ``[N, Hq, d]`` → float32 ``[N, Hq, d]``."""
    return _per_row(o_rot, codec.value.rot, o_rot.shape[1] // num_kv, transpose=True)


def _kernel_consts(codec: LayerCodec) -> dict[str, object]:
    d = codec.key.head_dim
    lay = codec.preset.layout(d)
    consts = {"D": d, **_tensor_consts("K", lay.key, codec.key),
              **_tensor_consts("V", lay.value, codec.value)}
    consts["K_SIGN"] = lay.key.signs.offset if lay.key.signs is not None else 0
    consts["K_QJL"] = lay.key.signs is not None
    consts["K_OFF"] = codec.key.offset is not None
    return consts


# ---------------------------------------------------------------------------- store

def trellis_search(u: torch.Tensor, table: torch.Tensor, bits: int, state_bits: int) -> torch.Tensor:
    """Trellis codes uint8 ``[R, n]`` of unit-scale rows ``u`` float32 ``[R, n]`` for the
    decode table ``table`` ``[2**(S + bits)]`` on the same device:
    :func:`tq_vllm.trellis.encode`'s codes, bit for bit."""
    if u.dim() != 2 or u.dtype != torch.float32:
        raise ValueError(f"trellis_search: u must be float32 [R, n], got {u.dtype} {tuple(u.shape)}")
    if not 1 <= bits <= state_bits or table.numel() != 1 << (state_bits + bits):
        raise ValueError(f"trellis_search: a table of 2^(S + bits) = {1 << (state_bits + bits)} "
                         f"entries and 1 ≤ bits ≤ S are needed, got {table.numel()} entries, "
                         f"bits {bits}, S {state_bits}")
    _check_device("table", table, u.device)
    u, table = u.contiguous(), table.float().contiguous()
    rows, n = u.shape
    codes = torch.empty(rows, n, dtype=torch.uint8, device=u.device)
    back = torch.empty(min(rows, TRELLIS_SEARCH_ROWS), n, 1 << state_bits, dtype=torch.uint8,
                       device=u.device)
    block_r = TRELLIS_SEARCH_BLOCK_R["cpu" if u.device.type == "cpu" else "cuda"]
    for r0 in range(0, rows, TRELLIS_SEARCH_ROWS):
        r1 = min(rows, r0 + TRELLIS_SEARCH_ROWS)
        tq_trellis_search_kernel[(triton.cdiv(r1 - r0, block_r),)](
            u[r0:r1], table, back, codes[r0:r1], r1 - r0, n, R=bits, S=state_bits,
            BLOCK_R=block_r, num_warps=TRELLIS_SEARCH_WARPS,
            enable_fp_fusion=False,  # cost + e·e rounded twice, as the reference
        )
    return codes


TRELLIS_FED_SCRATCH_BYTES = 64 << 20
"""Scratch per launch of the search against a query weight: each row keeps two feedback
rows per state (``2 × 2^S × d`` floats, 32 KiB at S = 6, d = 64), so a long prefill is
searched in chunks of rows that fit in this many bytes."""

TRELLIS_FED_BLOCK_R = {"cuda": 1, "cpu": 16}
"""Rows per program of the search against a query weight: on a GPU a step holds a row's
``2^S × d`` feedback gather (4096 floats at S = 6, d = 64; not yet timed on a GPU); the
interpreter pays per program and step, so it takes 16 rows."""


def trellis_search_fed(y: torch.Tensor, norms: torch.Tensor, head: torch.Tensor,
                       feedback: torch.Tensor, weight: torch.Tensor, tables: list[torch.Tensor],
                       bits: list[int], state_bits: int) -> torch.Tensor:
    """Trellis codes uint8 ``[N, d]`` of rotated rows ``y`` float32 ``[N, d]`` searched against
    a query weight, on ``y``'s device: :func:`tq_vllm.trellis.encode_fed`'s codes (same
    arguments: ``norms`` ``[N, G]``, ``head`` ``[N]``, ``feedback`` ``[H, d, d]``, ``weight``
    ``[H, d]``, one table and bit width per group), bit for bit; one launch per group."""
    trellis.check_fed_inputs(y, norms, head, feedback, weight, tables, bits, state_bits)
    n_rows, d = y.shape
    groups = len(tables)
    for name, t in (("norms", norms), ("head", head), ("feedback", feedback), ("weight", weight),
                    *((f"table {g}", tab) for g, tab in enumerate(tables))):
        _check_device(name, t, y.device)
    y = y.contiguous()
    fb, wt = feedback.float().contiguous(), weight.float().contiguous()
    head = head.to(torch.int64).contiguous()
    ns, dg = 1 << state_bits, d // groups
    chunk = max(1, TRELLIS_FED_SCRATCH_BYTES // (2 * ns * d * 4))
    codes = torch.empty(n_rows, d, dtype=torch.uint8, device=y.device)
    block_r = TRELLIS_FED_BLOCK_R["cpu" if y.device.type == "cpu" else "cuda"]
    scratch = torch.empty(min(n_rows, chunk), 2, ns, d, device=y.device)
    back = torch.empty(min(n_rows, chunk), dg, ns, dtype=torch.uint8, device=y.device)
    for r0 in range(0, n_rows, chunk):
        r1 = min(n_rows, r0 + chunk)
        carry = torch.zeros(r1 - r0, d, device=y.device)
        for g, (b, tab) in enumerate(zip(bits, tables)):
            carry_out = torch.empty_like(carry)
            tq_trellis_fed_search_kernel[(triton.cdiv(r1 - r0, block_r),)](
                y[r0:r1], norms[r0:r1, g].float().contiguous(), head[r0:r1], fb, wt,
                tab.float().contiguous(), carry, scratch, back, codes[r0:r1], carry_out,
                r1 - r0, g * dg, D=d, DG=dg, R=b, S=state_bits, BLOCK_R=block_r,
                enable_fp_fusion=False,  # t − n·value, cost + (w·a)·a, fb + a·F unfused
            )
            carry = carry_out
    return codes


def _trellis_inputs(tq: TensorQuantizer, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, unit values float32), both ``[T, H, d]`` contiguous, of rotated vectors
    ``y`` ``[T, H, d]`` for a trellis quantizer: each channel group's Viterbi path on the
    codec's own unit coordinates and its decoded values, what the store kernel writes
    and corrects the norms by (keys with a query weight: :func:`trellis_search_fed`)."""
    codes = tq.trellis_codes(y, trellis_search, trellis_search_fed)
    return codes, tq.unit_values(codes).float().contiguous()


def _rotate_for_store(x: torch.Tensor, tq: TensorQuantizer) -> torch.Tensor:
    """``R_h x`` float32 ``[T, H, d]`` with non-finite vectors zeroed first (codec policy),
    computed by the codec's own rotation op."""
    x = x.float().contiguous()
    x = torch.where(torch.isfinite(x).all(-1, keepdim=True), x, torch.zeros_like(x))
    return tq.rotate(x).contiguous()


def store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
          slot_mapping: torch.Tensor, codec: LayerCodec) -> None:
    """Quantize ``key``/``value`` ``[T, H, d]`` and write them at ``slot_mapping`` ``[T]``.

    Slots ``-1`` are skipped. On CPU tensors an out-of-range slot raises before anything
    is written (as the reference does); on a GPU that check would need a host sync, so
    the kernel instead skips such slots without writing. Non-finite vectors are stored
    as zeros; ``codec.key.stats`` counters are not updated on this path.
    """
    check_cache(kv_cache, codec)
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key and value must both be [T, H, d], got {tuple(key.shape)} "
                         f"and {tuple(value.shape)}")
    t, h, d = key.shape
    if h != kv_cache.shape[1] or d != codec.key.head_dim:
        raise ValueError(f"key/value [T, {h}, {d}] do not match the cache's {kv_cache.shape[1]} "
                         f"KV heads and head_dim {codec.key.head_dim}")
    if not key.is_floating_point() or not value.is_floating_point():
        raise ValueError(f"key/value must be floating point, got {key.dtype}/{value.dtype}")
    _check_int("slot_mapping", slot_mapping, 1)
    if slot_mapping.shape[0] != t:
        raise ValueError(f"slot_mapping must be [{t}], got {tuple(slot_mapping.shape)}")
    device = kv_cache.device
    for name, tensor in (("key", key), ("value", value), ("slot_mapping", slot_mapping)):
        _check_device(name, tensor, device)
    _check_codec_device(codec, device)
    num_blocks, _, block_size, _ = kv_cache.shape
    if device.type == "cpu" and t and int(slot_mapping.max()) >= num_blocks * block_size:
        raise IndexError(f"slot_mapping has slots beyond the cache's {num_blocks * block_size}")
    if t == 0:
        return

    lay = codec.preset.layout(d)
    yk = _rotate_for_store(key, codec.key)
    by_norm = codec.key.offset_rot is not None and codec.key.offset_by_norm
    flags = yk  # placeholder: read only with K_FLAGS
    if by_norm:  # the offset choice made before the kernel: one encoding per key
        yk, flag = codec.key.offset_by_norm_choice(yk)
        flags = flag.to(torch.uint8).contiguous()
    alt = codec.key.offset_rot is not None and not by_norm
    yka = (yk + codec.key.offset_rot).contiguous() if alt else yk
    yv = _rotate_for_store(value, codec.value)
    lutk, bndk, sketch = _tables(codec.key)
    lutv, bndv, _ = _tables(codec.value)
    consts = _kernel_consts(codec)
    consts["K_OFF"], consts["K_FLAGS"] = consts["K_OFF"] and not by_norm, by_norm
    for p, tlay, tq in (("K", lay.key, codec.key), ("V", lay.value, codec.value)):
        consts[f"{p}_NBND"] = (1 << max(tlay.group_bits)) - 1  # boundaries of the widest group
        consts[f"{p}_NCORR"] = bool(tq.codec.norm_correction)
    none = (yk, yk)  # placeholders: given codes are read only for trellis tensors
    given_k = _trellis_inputs(codec.key, yk) if consts["K_TS"] else none
    given_ka = (_trellis_inputs(codec.key, yka) if consts["K_TS"] and consts["K_OFF"]
                else given_k)
    given_v = _trellis_inputs(codec.value, yv) if consts["V_TS"] else none
    s0, s1, s2, s3 = _cache_strides(kv_cache)
    grid = (triton.cdiv(t, STORE_BLOCK_T), h)
    tq_store_kernel[grid](
        yk, yka, yv, slot_mapping.to(torch.int64).contiguous(),
        kv_cache, s0, s1, s2, s3,
        t, h, block_size, num_blocks * block_size,
        lutk, bndk, sketch if sketch is not None else lutk, lutv, bndv,
        *given_k, *given_ka, *given_v,
        codec.key.feedback if codec.key.feedback is not None else yk,  # placeholder without
        flags,
        BLOCK_T=STORE_BLOCK_T, SK_COLS=SKETCH_COLS, K_FB=codec.key.feedback is not None and codec.key.tables is None,
        enable_fp_fusion=False,  # keep y − n·c and the feedback unfused, as the reference
        **consts,
    )


# ---------------------------------------------------------------------------- decode

def decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, codec: LayerCodec, scale: float, out: torch.Tensor) -> None:
    """Decode attention, one query token per sequence: q/out ``[B, Hq, d]``,
    block_table ``[B, M]``, seq_lens ``[B]`` (new token included). Writes ``out``."""
    check_cache(kv_cache, codec)
    _check_queries(q, kv_cache, codec, "decode")
    b, hq, d = q.shape
    if out.shape != q.shape:
        raise ValueError(f"decode: out {tuple(out.shape)} != q {tuple(q.shape)}")
    _check_int("block_table", block_table, 2)
    _check_int("seq_lens", seq_lens, 1)
    if block_table.shape[0] != b or seq_lens.shape[0] != b:
        raise ValueError(f"decode: q has {b} sequences, block_table {tuple(block_table.shape)}, "
                         f"seq_lens {tuple(seq_lens.shape)}")
    if block_table.stride(1) != 1:
        raise ValueError("decode: block_table rows must be contiguous (stride 1 on dim 1)")
    device = kv_cache.device
    for name, tensor in (("q", q), ("out", out), ("block_table", block_table),
                         ("seq_lens", seq_lens)):
        _check_device(name, tensor, device)
    _check_codec_device(codec, device)
    if b == 0:
        return

    num_kv, block_size = kv_cache.shape[1], kv_cache.shape[2]
    g = hq // num_kv
    block_n = DECODE_BLOCK_N[d]
    if DECODE_SPLIT_TOKENS % block_n:
        raise ValueError(f"DECODE_SPLIT_TOKENS {DECODE_SPLIT_TOKENS} must be a multiple of the "
                         f"decode tile ({block_n} tokens)")
    splits = num_splits(block_table.shape[1] * block_size)
    split_tokens = DECODE_SPLIT_TOKENS

    lutk, _, _ = _tables(codec.key)  # validates the codebooks before any launch
    lutv, _, _ = _tables(codec.value)
    q_rot, q_sk = _rotate_queries(q, codec, num_kv)
    q_off = codec.key.query_offsets(q)
    acc = torch.empty(b, hq, splits, d, dtype=torch.float32, device=device)
    m = torch.empty(b, hq, splits, dtype=torch.float32, device=device)
    l = torch.empty(b, hq, splits, dtype=torch.float32, device=device)
    s0, s1, s2, s3 = _cache_strides(kv_cache)
    tq_decode_kernel[(b, num_kv, splits)](
        q_rot, q_sk, q_off if q_off is not None else q_rot, kv_cache, s0, s1, s2, s3,
        block_table, block_table.stride(0), seq_lens.contiguous(), block_size, split_tokens,
        lutk, lutv, float(scale), acc, m, l, hq, splits,
        G=g, G_PAD=_pad_pow2(g, MIN_G_PAD), BLOCK_N=block_n, **_kernel_consts(codec),
        DOT_PREC=dot_precision(q), A4=word_aligned(kv_cache), num_warps=DECODE_NUM_WARPS[d],
        num_stages=DECODE_NUM_STAGES,
    )
    o_rot = torch.empty(b, hq, d, dtype=torch.float32, device=device)
    tq_reduce_kernel[(b * hq,)](acc, m, l, o_rot, splits, D=d)
    out.copy_(_unrotate(o_rot, codec, num_kv))


# ---------------------------------------------------------------------------- prefill

def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
            block_table: torch.Tensor, seq_lens_cpu: torch.Tensor,
            query_start_loc_cpu: torch.Tensor, first: int, codec: LayerCodec, scale: float,
            out: torch.Tensor, fresh_exact: bool) -> None:
    """Causal attention of the query chunks of sequences ``first..`` over the packed cache.

    q/out ``[T, Hq, d]``, k/v ``[T, H, d]`` (this step's fresh tokens, already stored),
    seq_lens_cpu ``[B]`` and query_start_loc_cpu ``[B + 1]`` on the host. A chunk without
    cached context attends to the fresh exact K/V (torch SDPA) when ``fresh_exact``;
    every other chunk runs :func:`tq_prefill_kernel` on the cache. Rows of sequences
    before ``first`` are left alone.
    """
    check_cache(kv_cache, codec)
    _check_queries(q, kv_cache, codec, "prefill")
    t, hq, d = q.shape
    if out.shape != q.shape:
        raise ValueError(f"prefill: out {tuple(out.shape)} != q {tuple(q.shape)}")
    if k.shape != v.shape or k.dim() != 3 or k.shape[0] != t or k.shape[1:] != kv_cache.shape[1:2] + (d,):
        raise ValueError(f"prefill: k {tuple(k.shape)} / v {tuple(v.shape)} must be "
                         f"[{t}, {kv_cache.shape[1]}, {d}]")
    _check_int("block_table", block_table, 2)
    _check_int("seq_lens_cpu", seq_lens_cpu, 1)
    _check_int("query_start_loc_cpu", query_start_loc_cpu, 1)
    if seq_lens_cpu.device.type != "cpu" or query_start_loc_cpu.device.type != "cpu":
        raise ValueError("prefill: seq_lens_cpu and query_start_loc_cpu must be host tensors")
    nseq = seq_lens_cpu.shape[0]
    if query_start_loc_cpu.shape[0] != nseq + 1 or block_table.shape[0] < nseq:
        raise ValueError(f"prefill: {nseq} sequences but query_start_loc "
                         f"{tuple(query_start_loc_cpu.shape)}, block_table {tuple(block_table.shape)}")
    if block_table.stride(1) != 1:
        raise ValueError("prefill: block_table rows must be contiguous (stride 1 on dim 1)")
    device = kv_cache.device
    for name, tensor in (("q", q), ("k", k), ("v", v), ("out", out), ("block_table", block_table)):
        _check_device(name, tensor, device)
    _check_codec_device(codec, device)

    num_kv, block_size = kv_cache.shape[1], kv_cache.shape[2]
    g = hq // num_kv
    g_pad = _pad_pow2(g)
    rows = PREFILL_ROWS[d]
    if g_pad > rows:
        raise ValueError(f"prefill: {g} query heads per KV head exceed {rows} rows")
    block_m = rows // g_pad
    qsl, sl = query_start_loc_cpu.tolist(), seq_lens_cpu.tolist()
    work, spans = [], []
    for i in range(first, nseq):
        q0, q1, s = qsl[i], qsl[i + 1], int(sl[i])
        n = q1 - q0
        if n == 0:
            continue
        if n > s:
            raise ValueError(f"prefill: sequence {i} has {n} query tokens but seq_len {s}")
        if s > block_table.shape[1] * block_size:
            raise ValueError(f"prefill: sequence {i} seq_len {s} exceeds its block table")
        if s == n and fresh_exact:
            out[q0:q1] = fresh_attention(q[q0:q1], k[q0:q1], v[q0:q1], scale).to(out.dtype)
            continue
        work += [(i, t0, q0, q1, s) for t0 in range(q0, q1, block_m)]
        spans.append((q0, q1))
    if not work:
        return

    lutk, _, _ = _tables(codec.key)  # validates the codebooks before any launch
    lutv, _, _ = _tables(codec.value)
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    q_rot, q_sk = _rotate_queries(q[lo:hi], codec, num_kv)
    q_off = codec.key.query_offsets(q[lo:hi])
    o_rot = torch.empty(hi - lo, hq, d, dtype=torch.float32, device=device)
    items = torch.tensor([(i, t0 - lo, q0 - lo, q1 - lo, s) for i, t0, q0, q1, s in work],
                         dtype=torch.int32).to(device)
    s0, s1, s2, s3 = _cache_strides(kv_cache)
    tq_prefill_kernel[(len(work), num_kv)](
        q_rot, q_sk, q_off if q_off is not None else q_rot, o_rot, items, kv_cache, s0, s1, s2, s3,
        block_table, block_table.stride(0), block_size, lutk, lutv, float(scale), hq,
        G=g, G_PAD=g_pad, BLOCK_M=block_m, BLOCK_N=PREFILL_BLOCK_N[d], **_kernel_consts(codec),
        DOT_PREC=dot_precision(q), A4=word_aligned(kv_cache), num_stages=PREFILL_NUM_STAGES,
    )
    for q0, q1 in spans:
        out[q0:q1] = _unrotate(o_rot[q0 - lo:q1 - lo], codec, num_kv).to(out.dtype)
